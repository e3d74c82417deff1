"""RDTSC, RDMSR, WRMSR, IRET and PAUSE reaching pyhv: the Python side of native/cpuhelpers.c.

Design: cpuhelpers.c interposes libunicorn's helper_rdtsc/rdmsr/wrmsr/iret_*/pause (ELF symbol
interposition, as blockhook.c does for the TB-start helper). `bind(unicorn)`, called
right after the import, gives it the addresses of libunicorn's own helpers (it forwards
to them) and of raise_exception_err_ra (#GP), and compares the CPUX86State offsets it was
compiled with against the originals' code: `mov r14, [rdi + ENV_UC]`, `test byte
[rdi + ENV_CR4], 4` and `test byte [rdi + ENV_HFLAGS], 3` in helper_rdtsc, and
helper_rdmsr's reads of ECX / writes of EAX, EDX at env + 8 / + 0 / + 0x10.
`available()` then runs a scratch instance through the whole path once (RDTSC, RDMSR and
WRMSR of IA32_TSC, an x2APIC WRMSR that reaches Python, one that faults with #GP, and an
IRET) and says whether vCPUs may use it; on any doubt they do not, and the engine keeps
CPUID's x2APIC and TSC-deadline bits clear and the TSC the host's.

`Cpu` mirrors `struct pyhv_emu_cpu`, one per vCPU, registered by unicorn handle
(`register`). Invariants: Python writes `tsc_ns`/`tsc_blocks` only on the emulating
thread (between emu_start calls or inside a hook); the guest TSC is
virtual ns + tsc_offset at 1 GHz (`TSC_HZ`), monotonic and shared by all vCPUs of a
machine because they share one virtual clock.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from typing import Any

from pyhv.engines.base import MsrFault

TSC_HZ = 1_000_000_000
MSR_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_uint32, ctypes.c_int32,
                          ctypes.POINTER(ctypes.c_uint64))
CB_DONE, CB_FAULT, CB_UNICORN = 0, 1, 2
VCPUS = 64


class Cpu(ctypes.Structure):
    """`struct pyhv_emu_cpu` (cpuhelpers.c)."""

    _fields_ = [
        ("ctl", ctypes.c_void_p),
        ("tsc_ns", ctypes.c_int64),
        ("tsc_blocks", ctypes.c_int64),
        ("ns_per_block", ctypes.c_int64),
        ("tsc_offset", ctypes.c_int64),
        ("route_apic", ctypes.c_int32),
        ("iret_seen", ctypes.c_int32),
        ("nmi_window", ctypes.c_int32),
        ("yield_on_pause", ctypes.c_int32),
        ("rdtsc", ctypes.c_uint64),
        ("msrs", ctypes.c_uint64),
        ("msr_cb", ctypes.c_void_p),
    ]

    def tsc(self, blocks: int) -> int:
        """The guest TSC now, `blocks` being the vCPU's block count."""
        ns = self.tsc_ns + (blocks - self.tsc_blocks) * self.ns_per_block
        return int(ns + self.tsc_offset) & 0xFFFFFFFFFFFFFFFF


class _Vcpu(ctypes.Structure):
    _fields_ = [("uc", ctypes.c_void_p), ("cpu", ctypes.c_void_p)]


class _State(ctypes.Structure):
    _fields_ = [
        ("orig_rdtsc", ctypes.c_void_p),
        ("orig_rdmsr", ctypes.c_void_p),
        ("orig_wrmsr", ctypes.c_void_p),
        ("orig_iret_protected", ctypes.c_void_p),
        ("orig_iret_real", ctypes.c_void_p),
        ("orig_pause", ctypes.c_void_p),
        ("raise_err_ra", ctypes.c_void_p),
        ("env_uc", ctypes.c_int64),
        ("env_cr4", ctypes.c_int64),
        ("env_hflags", ctypes.c_int64),
        ("vcpus", _Vcpu * (VCPUS + 1)),
    ]


_HELPERS = ("helper_rdtsc_x86_64", "helper_rdmsr_x86_64", "helper_wrmsr_x86_64",
            "helper_iret_protected_x86_64", "helper_iret_real_x86_64", "helper_pause_x86_64")
_bound = "not bound (unicorn not imported through pyhv.engines.emu._uc)"   # "" = bound
_checked: tuple[bool, str] | None = None


def _lib() -> Any:
    from pyhv.engines.emu import native
    return native._lib  # noqa: SLF001 - the shared object native/__init__.py loaded


