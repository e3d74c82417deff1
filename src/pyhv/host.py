"""What this host offers for virtualization, and which engine pyhv picks by default.

Design: `probe_host()` gathers facts (CPU flags from /proc/cpuinfo, loaded KVM modules
from /sys/module, whether /dev/kvm opens, its API version and capabilities, whether
unicorn imports) into one `HostReport`. `kind` is decided from those facts, with the
reason recorded so `pyhv info` can explain it:

    vmx   Intel VT-x: the CPU has `vmx` and kvm_intel is loaded
    svm   AMD-V: the CPU has `svm` and kvm_amd is loaded
    pvm   KVM-PVM: /dev/kvm works through kvm_pvm, no vmx/svm flag; guest CPL 0 code
          is emulated instruction by instruction (docs/host.md), so Linux cannot run on it
    none  no usable /dev/kvm

The default engine: kvm for vmx/svm, emu otherwise (kvm stays selectable on pvm, where
it is the fast path for 64-bit user-mode guest code).
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class HostReport:
    machine: str = platform.machine()
    cpu_model: str = ""
    pcpus: int = os.cpu_count() or 1
    cpu_flags: dict[str, bool] = field(default_factory=dict)
    kvm_modules: list[str] = field(default_factory=list)
    kvm_device: bool = False
    kvm_usable: bool = False
    kvm_error: str | None = None
    kvm_api_version: int | None = None
    kvm_capabilities: dict[str, int] = field(default_factory=dict)
    kind: str = "none"
    kind_reason: str = ""
    umip: bool = False
    unicorn: str | None = None
    unicorn_error: str | None = None
    default_engine: str = "emu"
    engine_reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _cpuinfo() -> tuple[str, set[str]]:
    model = ""
    flags: set[str] = set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return model, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return model, flags


def probe_host(dev: str = "/dev/kvm") -> HostReport:
    r = HostReport()
    r.cpu_model, flags = _cpuinfo()
    r.cpu_flags = {f: f in flags for f in ("vmx", "svm", "umip", "hypervisor", "lm")}
    r.umip = "umip" in flags
    r.kvm_modules = sorted(m for m in ("kvm", "kvm_intel", "kvm_amd", "kvm_pvm")
                           if Path("/sys/module", m).exists())
    r.kvm_device = Path(dev).exists()
    try:
        from pyhv.kvm import Kvm

        with Kvm(dev) as kvm:
            r.kvm_usable = True
            r.kvm_api_version = kvm.api_version
            r.kvm_capabilities = kvm.capabilities()
    except Exception as e:  # HostError, OSError: reported, never raised
        r.kvm_error = str(e)
    try:
        # the emu engine's import first: it loads pyhv's native code before unicorn
        import pyhv.engines.emu._uc  # noqa: F401, I001 - before unicorn, on purpose
        import unicorn

        r.unicorn = str(getattr(unicorn, "__version__", "?"))
    except Exception as e:
        r.unicorn_error = f"the 'unicorn' package cannot be imported ({e})"

    if not r.kvm_usable:
        r.kind = "none"
        r.kind_reason = r.kvm_error or f"{dev} is not usable"
    elif "vmx" in flags and "kvm_intel" in r.kvm_modules:
        r.kind, r.kind_reason = "vmx", "the CPU has the vmx flag and kvm_intel is loaded"
    elif "svm" in flags and "kvm_amd" in r.kvm_modules:
        r.kind, r.kind_reason = "svm", "the CPU has the svm flag and kvm_amd is loaded"
    elif "kvm_pvm" in r.kvm_modules:
        r.kind = "pvm"
        r.kind_reason = ("/dev/kvm is served by kvm_pvm and the CPU has no vmx/svm flag: "
                         "guest CPL 0 code is emulated instruction by instruction")
    else:
        r.kind = "pvm" if not ({"vmx", "svm"} & flags) else "vmx" if "vmx" in flags else "svm"
        r.kind_reason = ("/dev/kvm works but the CPU shows neither vmx nor svm: treating it "
                         "as a software-assisted KVM" if r.kind == "pvm" else
                         f"the CPU has the {r.kind} flag")

    if r.kind in ("vmx", "svm"):
        r.default_engine = "kvm"
        r.engine_reason = f"hardware virtualization ({r.kind}) runs guest code natively"
    elif r.unicorn is not None:
        r.default_engine = "emu"
        r.engine_reason = ("no VT-x/AMD-V: the software CPU (unicorn) runs guest kernels; "
                           "--engine kvm stays available" if r.kvm_usable else
                           "no usable /dev/kvm: the software CPU (unicorn) runs guests")
    else:
        r.default_engine = "kvm" if r.kvm_usable else "none"
        r.engine_reason = (r.unicorn_error or "") + (
            "; falling back to kvm" if r.kvm_usable else "; no engine can run here")
    return r
