"""What this host's KVM-PVM lets pyhv do: the probe behind docs/pvm.md (issue 13).

Usage: `.venv/bin/python tools/pvm_probe.py [--json]` (needs /dev/kvm, gcc's `as` and
`objcopy`). It prints one line per fact, `name: value`; `--json` prints them as one
JSON object instead (tests/bt/test_pvm_probe.py reads that).

Design: every fact is observed, nothing assumed. Host-side facts come from sysfs and
KVM's ioctls (the module's parameters, KVM_GET_SUPPORTED_CPUID's hypervisor leaves,
KVM_GET_MSR_INDEX_LIST, KVM_GET/SET_MSRS of the PVM MSRs on a vCPU). Guest-side facts
come from tiny 64-bit snippets (assembled here with `as`) run at CPL 3 on a fresh trap
engine vCPU each (engines/trap: the monitor's GDT/IDT/stubs and its flat 4 GiB map), by
raw KVM_RUN: an exception reaches the monitor's stub (an MMIO exit naming the vector,
the frame read from the monitor's stack), a store to DONE ends the snippet. Each
snippet is bounded (a few exits), and every VM is closed after its experiment.
"""

from __future__ import annotations

import json
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pyhv.arch.x86 import boot, layout
from pyhv.engines.trap import monitor as MON
from pyhv.engines.trap.engine import TrapEngine, TrapVcpu
from pyhv.exits import MmioRead, MmioWrite
from pyhv.kvm import Kvm
from pyhv.memory import GuestMemory

CODE = 0x10_0000
DATA = 0x20_0000          # results the snippets store
TABLES = 0x30_0000        # page tables for the upper-half test
UPPER_PAGE = 0x40_0000    # the 2 MiB page mapped there
DONE = 0xF000_0000        # no RAM: a store is an MMIO exit (the flat map covers 4 GiB)
PVM_MSRS = {"MSR_PVM_LINEAR_ADDRESS_RANGE": 0x4B564DF0, "MSR_PVM_VCPU_STRUCT": 0x4B564DF1,
            "MSR_PVM_SUPERVISOR_RSP": 0x4B564DF2, "MSR_PVM_SUPERVISOR_REDZONE": 0x4B564DF3,
            "MSR_PVM_EVENT_ENTRY": 0x4B564DF4, "MSR_PVM_RETU_RIP": 0x4B564DF5,
            "MSR_PVM_RETS_RIP": 0x4B564DF6, "MSR_PVM_SWITCH_CR3": 0x4B564DF7}
LSTAR, STAR = 0xC000_0082, 0xC000_0081

SNIPPETS = f"""
    .intel_syntax noprefix
    .code64
    .macro done
    mov rdx, {DONE:#x}
    mov [rdx], al
    .endm
    .macro store4
    mov [{DATA:#x}], eax
    mov [{DATA + 4:#x}], ebx
    mov [{DATA + 8:#x}], ecx
    mov [{DATA + 12:#x}], edx
    .endm
    .globl cpuid_plain, cpuid_synth, sys_call, sys_next, lstar_entry, lstar_cli, int80, int3_
    .globl int2e, upper, mov_cs, exit_loop
exit_loop:                   /* one MMIO exit per store, forever */
    mov rdx, {DONE:#x}
1:  mov [rdx], al
    jmp 1b
cpuid_plain:                 /* RDI = the leaf */
    mov eax, edi
    xor ecx, ecx
    cpuid
    store4
    done
cpuid_synth:                 /* PVM_SYNTHETIC_CPUID: invlpg 0xffffffffff4d5650; cpuid */
    mov eax, edi
    xor ecx, ecx
    .byte 0x0f, 0x01, 0x3c, 0x25, 0x50, 0x56, 0x4d, 0xff
    cpuid
    store4
    done
sys_call:
    mov rsp, {DATA + 0x800:#x}
    syscall
sys_next:
    done
lstar_entry:                 /* where the real LSTAR points */
    mov [{DATA + 16:#x}], rcx
    mov [{DATA + 24:#x}], r11
    mov [{DATA + 32:#x}], rsp
    mov ax, cs
    mov [{DATA + 40:#x}], ax
    done
lstar_cli:                   /* a privileged instruction where SYSCALL landed */
    cli
    done
mov_cs:
    mov ax, cs
    mov [{DATA:#x}], ax
    mov ax, ss
    mov [{DATA + 2:#x}], ax
    done
int80:
    int 0x80
    done
int3_:
    int3
    done
int2e:
    int 0x2e
    done
upper:                       /* RDI = an address to read */
    mov rax, [rdi]
    mov [{DATA:#x}], rax
    done
"""


