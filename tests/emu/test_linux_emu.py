"""Debian's Linux kernel on the emu engine, on pyhv's own machine (pyhv.machine: 8259,
8254, RTC, 16550, i8042, debug-exit) and run loop (pyhv.runner), in-process so that the
engine's counters can be checked.

Slow (~6 s) and skipped unless Debian's kernel and busybox are available: a complete image
in pyhv's cache (`pyhv guest fetch linux`), or the two .deb files in its `debs/` folder
(extracted into a temporary directory here; the cache is only read). This test exercises
the engine: 4-level paging, ~1,300 page faults, interrupts at CPL 3, SYSCALL/SYSRET, and
CR2 surviving time slices (a user process killed with "segfault at fffffffffffffffe" was
the symptom).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from pyhv import images
from pyhv.exitmarker import ExitMarker
from pyhv.machine import Machine, MachineConfig
from pyhv.runner import Runner

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
    cmd = "uname -s; echo $((6*7)); cat /proc/cpuinfo | grep -c processor"
    cmdline = f"console=ttyS0 panic=-1 noapic nolapic tsc=unstable {images.command_param(cmd)}"
    out = bytearray()
    m = Machine(MachineConfig(kernel=kernel, initrd=initrd, cmdline=cmdline, engine="emu",
                              mem_size=256 << 20), out.extend)
    try:
        runner = Runner(m, timeout=120)
        result = runner.run()
    finally:
        m.close()
    # /init's poweroff -f: through ACPI S5 now that the machine has ACPI (it is not
    # disabled by noapic/nolapic), through a reset or a halt on older machines
    assert result.reason in ("poweroff", "debug-exit", "reset", "halt"), result
    text = out.decode("latin-1")
    assert "Run /init as init process" in text, text[-2000:]
    assert "segfault" not in text and "double fault" not in text, text[-2000:]
    assert ExitMarker().parse(bytes(out)) == 0, text[-2000:]
    lines = text.splitlines()
    assert "Linux" in lines and "42" in lines and "1" in lines, text[-1500:]
    st = runner.engine_stats
    assert st["syscalls"] > 100 and st["exceptions"] > 100 and st["interrupts"] > 50
