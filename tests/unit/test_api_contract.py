"""docs/api/vm.openapi.json describes exactly the resources pyhv.vmapi serves."""

from __future__ import annotations

import json
from pathlib import Path

from pyhv.vmapi import ROUTES

SPEC = Path(__file__).resolve().parents[2] / "docs" / "api" / "vm.openapi.json"


def test_the_openapi_file_lists_every_route_and_no_other() -> None:
    spec = json.loads(SPEC.read_text())
    served = {(path, method.lower()) for path, methods in ROUTES.items() for method in methods}
    documented = {(path, method) for path, ops in spec["paths"].items() for method in ops}
    assert served == documented
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            assert op.get("summary") and op.get("responses"), (path, method)
