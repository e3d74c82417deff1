"""Run one snippet on one engine, in one of the two views, and say how it ended.

Design: every run gets a fresh machine from pyhv's one machine builder (pyhv.machine), a
bare board of L.RAM_SIZE with no PC devices, so nothing a previous snippet did (a
half-finished MMIO, a loaded LDT, a busy TSS) leaks into the next; the engine comes from
the engine registry and the exits are routed by pyhv's one run loop (pyhv.runner). The
snippet is written at CODE, followed by `mov byte [DONE], 0; jmp $`; the vCPU starts in
`layout.deprivileged_state` (CPL 3, the monitor's tables) or `layout.reference_state`
(CPL 0, the guest's own tables). Two devices on the board's buses watch the snippet:

    ports (the whole space)    every access recorded; reads give all ones, as on a
                               bus with nothing there; the run goes on
    MMIO (everything above RAM)
        write to DONE          the snippet completed: the final CpuState and DATA are kept
        write to EXC + N       vector N was delivered (a stub's store): the frame is read
                               from the stack the CPU switched to
        any other access       an error naming the address
    HLT with interrupts off    the run loop's own "halt" ending (where HLT does not fault)
    anything else              an error with the engine's description

Each ending device asks the machine to stop (`request_stop`), and the run loop ends with
that reason. Bounds: the run loop's `max_exits` (MAX_EXITS) and `timeout`, so a snippet
that loops (or an engine that does) ends as an error, never a hang.

Guest values are hostile: the exception frame is read only when the stack pointer lies
inside the stack the CPU should have switched to, every field is masked to its width,
and a vector the stubs do not announce is an error.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Literal

from pyhv.arch.x86.cpustate import CpuState
from pyhv.errors import PyhvError
from pyhv.exits import InternalError, Shutdown
from pyhv.loader import LoadedGuest
from pyhv.machine import Machine, MachineConfig, StopRequest
from pyhv.memory import GuestMemory
from pyhv.popek import layout as L
from pyhv.runner import Runner

MAX_EXITS = 64
DEFAULT_TIMEOUT = 5.0
DATA_SNAPSHOT = 256
DONE_TAIL = b"\xc6\x04\x25" + struct.pack("<I", L.DONE) + b"\x00" + b"\xeb\xfe"
PORTS = 0x10000
ADDRESS_SPACE = 1 << 64

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


class PortRecorder:
    """Every port: each access recorded, reads all ones (nothing is there)."""

    def __init__(self) -> None:
        self.io: list[IoAccess] = []

    def read(self, offset: int, size: int) -> int:
        value = (1 << (8 * size)) - 1
        self.io.append(IoAccess(False, offset, size, value))
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        self.io.append(IoAccess(True, offset, size, value))


class Signals:
    """The MMIO space above RAM: the DONE store and the stubs' EXC + vector stores end the
    run with what they announce; any other access ends it as an error."""

    def __init__(self, machine: Machine, base: int) -> None:
        self.machine = machine
        self.base = base
        self.vector: int | None = None

    def read(self, offset: int, size: int) -> int:
        self._stop("probe-error", f"unexpected MMIO read at {self.base + offset:#x}")
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        addr = self.base + offset
        if addr == L.DONE:
            self._stop("done", "the snippet completed")
        elif addr - L.EXC in L.VECTORS:
            if self.machine.stop_request is None:
                self.vector = addr - L.EXC
            self._stop("exception", f"vector {addr - L.EXC:#x} delivered")
        else:
            self._stop("probe-error", f"unexpected MMIO write at {addr:#x}")

    def _stop(self, kind: str, detail: str) -> None:
        self.machine.request_stop(StopRequest(kind, 0, detail))


def run_snippet(engine_name: str, code: bytes, *, regs: dict[str, int] | None = None,
                data: bytes = b"", cpl0: bool = False, umip: bool = False,
                timeout: float = DEFAULT_TIMEOUT) -> SnippetResult:
    """Run `code` (then the DONE store) once on a fresh machine of `engine_name`."""
    image = code + DONE_TAIL
    if len(image) > L.CODE_MAX or len(data) > L.DATA_SIZE:
        raise ValueError("snippet or data too large for the probe layout")

    def setup(mem: GuestMemory) -> LoadedGuest:
        L.write_tables(mem)
        mem.write(L.CODE, image)
        mem.write(L.DATA, data)
        st = L.reference_state(L.CODE) if cpl0 else L.deprivileged_state(L.CODE, umip=umip)
        for name, value in (regs or {}).items():
            setattr(st, name, value & 0xFFFF_FFFF_FFFF_FFFF)
        return LoadedGuest("probe", st, "popek probe snippet")

    machine: Machine | None = None
    try:
        machine = Machine(MachineConfig(engine=engine_name, mem_size=L.RAM_SIZE, setup=setup,
                                        devices=False), lambda _out: None)
        ports = PortRecorder()
        signals = Signals(machine, L.RAM_SIZE)
        machine.pio.register(0, PORTS, ports, "popek ports")
        machine.mmio.register(L.RAM_SIZE, ADDRESS_SPACE - L.RAM_SIZE, signals, "popek signals")
        result = _outcome(machine, Runner(machine, timeout=timeout, max_exits=MAX_EXITS),
                          signals, timeout, cpl0)
        result.io = ports.io
        return result
    except (PyhvError, OSError) as e:
        return SnippetResult("error", detail=f"{type(e).__name__}: {e}")
    finally:
        if machine is not None:
            machine.close()


def _outcome(m: Machine, runner: Runner, signals: Signals, timeout: float,
             cpl0: bool) -> SnippetResult:
    res = runner.run()
    n = runner.stats.exits.total()
    assert m.vcpu is not None and m.memory is not None
    if res.reason == "interrupted":
        raise KeyboardInterrupt           # Ctrl-C ends the whole probe, not one snippet
    if res.reason in ("done", "halt"):
        return SnippetResult(res.reason, state=m.vcpu.get_state(),  # type: ignore[arg-type]
                             data=m.memory.read(L.DATA, DATA_SNAPSHOT), exits=n)
    if res.reason == "exception" and signals.vector is not None:
        return _exception(signals.vector, m.vcpu.get_state(), m.memory, n, cpl0)
    if res.reason == "timeout":
        detail = f"no result within {timeout:g} s (the watchdog stopped the vCPU)"
    elif res.reason == "exit-limit":
        detail = f"no result after {MAX_EXITS} exits"
    elif isinstance(runner.last_exit, InternalError):
        detail = runner.last_exit.describe()
    elif isinstance(runner.last_exit, Shutdown):
        detail = f"shutdown: {runner.last_exit.reason}"
    else:
        detail = res.detail or res.reason
    return SnippetResult("error", detail=detail, exits=n)


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
