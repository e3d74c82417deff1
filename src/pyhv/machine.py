"""The machine builder: a pyhv PC, assembled in the order a PC comes up.

    1. choose the engine             (kvm, emu; `auto` asks pyhv.host)
    2. guest RAM                     (layout.ram_layout: split around the MMIO hole)
    3. the kernel                    (loaders validate everything before writing RAM)
    4. time                          (host clock for hardware engines, virtual for emu)
    5. the interrupt controllers     (the 8259 pair; the I/O APIC at 0xfec00000 and a local
                                      APIC per vCPU at 0xfee00000, on one APIC bus; each
                                      ISA IRQ goes to both the 8259 and the I/O APIC,
                                      IRQ 0 on GSI 2; the 8259 reaches the vCPU through
                                      its local APIC's LINT0, the virtual wire)
    6. the devices, on the port bus  (16550, 8254 + port B, RTC, i8042, fw_cfg,
                                      debug-exit, boot timer), and the PCI bus with
                                      its host bridge and virtio devices (devices/pci,
                                      devices/virtio: BARs on the MMIO bus)
    7. the engine, its vCPU, the entry state from the loader

Design: the machine knows devices and engines only through their interfaces: a device
offers `regions()` for the buses and IRQ lines from the PIC; an engine offers vCPUs that
run and return exits (`pyhv.engines.base`). Nothing here depends on which engine runs,
so the same machine serves KVM on a VT-x host and the software CPU here.

Devices that work off the run-loop thread (a virtio disk's I/O thread) hand their
results back through `deferred` (devices/deferred.py), which `poll_devices` runs; the
runner makes posting kick the vCPU. `close()` closes the devices (a disk completes its
in-flight writes, flushes and releases its image lock) before guest RAM goes away.

Devices that end the run (debug-exit, the i8042's reset line) call `request_stop`, which
records why and kicks the vCPU; the run loop (pyhv.runner) acts on it. Everything a run
can fail on (a bad image, too little memory, a missing engine, an engine option the
engine refuses) raises a `PyhvError` from the constructor before any guest code runs,
and `close()` releases what was built.

Two variations, for guests that are not a kernel image on a PC: `MachineConfig.setup`
prepares RAM and returns the entry state itself instead of step 3's loader, and
`devices=False` builds a bare board: steps 5 and 6 are skipped, so the buses are empty
(the caller may register its own devices on them) and the vCPU has no interrupt source.
The popek probe runs its snippets on such machines, through the same run loop.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pyhv.arch.x86 import acpi, boot, layout, mptable
from pyhv.arch.x86.cpuid import APIC, DEFAULT_MODEL
from pyhv.arch.x86.cpustate import CpuState
from pyhv.clock import Clock, HostClock, TimerQueue, VirtualClock
from pyhv.devices.acpipm import AcpiPm
from pyhv.devices.apicbus import ApicBus
from pyhv.devices.boottimer import BootTimer
from pyhv.devices.bus import Bus
from pyhv.devices.debugexit import DebugExit
from pyhv.devices.deferred import DeferredCalls
from pyhv.devices.fwcfg import FwCfg
from pyhv.devices.i8042 import I8042
from pyhv.devices.ioapic import IOAPIC_BASE_ADDR, IOAPIC_MMIO_SIZE, IoApic, isa_gsi
from pyhv.devices.irq import FanOutLine, IrqLine
from pyhv.devices.lapic import APIC_BASE_ADDR, APIC_MMIO_SIZE, ApicFault, LocalApic
from pyhv.devices.pci.host import PCI_IRQS, PciHost
from pyhv.devices.pic8259 import PicPair
from pyhv.devices.pit8254 import Pit8254, SystemControlPortB
from pyhv.devices.rtc import Rtc
from pyhv.devices.serial16550 import Serial16550
from pyhv.engines import engine_class
from pyhv.engines.base import Engine, EngineVcpu, MsrFault, MsrHandler
from pyhv.errors import ConfigError, HostError
from pyhv.loader import BootRequest, LoadedGuest, load
from pyhv.memory import GuestMemory

if TYPE_CHECKING:
    from pyhv.devices.pci.function import PciFunction

MAX_MEM = 1 << 40   # 1 TiB: beyond any host pyhv targets; the host check comes first
MAX_CPUS = 16
SMP_ENGINES = ("emu", "kvm")   # engines whose vCPUs the run loop can run (docs/apic.md)


@dataclass
class MachineConfig:
    kernel: Path | None = None        # the image step 3 loads (unless `setup` is given)
    cmdline: str = ""
    initrd: Path | None = None
    format: str = "auto"
    load_addr: int | None = None
    mem_size: int = 128 << 20
    engine: str = "auto"
    strict_io: bool = False
    n_cpus: int = 1
    engine_options: dict[str, str] = field(default_factory=dict)   # checked by the engine
    # Prepares RAM and returns the entry state, instead of loading `kernel`.
    setup: Callable[[GuestMemory], LoadedGuest] | None = None
    devices: bool = True              # False: a bare board (empty buses, no 8259)
    # Extra PCI functions: each is called with (memory, deferred) and returns a
    # PciFunction (virtio devices: see pyhv.devices.virtio), added in order, slots 1...
    pci_devices: list[Callable[[GuestMemory, DeferredCalls], PciFunction]] = \
        field(default_factory=list)
    # A snapshot's RAM file: guest RAM is mapped from it copy-on-write, and steps 2b and
    # 3 (tables, kernel) and the entry state are skipped: pyhv.vmstate.apply sets them
    restore_ram: Path | None = None


@dataclass
class StopRequest:
    """Why a device (or the user) wants the run to end."""

    kind: str                 # "debug-exit", "reset", "escape", "panic", "user"
    status: int = 0
    detail: str = ""


def resolve_engine(name: str) -> str:
    """`auto` -> the engine pyhv.host recommends for this host; others pass through."""
    if name != "auto":
        return name
    from pyhv.host import probe_host
    report = probe_host()
    if report.default_engine == "none":
        raise HostError(f"no engine can run here: {report.engine_reason}")
    return report.default_engine


def check_memory(size: int) -> None:
    """Refuse sizes below the minimum or beyond what this host can back."""
    if size < layout.MIN_RAM:
        raise ConfigError(f"--mem {size} bytes is below the minimum of "
                          f"{layout.MIN_RAM >> 20} MiB")
    if size % 4096:
        raise ConfigError(f"--mem must be a multiple of 4 KiB (got {size} bytes)")
    if size > MAX_MEM:
        raise ConfigError(f"--mem {size >> 30} GiB is more than pyhv supports (1 TiB)")
    try:
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return
    if size > host:
        raise ConfigError(f"--mem {size >> 20} MiB is more than this host's "
                          f"{host >> 20} MiB of RAM")


class LapicWindow:
    """The xAPIC page at 0xfee00000: each vCPU sees its own local APIC there, so accesses
    go to the APIC of the vCPU the run loop is running (`machine.current_cpu`)."""

    def __init__(self, machine: Machine) -> None:
        self._m = machine

    def read(self, offset: int, size: int) -> int:
        return self._m.lapics[self._m.current_cpu].read(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        m = self._m
        m.lapics[m.current_cpu].write(offset, size, value)
        if offset == 0x300 and len(m.vcpus) > 1:
            # an IPI went out: end the sender's slice, so the target runs next
            m.vcpus[m.current_cpu].kick()


@dataclass
class Devices:
    pic: PicPair
    ioapic: IoApic
    serial: Serial16550
    pit: Pit8254
    rtc: Rtc
    i8042: I8042
    acpi_pm: AcpiPm
    fwcfg: FwCfg
    debug_exit: DebugExit
    boot_timer: BootTimer
    pci: PciHost
    all: list[object] = field(default_factory=list)


class Machine:
    """One guest: memory, devices on buses, an engine with its vCPUs, a loaded kernel
    (or, with `setup` and `devices=False`, whatever guest and devices the caller adds)."""

    def __init__(self, config: MachineConfig, console: Callable[[bytes], None]) -> None:
        self.config = config
        self.created_at = time.monotonic()
        self.boot_host_s: float | None = None    # host seconds from creation to /init
        self.stop_request: StopRequest | None = None
        self._stop_lock = threading.Lock()
        self.memory: GuestMemory | None = None
        self.engine: Engine | None = None
        self.vcpu: EngineVcpu | None = None      # vCPU 0, the bootstrap processor
        self.vcpus: list[EngineVcpu] = []
        # per vCPU: waiting for a SIPI (an AP before its start, or after an INIT)
        self.wait_sipi: list[bool] = []
        self.restarted: list[bool] = []   # INIT or SIPI changed the vCPU's state
        self.sipi_count = 0
        # several vCPUs on threads (kvm): devices, timers and APICs under this lock
        self.lock = threading.RLock()
        self._devices: Devices | None = None
        self.deferred = DeferredCalls()
        self._pci_functions: list[PciFunction] = []
        self.apic_bus = ApicBus()
        self.lapics: list[LocalApic] = []
        self.current_cpu = 0
        try:
            self._build(config, console)
        except BaseException:
            self.close()
            raise

    def _build(self, config: MachineConfig, console: Callable[[bytes], None]) -> None:
        # 1. the engine: known and able to run here, before anything is allocated
        self.engine_name = resolve_engine(config.engine)
        cls = engine_class(self.engine_name)
        why = cls.probe()
        if why is not None:
            raise HostError(f"engine {self.engine_name!r} cannot run here: {why}")
        engine_args = cls.parse_options(config.engine_options)

        # 2. guest RAM
        if not 1 <= config.n_cpus <= MAX_CPUS:
            raise ConfigError(f"--cpus {config.n_cpus}: pyhv runs 1 to {MAX_CPUS} vCPUs")
        if config.n_cpus > 1 and self.engine_name not in SMP_ENGINES:
            raise ConfigError(f"--cpus {config.n_cpus}: engine {self.engine_name!r} runs one "
                              f"vCPU (several: {', '.join(SMP_ENGINES)})")
        if config.n_cpus > 1 and not config.devices:
            raise ConfigError("several vCPUs need the machine's APICs (devices=True)")
        check_memory(config.mem_size)
        self.memory = GuestMemory.with_layout(layout.ram_layout(config.mem_size),
                                              backing=config.restore_ram)

        # 2b. firmware tables (ACPI, MP) in the BIOS area, before the kernel, so that an
        # image loaded over 0xe0000-0xfffff keeps its own bytes
        if config.devices and config.restore_ram is None:
            self._install_tables(config)

        # 3. the kernel, validated and written into RAM
        if config.restore_ram is not None:
            self.guest: LoadedGuest = LoadedGuest(
                "restored", CpuState(), f"a snapshot's guest ({config.restore_ram.parent})")
        elif config.setup is not None:
            self.guest = config.setup(self.memory)
        elif config.kernel is not None:
            self.guest = load(self.memory, BootRequest(
                kernel=config.kernel, cmdline=config.cmdline, initrd=config.initrd,
                format=config.format, load_addr=config.load_addr))
        else:
            raise ConfigError("no kernel to load")

        # 4. time
        self.clock: Clock = VirtualClock() if cls.virtual_time else HostClock()
        self.timers = TimerQueue(self.clock)

        # 5, 6. the interrupt controller and the devices on the buses (a bare board: none)
        self.pio = Bus("port I/O", strict=config.strict_io)
        self.mmio = Bus("MMIO", strict=config.strict_io)
        if config.devices:
            self._build_devices(config, console)

        # 7. the engine, its vCPUs, the loader's entry state on the BSP; the APs wait for
        # INIT/SIPI from the guest, as on a PC
        self.engine = cls(self.memory, **engine_args)
        for i in range(config.n_cpus):
            v = self.engine.create_vcpu(i)
            v.set_cpu_count(config.n_cpus)
            self.vcpus.append(v)
            self.wait_sipi.append(i > 0)
            self.restarted.append(False)
            if self._devices is not None:
                v.set_interrupt_source(self.lapics[i] if config.n_cpus == 1 or
                                       cls.virtual_time else
                                       _Locked(self.lapics[i], self.lock))
                v.set_apic_present(True)
                if v.attach_msr(self._msr_handler(i, locked=not cls.virtual_time)):
                    tsc = v.guest_tsc()
                    if tsc is not None:
                        self.lapics[i].tsc, self.lapics[i].tsc_hz = tsc
            else:
                v.set_interrupt_source(None)
        self.vcpu = self.vcpus[0]
        if config.restore_ram is None:
            self.vcpu.set_state(self.guest.entry)

    def _install_tables(self, config: MachineConfig) -> None:
        assert self.memory is not None
        ioapic_id = config.n_cpus
        routes = pci_routes()
        acpi.install(self.memory, acpi.AcpiConfig(n_cpus=config.n_cpus, ioapic_id=ioapic_id,
                                                  pci_routes=routes))
        mptable.install(self.memory, config.n_cpus, ioapic_id,
                        cpu_signature=DEFAULT_MODEL.signature(),
                        cpu_features=DEFAULT_MODEL.features_edx | APIC, pci_routes=routes)

    def _build_devices(self, config: MachineConfig, console: Callable[[bytes], None]) -> None:
        pic = PicPair()
        ioapic = IoApic(self.apic_bus, apic_id=config.n_cpus)
        self.lapics = [LocalApic(i, self.apic_bus, self.clock, self.timers, bsp=(i == 0),
                                 pic=pic if i == 0 else None)
                       for i in range(config.n_cpus)]
        for i, lapic in enumerate(self.lapics):
            lapic.on_init = lambda i=i: self._init_cpu(i)            # type: ignore[misc]
            lapic.on_sipi = lambda v, i=i: self._start_cpu(i, v)     # type: ignore[misc]

        def isa(n: int) -> IrqLine:
            return FanOutLine(pic.irq_line(n), ioapic.irq_line(isa_gsi(9 if n == 2 else n)))

        pm = acpi.PmPorts()
        pit = Pit8254(self.clock, self.timers, isa(0))
        self._devices = Devices(
            pic=pic,
            ioapic=ioapic,
            serial=Serial16550(isa(4), console),
            pit=pit,
            rtc=Rtc(self.clock, self.timers, isa(8), ram_size=config.mem_size,
                    n_cpus=config.n_cpus),
            i8042=I8042(isa(1), isa(12),
                        lambda: self.request_stop(StopRequest("reset", 0, "i8042 reset"))),
            acpi_pm=AcpiPm(self.clock, isa(pm.sci_irq),
                           on_poweroff=lambda: self.request_stop(StopRequest(
                               "poweroff", 0, "ACPI S5 through PM1a_CNT")),
                           on_reset=lambda: self.request_stop(StopRequest(
                               "reset", 0, "ACPI reset register")),
                           evt=pm.pm1a_evt, cnt=pm.pm1a_cnt, tmr=pm.pm_tmr,
                           reset=pm.reset, reset_value=pm.reset_value,
                           s5_slp_typ=acpi.S5_SLP_TYP),
            fwcfg=FwCfg(config.mem_size, config.n_cpus),
            debug_exit=DebugExit(self._debug_exit),
            boot_timer=BootTimer(self.clock, self._booted),
            pci=PciHost(self.pio, self.mmio, self.memory, isa,
                        lambda irq: _level_triggered(pic, irq)),
        )
        d = self._devices
        d.all = [pic, d.serial, pit, SystemControlPortB(pit), d.rtc, d.i8042, d.acpi_pm,
                 d.fwcfg, d.debug_exit]
        for dev in d.all:
            for base, length, device, name in dev.regions():  # type: ignore[attr-defined]
                self.pio.register(base, length, device, name)
        self.pio.register(layout.BOOT_TIMER_PORT, 1, d.boot_timer, "boot timer")
        for base, length, device, name in d.pci.regions():
            self.pio.register(base, length, device, name)
        assert self.memory is not None
        for make in config.pci_devices:
            fn = make(self.memory, self.deferred)
            attach_msi = getattr(fn, "attach_msi", None)
            if attach_msi is not None:          # MSI-X messages onto the APIC bus
                attach_msi(self.apic_bus.send)
            self._pci_functions.append(fn)
            d.pci.add(fn)
        self.mmio.register(APIC_BASE_ADDR, APIC_MMIO_SIZE, LapicWindow(self), "lapic")
        self.mmio.register(IOAPIC_BASE_ADDR, IOAPIC_MMIO_SIZE, ioapic, "ioapic")

    @property
    def pci_functions(self) -> list[PciFunction]:
        """The PCI functions `config.pci_devices` made (virtio devices), in slot order."""
        return list(self._pci_functions)

    @property
    def devices(self) -> Devices:
        """The PC's devices (a bare board has none: AttributeError)."""
        if self._devices is None:
            raise AttributeError("a bare machine (devices=False) has no devices")
        return self._devices

    # ------------------------------------------------------------------ for the run loop

    def poll_devices(self) -> None:
        """Device work the run-loop thread does between exits: host input into the UART,
        results other threads posted (disk completions)."""
        self.deferred.run_pending()
        if self._devices is not None:
            self._devices.serial.poll()

    def interrupt_pending(self) -> bool:
        """The interrupt controller's INTR pin (what wakes a guest halted with IF=1)."""
        if not self.lapics:
            return False
        lapic = self.lapics[self.current_cpu]
        return lapic.pending() or lapic.nmi_pending

    def runnable(self, i: int, halted: bool, interrupts_enabled: bool) -> bool:
        """Whether vCPU i has anything to do: not waiting for a SIPI and, if halted,
        an interrupt it can take (IF=1) is pending."""
        if self.wait_sipi[i]:
            return False
        if not halted:
            return True
        lapic = self.lapics[i]
        return (interrupts_enabled and lapic.pending()) or lapic.nmi_pending

    def _msr_handler(self, i: int, locked: bool = False) -> MsrHandler:
        """vCPU i's RDMSR/WRMSR of its local APIC's MSRs (engines that route them):
        `ApicFault` becomes #GP; an x2APIC ICR or SELF IPI write ends the sender's slice
        on a multi-vCPU machine, as the xAPIC ICR does (LapicWindow)."""
        def handle(msr: int, value: int | None) -> int | None:
            if locked:                       # vCPUs on threads (kvm): the machine lock
                with self.lock:
                    return access(msr, value)
            return access(msr, value)

        def access(msr: int, value: int | None) -> int | None:
            lapic = self.lapics[i]
            if not lapic.handles_msr(msr):
                return None
            try:
                if value is None:
                    return lapic.msr_read(msr)
                lapic.msr_write(msr, value)
            except ApicFault as e:
                raise MsrFault(str(e)) from e
            if msr in (0x830, 0x83F) and len(self.vcpus) > 1:
                self.vcpus[i].kick()
            return 0
        return handle

    def _booted(self, _guest_ns: int) -> None:
        self.boot_host_s = time.monotonic() - self.created_at

    # ------------------------------------------------------------------ stopping

    def _init_cpu(self, i: int) -> None:
        """INIT to vCPU i: an AP goes back to wait-for-SIPI with its reset state. INIT to
        the BSP is ignored (on a PC it would restart the firmware, which pyhv has not)."""
        if i == 0:
            return
        self.wait_sipi[i] = True
        self.restarted[i] = True
        self.lapics[i].reset()
        self.vcpus[i].set_state(CpuState())

    def _start_cpu(self, i: int, vector: int) -> None:
        """SIPI with vector vv to vCPU i: if it waits for one, it starts in real mode at
        vv00:0000 (physical vv000); otherwise the SIPI is ignored, as on hardware."""
        if i >= len(self.vcpus) or not self.wait_sipi[i]:
            return
        st = boot.real_mode(vector << 8, 0)
        st.rdx = DEFAULT_MODEL.signature()
        self.vcpus[i].set_state(st)
        self.wait_sipi[i] = False
        self.restarted[i] = True
        self.sipi_count += 1

    def _debug_exit(self, status: int) -> None:
        """The device computed QEMU's (v << 1) | 1; a process status keeps 8 bits."""
        self.request_stop(StopRequest("debug-exit", status & 0xFF,
                                      f"guest wrote {status >> 1:#x} to the debug-exit port"))

    def request_stop(self, req: StopRequest) -> None:
        """Ask the run to end (any thread). The first request wins."""
        with self._stop_lock:
            if self.stop_request is None:
                self.stop_request = req
        for v in self.vcpus:
            v.kick()

    def close(self) -> None:
        functions, self._pci_functions = self._pci_functions, []
        errors: list[BaseException] = []
        for fn in functions:
            closer = getattr(fn, "close", None)
            if closer is not None:
                try:
                    closer()
                except Exception as e:  # noqa: BLE001 - close the rest, then report
                    errors.append(e)
        for v in self.vcpus:
            v.close()
        self.vcpus = []
        self.vcpu = None
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        if errors:
            raise errors[0]