def assemble(work: Path) -> tuple[bytes, dict[str, int]]:
    src, obj, binf = work / "probe.s", work / "probe.o", work / "probe.bin"
    src.write_text(SNIPPETS)
    subprocess.run(["as", "--64", "-o", str(obj), str(src)], check=True, timeout=60,
                   capture_output=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(obj), str(binf)],
                   check=True, timeout=60, capture_output=True)
    syms: dict[str, int] = {}
    out = subprocess.run(["nm", str(obj)], check=True, timeout=60, capture_output=True,
                         text=True).stdout
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] in "Tt":
            syms[parts[2]] = int(parts[0], 16)
    return binf.read_bytes(), syms


class Guest:
    """A fresh trap-engine vCPU at CPL 3 with the snippets at CODE (one experiment)."""

    def __init__(self, code: bytes) -> None:
        self.mem = GuestMemory.with_layout(layout.ram_layout(16 << 20))
        self.mem.write(CODE, code)
        self.engine = TrapEngine(self.mem, umip=False)
        self.vcpu: TrapVcpu = self.engine.create_vcpu(0)
        self.kv = self.vcpu.kv

    def start(self, entry: int, rdi: int = 0) -> None:
        st = boot.long_mode(self.mem, entry)
        st.rdi = rdi
        self.vcpu.set_state(st)

    def run(self, exits: int = 4) -> dict[str, Any]:
        """Run until DONE or an exception (or `exits` other exits): what stopped it."""
        for _ in range(exits):
            ex = self.kv.run()
            if isinstance(ex, MmioWrite) and ex.addr == DONE:
                return {"stop": "done"}
            if isinstance(ex, MmioWrite) and MON.SIGNAL_GPA <= ex.addr < MON.SIGNAL_GPA + 256:
                assert self.engine.area is not None
                vector = ex.addr - MON.SIGNAL_GPA
                err, rip, cs, _fl, rsp, _ss = self.engine.area.read_frame(vector)
                sr = self.kv.get_sregs()
                return {"stop": "exception", "vector": vector, "error_code": err,
                        "rip": rip, "cs": cs, "rsp": rsp, "cr2": int(sr.cr2),
                        "cr3": int(sr.cr3)}
            if not isinstance(ex, MmioRead | MmioWrite):
                return {"stop": type(ex).__name__, "detail": str(ex)}
        return {"stop": "too many exits"}

    def data(self, off: int, fmt: str) -> tuple[Any, ...]:
        return struct.unpack(fmt, self.mem.read(DATA + off, struct.calcsize(fmt)))

    def close(self) -> None:
        self.vcpu.close()
        self.engine.close()


def _ranges(by_slot: dict[int, str]) -> dict[str, str]:
    """{slot: outcome} -> {"first..last (VA)": outcome} over runs of equal outcomes."""
    out: dict[str, str] = {}
    slots = sorted(by_slot)
    start = slots[0]
    for a, b in zip(slots, slots[1:] + [None], strict=True):
        if b is None or by_slot[b] != by_slot[a] or b != a + 1:
            va = (0xFFFF << 48) | (start << 39)
            out[f"slots {start}..{a} (from {va:#x})"] = by_slot[a]
            start = b if b is not None else start
    return out


def _regs4(g: Guest) -> str:
    a, b, c, d = g.data(0, "<4I")
    sig = struct.pack("<3I", b, c, d).rstrip(b"\0").decode("latin-1")
    return f"eax={a:#x} signature={sig!r}"


