"""Debian's Linux kernel on the emu engine, driven by a minimal run loop over pyhv's real
PC device models (8259, 8254, RTC, 16550, i8042, debug-exit).

Slow (~6 s) and skipped unless Debian's kernel and busybox are available: a complete image
in pyhv's cache (`pyhv guest fetch linux`), or the two .deb files in its `debs/` folder
(extracted into a temporary directory here; the cache is only read). The machine builder
and run loop proper belong to pyhv.machine; this test exercises the engine: 4-level
paging, ~1,300 page faults, interrupts at CPL 3, SYSCALL/SYSRET, and CR2 surviving time
slices (a user process killed with "segfault at fffffffffffffffe" was the symptom).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from pyhv import images
from pyhv.arch.x86 import layout
from pyhv.clock import TimerQueue, VirtualClock
from pyhv.devices.bus import Bus
from pyhv.devices.debugexit import DebugExit
from pyhv.devices.i8042 import I8042
from pyhv.devices.pic8259 import PicPair
from pyhv.devices.pit8254 import Pit8254, SystemControlPortB
from pyhv.devices.rtc import Rtc
from pyhv.devices.serial16550 import Serial16550
from pyhv.engines.emu import EmuEngine, bus_handler
from pyhv.exitmarker import ExitMarker
from pyhv.exits import Halt, InternalError, Shutdown
from pyhv.memory import GuestMemory

pytestmark = pytest.mark.slow


def _image(tmp: Path) -> tuple[Path, Path] | None:
    found = images.cached_images()
    if found:
        return found[0].kernel_path, found[0].initrd_path
    debs = images.cache_dir() / "debs"
    kdeb = sorted(debs.glob("linux-image-*-amd64_*.deb"))
    bdeb = sorted(debs.glob("busybox-static_*.deb"))
    if not kdeb or not bdeb or shutil.which("dpkg-deb") is None:
        return None
    for deb in (kdeb[-1], bdeb[-1]):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp / "root")], check=True)
    kernels = sorted((tmp / "root" / "boot").glob("vmlinuz-*"))
    if not kernels:
        return None
    initrd = tmp / "initrd.gz"
    initrd.write_bytes(images.build_initramfs(tmp / "root" / "bin" / "busybox",
                                              release=kernels[-1].name[len("vmlinuz-"):],
                                              modules=[]))
    return kernels[-1], initrd


def test_debian_kernel_runs_a_command_on_emu(tmp_path: Path) -> None:
    found = _image(tmp_path)
    if found is None:
        pytest.skip("no Debian kernel/busybox in pyhv's image cache")
    kernel, initrd = found
    image_mod = pytest.importorskip("pyhv.loader.image")
    linux_loader = pytest.importorskip("pyhv.loader.linux")
    cmd = "uname -s; echo $((6*7)); cat /proc/cpuinfo | grep -c processor"
    cmdline = f"console=ttyS0 panic=-1 noapic nolapic tsc=unstable {images.command_param(cmd)}"
    mem = GuestMemory.with_layout(layout.ram_layout(256 << 20))
    guest = linux_loader.load(mem, image_mod.BootRequest(kernel=kernel, cmdline=cmdline,
                                                                 initrd=initrd))
    clock = VirtualClock()
    timers = TimerQueue(clock)
    bus = Bus("pio")
    pic = PicPair()
    out = bytearray()
    ended: list[str] = []
    uart = Serial16550(pic.irq_line(4), out.extend)
    pit = Pit8254(clock, timers, pic.irq_line(0))
    devices = [pic, uart, pit, SystemControlPortB(pit), Rtc(clock, timers, pic.irq_line(8)),
               I8042(pic.irq_line(1), pic.irq_line(12), lambda: ended.append("reset")),
               DebugExit(lambda status: ended.append(f"exit {status}"))]
    for dev in devices:
        for base, length, d, name in dev.regions():
            bus.register(base, length, d, name)
    engine = EmuEngine(mem)
    vcpu = engine.create_vcpu(0)

    def pio(port: int, size: int, value: int | None) -> int:
        if value is None:
            return bus.read(port, size)
        bus.write(port, size, value)
        if ended:
            vcpu.kick()
        return 0

    vcpu.set_interrupt_source(pic)
    vcpu.attach_io(pio, bus_handler(Bus("mmio")))  # type: ignore[attr-defined]
    vcpu.attach_clock(clock, timers)  # type: ignore[attr-defined]
    vcpu.set_state(guest.entry)
    deadline = time.monotonic() + 120
    last = None
    while not ended and time.monotonic() < deadline and clock.now_ns() < 30 * 10**9:
        last = vcpu.run()
        timers.fire_due()
        uart.poll()
        if isinstance(last, Halt):
            if not last.interrupts_enabled:
                break
            nxt = timers.next_deadline()
            if nxt is None:
                break
            clock.skip_to(nxt)
            timers.fire_due()
        elif isinstance(last, (Shutdown, InternalError)):
            break
    text = out.decode("latin-1")
    assert "Run /init as init process" in text, text[-2000:]
    assert "segfault" not in text and "double fault" not in text, text[-2000:]
    assert ExitMarker().parse(bytes(out)) == 0, text[-2000:]
    lines = text.splitlines()
    assert "Linux" in lines and "42" in lines and "1" in lines, text[-1500:]
    st = vcpu.stats()
    assert st["syscalls"] > 100 and st["exceptions"] > 100 and st["interrupts"] > 50