def _state() -> _State | None:
    lib = _lib()
    if lib is None or not hasattr(lib, "pyhv_cpu_state"):
        return None
    fn = lib.pyhv_cpu_state
    fn.restype = ctypes.c_void_p
    addr = fn()
    return _State.from_address(addr) if addr else None


def _addr(lib: Any, name: str) -> int:
    try:
        return ctypes.cast(getattr(lib, name), ctypes.c_void_p).value or 0
    except AttributeError:
        return 0


def _offsets(rdtsc: bytes, rdmsr: bytes) -> tuple[int, int, int] | None:
    """(ENV_UC, ENV_CR4, ENV_HFLAGS) from unicorn 2.1.4's helper_rdtsc, if helper_rdmsr
    is also the one expected; None if either differs."""
    # helper_rdtsc: push r14; push r13; push r12; mov r12, rdi; push rbp; push rbx;
    # mov r14, [rdi+d32]; test byte [rdi+d32], 4; je; test byte [rdi+d32], 3
    if rdtsc[11:14] != b"\x4c\x8b\xb7" or rdtsc[18:20] != b"\xf6\x87" or \
            rdtsc[24] != 4 or rdtsc[27:29] != b"\xf6\x87" or rdtsc[33] != 3:
        return None
    # helper_rdmsr: ... mov rax, [rbx+8] (ECX) after the SVM check, stores to [rbx], [rbx+16]
    if rdmsr[0:1] != b"\x53" or b"\x48\x8b\x43\x08" not in rdmsr[:32] or \
            b"\x48\x89\x03\x48\x89\x53\x10" not in rdmsr[:0x70]:
        return None
    return (int.from_bytes(rdtsc[14:18], "little"), int.from_bytes(rdtsc[20:24], "little"),
            int.from_bytes(rdtsc[29:33], "little"))


def bind(unicorn: object) -> None:
    """Right after `import unicorn`: the originals' addresses, and the offsets checked."""
    global _bound
    state = _state()
    if state is None or unicorn is None:
        _bound = "no native code"
        return
    uclib = unicorn.unicorn_py3.unicorn.uclib  # type: ignore[attr-defined]
    lib = _lib()
    origs = [_addr(uclib, n) for n in _HELPERS]
    ours = [_addr(lib, n) for n in _HELPERS]
    if not all(origs) or any(o == m for o, m in zip(origs, ours, strict=True)):
        _bound = "libunicorn's RDTSC/MSR/IRET helpers not found or not interposed"
        return
    raise_ra = _addr(uclib, "raise_exception_err_ra_x86_64")
    if not raise_ra:
        _bound = "libunicorn's raise_exception_err_ra not found"
        return
    got = _offsets(ctypes.string_at(origs[0], 40), ctypes.string_at(origs[1], 0x70))
    if got != (state.env_uc, state.env_cr4, state.env_hflags):
        _bound = "libunicorn's helpers are not those of unicorn 2.1.4"
        return
    (state.orig_rdtsc, state.orig_rdmsr, state.orig_wrmsr, state.orig_iret_protected,
     state.orig_iret_real, state.orig_pause) = origs
    state.raise_err_ra = raise_ra
    _bound = ""


def register(handle: int, cpu: Cpu | None) -> bool:
    """Route the helpers of unicorn instance `handle` to `cpu` (None: no longer)."""
    lib = _lib()
    if lib is None:
        return False
    fn = lib.pyhv_cpu_register
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    fn.restype = ctypes.c_int
    return int(fn(handle, ctypes.addressof(cpu) if cpu is not None else None)) == 0


def make_callback(handler: Callable[[int, int | None], int | None]) -> Any:
    """A C callback for `Cpu.msr_cb` around handler(msr, value | None for a read) ->
    the value read (None: unicorn's helper does it); `MsrFault` (pyhv.engines.base) ->
    #GP."""
    def cb(msr: int, write: int, value: Any) -> int:
        try:
            got = handler(msr, int(value[0]) if write else None)
        except MsrFault:
            return CB_FAULT
        if got is None:
            return CB_UNICORN
        if not write:
            value[0] = got & 0xFFFFFFFFFFFFFFFF
        return CB_DONE
    return MSR_CB(cb)


# -- the scratch check --------------------------------------------------------------------