def probe() -> dict[str, Any]:
    facts: dict[str, Any] = {}
    mod = Path("/sys/module/kvm_pvm")
    facts["kvm_pvm module"] = mod.exists()
    params = mod / "parameters"
    if params.is_dir():
        facts["kvm_pvm parameters"] = {p.name: p.read_text().strip()
                                       for p in sorted(params.iterdir())}
    with Kvm() as kvm:
        leaves = {e.function: e for e in kvm.supported_cpuid()
                  if 0x4000_0000 <= e.function <= 0x4000_01FF}
        for fn, e in sorted(leaves.items()):
            sig = struct.pack("<3I", e.ebx, e.ecx, e.edx).rstrip(b"\0").decode("latin-1")
            facts[f"supported cpuid {fn:#x}"] = (f"eax={e.eax:#x} ebx={e.ebx:#x} "
                                                 f"ecx={e.ecx:#x} edx={e.edx:#x} "
                                                 f"({sig!r})")
        listed = set(kvm.msr_index_list())
        facts["PVM MSRs in KVM_GET_MSR_INDEX_LIST"] = sorted(
            n for n, i in PVM_MSRS.items() if i in listed)
    with tempfile.TemporaryDirectory() as tmp:
        code, sym = assemble(Path(tmp))
    at = {k: CODE + v for k, v in sym.items()}

    g = Guest(code)
    try:
        got = g.kv.get_msrs(list(PVM_MSRS.values()))
        facts["PVM MSRs readable on a vCPU"] = {n: f"{got[i]:#x}" for n, i in PVM_MSRS.items()
                                                if i in got}
        facts["PVM MSRs refused on a vCPU"] = sorted(n for n, i in PVM_MSRS.items()
                                                     if i not in got)
        # CPUID at CPL 3: plain, then the PVM synthetic form
        for leaf in (0x4000_0000, 0x4000_0001):
            g.start(at["cpuid_plain"], leaf)
            r = g.run()
            facts[f"cpl3 cpuid {leaf:#x}"] = _regs4(g) if r["stop"] == "done" else r
            g.start(at["cpuid_synth"], leaf)
            r = g.run()
            facts[f"cpl3 synthetic cpuid {leaf:#x}"] = (_regs4(g) if r["stop"] == "done"
                                                       else r)
        g.start(at["mov_cs"])
        r = g.run()
        cs, ss = g.data(0, "<HH")
        facts["cpl3 mov r, cs/ss"] = (f"{cs:#06x}/{ss:#06x} (KVM_SET_SREGS loaded "
                                      f"{g.vcpu.real_cs:#06x}/{g.vcpu.real_ss:#06x})")
        for name in ("int80", "int3_", "int2e"):
            g.start(at[name])
            r = g.run()
            facts[f"cpl3 {name.rstrip('_')}"] = (f"vector {r['vector']}" if r["stop"] ==
                                                 "exception" else r)
        # SYSCALL at CPL 3: where does it go? (EFER.SCE is 0 in the vCPU's EFER)
        g.kv.set_msrs({LSTAR: at["lstar_entry"]})
        g.start(at["sys_call"])
        g.kv.set_msrs({LSTAR: at["lstar_entry"]})
        r = g.run()
        if r["stop"] == "done":
            rcx, r11, rsp = g.data(16, "<3Q")
            (cs,) = g.data(40, "<H")
            sr = g.kv.get_sregs()
            facts["cpl3 syscall"] = {
                "lands at LSTAR": True,
                "rcx is the next rip": rcx == at["sys_next"], "r11": f"{r11:#x}",
                "rsp unchanged": rsp == DATA + 0x800,
                "cs": f"{cs:#06x}", "cr3 unchanged": int(sr.cr3) == MON.CR3,
                "efer": f"{int(sr.efer):#x}"}
        else:
            facts["cpl3 syscall"] = r
        g.start(at["sys_call"])
        g.kv.set_msrs({LSTAR: at["lstar_cli"]})
        r = g.run()
        facts["cli where syscall landed"] = (f"vector {r['vector']} at cs {r['cs']:#06x}"
                                             if r["stop"] == "exception" else r)
        # what one exit costs: a store to DONE from CPL 3, resumed at once (a timing,
        # printed, never asserted: this host is shared and noisy)
        g.start(at["exit_loop"])
        g.kv.run()
        runs = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(500):
                g.kv.run()
            runs.append((time.perf_counter() - t0) / 500 * 1e6)
        facts["cpl3 MMIO exit round trip, us (median of 5 x 500)"] = round(
            statistics.median(runs), 1)
        # the upper half: PML4 slots mapped (U=1) to a 2 MiB page, read at CPL 3
        assert g.engine.area is not None
        view = g.engine.area.view
        g.mem.write(TABLES, struct.pack("<Q", (TABLES + 0x1000) | 0x7))       # PDPT[0]
        g.mem.write(TABLES + 0x1000, struct.pack("<Q", UPPER_PAGE | 0x87))   # PD[0], PS
        g.mem.write(UPPER_PAGE, struct.pack("<Q", 0x5AFE))
        upper: dict[int, str] = {}
        errs: set[int] = set()
        for slot in range(256, 511):
            off = MON.PT_OFF + 8 * slot
            old = bytes(view[off:off + 8])
            struct.pack_into("<Q", view, off, TABLES | 0x7)
            va = (0xFFFF << 48) | (slot << 39)
            g.start(at["upper"], va)
            r = g.run()
            if r["stop"] == "done":
                (val,) = g.data(0, "<Q")
                upper[slot] = "read ok" if val == 0x5AFE else f"read {val:#x}"
            else:
                upper[slot] = "#PF" if r.get("vector") == 14 else str(r)
                if r.get("vector") == 14:
                    errs.add(r["error_code"])
            view[off:off + 8] = old
        facts["cpl3 read of an upper-half page, by PML4 slot"] = _ranges(upper)
        # the code varies between runs: 0x4 (not present) or 0xd (reserved bit)
        facts["upper-half #PF error codes"] = sorted(f"{e:#x}" for e in errs)
        del view
    finally:
        g.close()
    return facts


def main() -> int:
    facts = probe()
    if "--json" in sys.argv[1:]:
        print(json.dumps(facts, indent=1, sort_keys=True))
    else:
        for k, v in facts.items():
            print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