class _Locked:
    """A local APIC as the interrupt source of a vCPU on its own thread: INTR and INTA
    under the machine lock, as every other device access."""

    def __init__(self, lapic: LocalApic, lock: threading.RLock) -> None:
        self._lapic = lapic
        self._lock = lock

    def pending(self) -> bool:
        with self._lock:
            return self._lapic.pending()

    def acknowledge(self) -> int | None:
        with self._lock:
            return self._lapic.acknowledge()

    @property
    def nmi_separate(self) -> bool:
        return self._lapic.nmi_separate

    @nmi_separate.setter
    def nmi_separate(self, on: bool) -> None:
        with self._lock:
            self._lapic.nmi_separate = on

    @property
    def nmi_pending(self) -> bool:
        return self._lapic.nmi_pending

    def take_nmi(self) -> bool:
        with self._lock:
            return self._lapic.take_nmi()


def pci_routes() -> dict[tuple[int, int], int]:
    """(slot, INTx pin 0-3) -> GSI for every slot but the host bridge's: the host
    bridge's swizzle onto PCI_IRQS, which reach the I/O APIC on GSI = IRQ (the ISA
    fan-out), for the DSDT's _PRT and the MP table (docs/apic.md)."""
    return {(slot, pin): PCI_IRQS[(slot + pin) % 4] for slot in range(1, 32)
            for pin in range(4)}


def _level_triggered(pic: PicPair, irq: int) -> None:
    """What PC firmware does for a PCI interrupt: its ELCR bit makes it level-triggered."""
    chip = irq >> 3
    pic.elcr.write(chip, 1, pic.chips[chip].elcr | (1 << (irq & 7)))