# 64-bit code at 0x1000 (RSP = 0x8000; an IRETQ frame at 0x7000 returns to 0x1030):
#   rdtsc; mov r8, rax; mov r9, rdx          rdtsc -> r8:r9
#   mov ecx, 0x10; rdmsr; mov r10, rax       IA32_TSC -> r10
#   mov ecx, 0x808; mov eax, 7; xor edx, edx; wrmsr   x2APIC TPR := 7 (handler)
#   mov rsp, 0x7000; iretq                   -> 0x1020 (flags IRET)
#   0x1030: mov ecx, 0x80f; wrmsr            faults (handler) -> #GP, emulation ends
_SCRATCH_CODE = bytes.fromhex(
    "0f31" "4989c0" "4989d1"
    "b910000000" "0f32" "4989c2"
    "b908080000" "b807000000" "31d2" "0f30"
    "48c7c400700000" "48cf")


def _scratch_check() -> str:
    """'' when the whole path works on a scratch instance, else what went wrong."""
    from pyhv.engines.emu import native
    from pyhv.engines.emu._uc import scratch_uc, unicorn, x86
    uc = scratch_uc()
    uc.mem_map(0, 0x10000)
    code = _SCRATCH_CODE.ljust(0x30, b"\x90") + bytes.fromhex("b90f0800000f30f4")
    uc.mem_write(0x1000, code)
    # a GDT (null, 64-bit code 0x08, data 0x10) and an IRETQ frame: RIP, CS, RFLAGS, RSP, SS
    uc.mem_write(0x6000, bytes(8) + (0x00AF9A000000FFFF).to_bytes(8, "little")
                 + (0x00CF92000000FFFF).to_bytes(8, "little"))
    uc.reg_write(x86.UC_X86_REG_GDTR, (0, 0x6000, 0x17, 0))
    frame = b"".join(v.to_bytes(8, "little") for v in (0x1030, 0x08, 2, 0x8000, 0x10))
    uc.mem_write(0x7000, frame)
    uc.reg_write(x86.UC_X86_REG_RSP, 0x8000)
    ctl = native.Ctl()
    cpu = Cpu()
    cpu.ctl = ctypes.addressof(ctl)
    cpu.tsc_ns, cpu.tsc_blocks, cpu.ns_per_block, cpu.tsc_offset = 5_000, 0, 10, 1_000
    cpu.route_apic = 1
    seen: list[tuple[int, int | None]] = []
    intr: list[int] = []

    def handler(msr: int, value: int | None) -> int | None:
        seen.append((msr, value))
        if msr == 0x80F:
            raise MsrFault
        return 0

    cb = make_callback(handler)
    cpu.msr_cb = ctypes.cast(cb, ctypes.c_void_p).value

    def on_intr(u: Any, intno: int, _ud: Any) -> None:
        intr.append(intno)
        u.emu_stop()

    uc.hook_add(unicorn.UC_HOOK_INTR, on_intr)
    if not register(uc._uch.value, cpu):
        return "the vCPU table is full"
    try:
        uc.emu_start(0x1000, 0x1100, 0, 40)
    except unicorn.UcError as e:
        return f"scratch run failed: {e}"
    finally:
        register(uc._uch.value, None)
    tsc = uc.reg_read(x86.UC_X86_REG_R8) | uc.reg_read(x86.UC_X86_REG_R9) << 32
    msr_tsc = uc.reg_read(x86.UC_X86_REG_R10)
    rip = uc.reg_read(x86.UC_X86_REG_RIP)
    want = [(0x808, 7), (0x80F, 7)]
    if tsc != 6_000 or msr_tsc != 6_000 or seen != want or intr != [13] or \
            rip != 0x1035 or not cpu.iret_seen:
        return (f"scratch run disagrees: tsc={tsc} msr={msr_tsc} seen={seen} "
                f"intr={intr} rip={rip:#x} iret={cpu.iret_seen}")
    return ""


def available() -> tuple[bool, str]:
    """(usable, a description): may vCPUs route RDTSC/MSRs/IRET through pyhv?"""
    global _checked
    if _checked is not None:
        return _checked
    from pyhv.engines.emu import native
    if os.environ.get("PYHV_EMU_CPU_HELPERS", "1") == "0":
        why = "disabled by PYHV_EMU_CPU_HELPERS=0"
    elif native.load()[0] is None:
        why = "no native code"
    elif _bound:
        why = _bound
    elif not native._preloaded:  # noqa: SLF001
        why = "libunicorn was loaded before pyhv's native code (unicorn imported first)"
    else:
        try:
            why = _scratch_check()
        except Exception as e:  # noqa: BLE001 - any doubt: not used
            why = f"scratch check failed: {type(e).__name__}: {e}"
    _checked = (False, f"host TSC, no x2APIC/TSC-deadline ({why})") if why else \
        (True, "RDTSC/RDMSR/WRMSR/IRET through pyhv (interposed helpers)")
    return _checked
