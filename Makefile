# pyhv: the two commands a new user needs.
#   make run     set up (Debian packages + .venv) and boot a guest on its serial console
#   make test    set up and run the test suite (what CI runs)
PY ?= python3
VENV := .venv
ARGS ?=

.PHONY: setup run test lint bench
setup: $(VENV)/.ready
$(VENV)/.ready: pyproject.toml scripts/setup.sh src/pyhv/hostd/web/package-lock.json
	bash scripts/setup.sh
	touch $@

run: setup
	$(VENV)/bin/pyhv run $(ARGS)

test: setup
	$(VENV)/bin/python -m pytest -m "not slow" -q $(ARGS)

lint: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy
