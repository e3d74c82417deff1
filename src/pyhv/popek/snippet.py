"""Run one snippet on one engine, in one of the two views, and say how it ended.

Design: every run gets a fresh machine (guest memory, engine, one vCPU), so nothing a
previous snippet did (a half-finished MMIO, a loaded LDT, a busy TSS) leaks into the next.
The snippet is written at CODE, followed by `mov byte [DONE], 0; jmp $`; the vCPU starts
in `layout.deprivileged_state` (CPL 3, the monitor's tables) or `layout.reference_state`
(CPL 0, the guest's own tables). The exit loop then waits for one of:

    MMIO write to DONE        the snippet completed: the final CpuState and DATA are kept
    MMIO write to EXC + N     vector N was delivered: the frame is read from the stack
    Halt                      HLT completed (only possible where HLT does not fault)
    port I/O                  recorded (reads return 0xff..), the run goes on
    anything else             an error with the engine's description

Bounds: at most MAX_EXITS exits, and a watchdog thread kicks the vCPU after `timeout`
seconds, so a snippet that loops (or an engine that does) ends as an error, never a hang.

Guest values are hostile: the exception frame is read only when the stack pointer lies
inside the stack the CPU should have switched to, every field is masked to its width,
and a vector the stubs do not announce is an error.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass, field
from typing import Literal

from pyhv.arch.x86.cpustate import CpuState
from pyhv.arch.x86.layout import ram_layout
from pyhv.engines.base import Engine, EngineVcpu
from pyhv.errors import PyhvError
from pyhv.exits import Halt, InternalError, Interrupted, IoIn, IoOut, MmioRead, MmioWrite, Shutdown
from pyhv.memory import GuestMemory
from pyhv.popek import layout as L

MAX_EXITS = 64
DEFAULT_TIMEOUT = 5.0
DATA_SNAPSHOT = 256
DONE_TAIL = b"\xc6\x04\x25" + struct.pack("<I", L.DONE) + b"\x00" + b"\xeb\xfe"

End = Literal["done", "exception", "halt", "error"]


@dataclass
class IoAccess:
    write: bool
    port: int
    size: int
    value: int


@dataclass
class SnippetResult:
    """How one run ended; `state`/`data` are the CPU and DATA at the end."""

    end: End
    vector: int | None = None
    error_code: int | None = None
    fault_rip: int | None = None
    fault_cs: int | None = None
    state: CpuState | None = None
    data: bytes = b""
    io: list[IoAccess] = field(default_factory=list)
    detail: str = ""
    exits: int = 0


def make_engine(name: str, mem: GuestMemory) -> Engine:
    if name == "kvm":
        from pyhv.engines.kvm import KvmEngine
        return KvmEngine(mem)
    if name == "emu":
        from pyhv.engines.emu import EmuEngine
        return EmuEngine(mem)
    raise ValueError(f"unknown engine {name!r}")


def run_snippet(engine_name: str, code: bytes, *, regs: dict[str, int] | None = None,
                data: bytes = b"", cpl0: bool = False, umip: bool = False,
                timeout: float = DEFAULT_TIMEOUT) -> SnippetResult:
    """Run `code` (then the DONE store) once on a fresh machine of `engine_name`."""
    image = code + DONE_TAIL
    if len(image) > L.CODE_MAX or len(data) > L.DATA_SIZE:
        raise ValueError("snippet or data too large for the probe layout")
    mem = GuestMemory.with_layout(ram_layout(L.RAM_SIZE))
    engine: Engine | None = None
    try:
        L.write_tables(mem)
        mem.write(L.CODE, image)
        mem.write(L.DATA, data)
        st = L.reference_state(L.CODE) if cpl0 else L.deprivileged_state(L.CODE, umip=umip)
        for name, value in (regs or {}).items():
            setattr(st, name, value & 0xFFFF_FFFF_FFFF_FFFF)
        engine = make_engine(engine_name, mem)
        vcpu = engine.create_vcpu(0)
        io: list[IoAccess] = []

        def pio(port: int, size: int, value: int | None) -> int:
            io.append(IoAccess(value is not None, port, size, value or 0))
            return (1 << (8 * size)) - 1

        vcpu.attach_io(pio, None)
        vcpu.set_state(st)
        result = _loop(vcpu, mem, io, timeout, cpl0)
        result.io = io
        return result
    except (PyhvError, OSError) as e:
        return SnippetResult("error", detail=f"{type(e).__name__}: {e}")
    finally:
        if engine is not None:
            engine.close()
        mem.close()


def _loop(vcpu: EngineVcpu, mem: GuestMemory, io: list[IoAccess], timeout: float,
          cpl0: bool) -> SnippetResult:
    timer = threading.Timer(timeout, vcpu.kick)
    timer.daemon = True
    timer.start()
    try:
        for n in range(1, MAX_EXITS + 1):
            ex = vcpu.run()
            if isinstance(ex, MmioWrite):
                if ex.addr == L.DONE:
                    return SnippetResult("done", state=vcpu.get_state(),
                                     data=mem.read(L.DATA, DATA_SNAPSHOT), exits=n)
                vector = ex.addr - L.EXC
                if vector in L.VECTORS:
                    return _exception(vector, vcpu.get_state(), mem, n, cpl0)
                return SnippetResult("error", detail=f"unexpected MMIO write at {ex.addr:#x}",
                                 exits=n)
            if isinstance(ex, IoIn):
                io.append(IoAccess(False, ex.port, ex.size, (1 << (8 * ex.size)) - 1))
                ex.data[:] = b"\xff" * len(ex.data)
                continue
            if isinstance(ex, IoOut):
                io.append(IoAccess(True, ex.port, ex.size,
                                   int.from_bytes(ex.data[:ex.size], "little")))
                continue
            if isinstance(ex, Halt):
                return SnippetResult("halt", state=vcpu.get_state(),
                                 data=mem.read(L.DATA, DATA_SNAPSHOT), exits=n)
            if isinstance(ex, Interrupted):
                return SnippetResult("error", detail=f"no result within {timeout:g} s "
                                 "(the watchdog stopped the vCPU)", exits=n)
            if isinstance(ex, MmioRead):
                return SnippetResult("error", detail=f"unexpected MMIO read at {ex.addr:#x}",
                                 exits=n)
            if isinstance(ex, InternalError):
                return SnippetResult("error", detail=ex.describe(), exits=n)
            if isinstance(ex, Shutdown):
                return SnippetResult("error", detail=f"shutdown: {ex.reason}", exits=n)
            return SnippetResult("error", detail=f"unexpected exit {type(ex).__name__}", exits=n)
        return SnippetResult("error", detail=f"no result after {MAX_EXITS} exits",
                         exits=MAX_EXITS)
    finally:
        timer.cancel()
        timer.join()    # a kick already under way finishes before the vCPU is closed


def _exception(vector: int, st: CpuState, mem: GuestMemory, exits: int,
               cpl0: bool) -> SnippetResult:
    """Decode the frame the CPU pushed for `vector` (64-bit: [err], RIP, CS, RFLAGS...)."""
    has_code = vector in L.ERROR_CODE_VECTORS
    size = 8 * (6 if has_code else 5)
    rsp = st.rsp
    lo, hi = ((L.USER_STACK_TOP - L.STACK_SIZE, L.USER_STACK_TOP) if cpl0
              else (L.KSTACK_TOP - L.STACK_SIZE, L.KSTACK_TOP))
    if not (lo <= rsp and rsp + size <= hi):
        return SnippetResult("exception", vector=vector, state=st, exits=exits,
                         detail=f"frame not on the expected stack (rsp={rsp:#x})")
    words = struct.unpack_from(f"<{size // 8}Q", mem.read(rsp, size))
    code = words[0] & 0xFFFF_FFFF if has_code else None
    rip, cs = words[1 if has_code else 0], words[2 if has_code else 1] & 0xFFFF
    return SnippetResult("exception", vector=vector, error_code=code, fault_rip=rip,
                     fault_cs=cs, state=st, exits=exits)
