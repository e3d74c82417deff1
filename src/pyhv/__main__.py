"""`python -m pyhv` is the `pyhv` command."""

from pyhv.cli import main

raise SystemExit(main())
