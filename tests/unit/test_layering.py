"""The direction of dependencies inside pyhv (STYLE.md), held by a test.

Each package may import only the pyhv modules listed for it, so the KVM binding and guest
memory stay free of devices, devices free of engines, and engines free of devices,
loaders and the machine. Imports are read from the source with `ast` (nothing is run).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "pyhv"

# package -> the pyhv modules (and their submodules) it may import, besides itself
ALLOWED: dict[str, set[str]] = {
    "kvm": {"pyhv.errors", "pyhv.exits"},
    "memory": {"pyhv.errors"},
    "arch": {"pyhv.errors", "pyhv.memory"},
    "loader": {"pyhv.errors", "pyhv.memory", "pyhv.arch"},
    # devices that do DMA (virtio) use guest memory; virtio-blk's back end is pyhv.disk
    "devices": {"pyhv.errors", "pyhv.clock", "pyhv.arch.x86.layout", "pyhv.arch.x86",
                "pyhv.memory", "pyhv.disk"},
    "engines": {"pyhv.errors", "pyhv.exits", "pyhv.memory", "pyhv.arch", "pyhv.kvm",
                "pyhv.clock"},
    "disk": {"pyhv.errors", "pyhv.units"},
    "net": {"pyhv.errors"},
    "sched": {"pyhv.errors"},       # CPU scheduling: settings, admission, cgroups, pins
}


def pyhv_imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "pyhv":
                found.update(f"pyhv.{a.name}" for a in node.names)
            elif node.module.startswith("pyhv."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("pyhv."))
    return found


def allowed(pkg: str, module: str) -> bool:
    own = f"pyhv.{pkg}"
    return any(module == ok or module.startswith(ok + ".") for ok in ALLOWED[pkg] | {own})


@pytest.mark.parametrize("pkg", sorted(ALLOWED))
def test_package_imports_only_what_it_may(pkg: str) -> None:
    bad = []
    for path in sorted((SRC / pkg).rglob("*.py")):
        for module in sorted(pyhv_imports(path)):
            if not allowed(pkg, module):
                bad.append(f"{path.relative_to(SRC)} imports {module}")
    assert not bad, "\n".join(bad)


def test_the_check_sees_a_violation(tmp_path: Path) -> None:
    p = tmp_path / "x.py"
    p.write_text("from pyhv.devices.bus import Bus\nimport pyhv.machine\nfrom pyhv import runner\n")
    assert pyhv_imports(p) == {"pyhv.devices.bus", "pyhv.machine", "pyhv.runner"}
    assert not allowed("engines", "pyhv.devices.bus")
    assert allowed("engines", "pyhv.kvm.vcpu")
