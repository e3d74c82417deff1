"""`pyhv info` and the host probe (pyhv.host): the JSON report and the engine choice.

The decision logic is tested with fakes for /proc/cpuinfo, /sys/module, /dev/kvm and
unicorn, so every kind (vmx, svm, pvm, none) is covered on any host; one test runs the
real command.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pyhv import host
from pyhv.errors import HostError

ROOT = Path(__file__).resolve().parents[2]
PYHV = ROOT / ".venv" / "bin" / "pyhv"
KEYS = {"machine", "cpu_model", "pcpus", "cpu_flags", "kvm_modules", "kvm_device",
        "kvm_usable", "kvm_error", "kvm_api_version", "kvm_capabilities", "kind",
        "kind_reason", "umip", "unicorn", "unicorn_error", "default_engine", "engine_reason"}


def _pyhv(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [str(PYHV)] if PYHV.exists() else [sys.executable, "-m", "pyhv"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=60,
                          check=False)


def test_info_json_has_the_documented_keys() -> None:
    r = _pyhv("info", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert set(d) >= KEYS
    assert d["kind"] in ("vmx", "svm", "pvm", "none") and d["kind_reason"]
    assert d["default_engine"] in ("kvm", "emu", "none") and d["engine_reason"]
    assert d["pcpus"] == os.cpu_count()
    assert set(d["cpu_flags"]) >= {"vmx", "svm", "umip"}
    assert d["umip"] == d["cpu_flags"]["umip"]
    if d["kvm_usable"]:
        assert d["kvm_api_version"] == 12 and d["kvm_error"] is None
        assert d["kvm_capabilities"]["KVM_CAP_USER_MEMORY"] > 0
    else:
        assert d["kind"] == "none" and d["kvm_error"]


def test_info_json_without_a_kvm_device() -> None:
    r = _pyhv("info", "--json", "--kvm-device", "/nonexistent/kvm")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert (d["kvm_device"], d["kvm_usable"], d["kind"]) == (False, False, "none")
    assert "does not exist" in d["kvm_error"] and d["kind_reason"] == d["kvm_error"]
    assert d["default_engine"] != "kvm"


def test_info_text_names_the_kind() -> None:
    r = _pyhv("info")
    assert r.returncode == 0, r.stderr
    assert "virtualization" in r.stdout and "default engine" in r.stdout


# ---------------------------------------------------------------------- decision logic


class _FakeKvm:
    usable = True

    def __init__(self, dev: str) -> None:
        if not self.usable:
            raise HostError(f"{dev} does not exist")
        self.api_version = 12

    def __enter__(self) -> _FakeKvm:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def capabilities(self) -> dict[str, int]:
        return {"KVM_CAP_USER_MEMORY": 1}


def _probe(monkeypatch: pytest.MonkeyPatch, *, flags: set[str], modules: set[str],
           kvm: bool, unicorn: bool = True) -> host.HostReport:
    import pyhv.kvm

    monkeypatch.setattr(host, "_cpuinfo", lambda: ("Fake CPU", set(flags)))
    present = {f"/sys/module/{m}" for m in modules} | ({"/dev/kvm"} if kvm else set())

    class FakePath:
        def __init__(self, *parts: str) -> None:
            self.p = "/".join(parts)

        def exists(self) -> bool:
            return self.p in present

    monkeypatch.setattr(host, "Path", FakePath)
    fake = type("FakeKvm", (_FakeKvm,), {"usable": kvm})
    monkeypatch.setattr(pyhv.kvm, "Kvm", fake)
    if not unicorn:
        monkeypatch.setitem(sys.modules, "unicorn", None)   # import fails
    return host.probe_host("/dev/kvm")


CASES: list[tuple[str, dict[str, Any], str, str]] = [
    ("intel", dict(flags={"vmx", "lm"}, modules={"kvm", "kvm_intel"}, kvm=True), "vmx", "kvm"),
    ("amd", dict(flags={"svm", "lm"}, modules={"kvm", "kvm_amd"}, kvm=True), "svm", "kvm"),
    ("pvm", dict(flags={"lm", "umip"}, modules={"kvm", "kvm_pvm"}, kvm=True), "pvm", "emu"),
    ("no-kvm", dict(flags={"vmx"}, modules=set(), kvm=False), "none", "emu"),
    ("no-kvm-no-unicorn", dict(flags=set(), modules=set(), kvm=False, unicorn=False),
     "none", "none"),
    ("pvm-no-unicorn", dict(flags=set(), modules={"kvm", "kvm_pvm"}, kvm=True,
                            unicorn=False), "pvm", "kvm"),
    ("kvm-unknown-module", dict(flags=set(), modules={"kvm"}, kvm=True), "pvm", "emu"),
    ("vmx-flag-without-module", dict(flags={"vmx"}, modules={"kvm"}, kvm=True), "vmx",
     "kvm"),
]


@pytest.mark.parametrize("name,kw,kind,engine", CASES, ids=[c[0] for c in CASES])
def test_kind_and_default_engine(monkeypatch: pytest.MonkeyPatch, name: str,
                                 kw: dict[str, Any], kind: str, engine: str) -> None:
    r = _probe(monkeypatch, **kw)
    assert (r.kind, r.default_engine) == (kind, engine)
    assert r.kind_reason and r.engine_reason
    assert r.cpu_model == "Fake CPU"
    assert r.umip == ("umip" in kw["flags"])
    assert r.kvm_usable == kw["kvm"]
    assert r.cpu_flags["vmx"] == ("vmx" in kw["flags"])
    if kind == "pvm" and "kvm_pvm" in kw["modules"]:
        assert "kvm_pvm" in r.kind_reason
    if not kw.get("unicorn", True):
        assert r.unicorn is None and "unicorn" in (r.unicorn_error or "")
        assert "unicorn" in r.engine_reason
    json.dumps(r.to_dict())       # the report is JSON-serialisable as --json prints it
