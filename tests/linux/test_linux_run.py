"""Debian's Linux kernel booted by `pyhv run` on the software engine, end to end.

Each test is one boot (about 5 s here) through the real command line: the loader, the
machine builder, the run loop, the PC device models and the emu engine all have to work
for the guest to reach /init and run a command. Skipped where Debian's kernel cannot be
fetched (see conftest.debian_image).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pyhv import images

BOOT_TIMEOUT = 90          # pyhv's own --timeout; the subprocess gets a little more


def pyhv(*args: str, stdin: bytes | None = None,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "pyhv", "run", "--engine", "emu",
                           "--timeout", str(BOOT_TIMEOUT), *args],
                          input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL,
                          capture_output=True, timeout=BOOT_TIMEOUT + 30,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def image(debian_image: images.LinuxImage) -> images.LinuxImage:
    return debian_image


def test_command_output_and_status(image: images.LinuxImage) -> None:
    cmd = ("uname -sr; echo written > /tmp/f && cat /tmp/f; echo $((12345 * 6789)); "
           "ls / | grep -c bin; exit 7")
    r = pyhv("--command", cmd, "--stats")
    out = r.stdout.decode()
    assert r.returncode == 7, (out, r.stderr.decode()[-2000:])
    lines = out.splitlines()
    assert lines[0].strip() == f"Linux {image.version}"
    assert [ln.strip() for ln in lines[1:4]] == ["written", str(12345 * 6789), "2"]
    assert "@@PYHV-EXIT" not in out            # the marker is pyhv's, not the user's
    err = r.stderr.decode()
    assert "guest /init started (boot timer)" in err
    # /init's `poweroff -f` after the command goes through ACPI (the DSDT's \_S5)
    assert "pyhv: the run ended by poweroff: ACPI S5 through PM1a_CNT" in err, err[-3000:]


def test_append_keeps_the_engines_workarounds(image: images.LinuxImage) -> None:
    """--append replaces pyhv's words but not emu's clock workarounds, which apply when
    emu's TSC is the host's (here: its CPU helpers turned off); a key the user gives
    (tsc=) is the user's."""
    r = pyhv("--append", "console=ttyS0 tsc=reliable quiet", "--command", "cat /proc/cmdline",
             env={"PYHV_EMU_CPU_HELPERS": "0"})
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    words = r.stdout.decode().split()
    assert {"console=ttyS0", "tsc=reliable", "quiet", "no_timer_check"} <= set(words), words
    assert "tsc=unstable" not in words


def test_command_output_without_newline_and_marker_lookalikes(
        image: images.LinuxImage) -> None:
    """Output ending mid-line still ends the run with the command's status, and a
    marker-like line in the output is output: it neither fakes the status nor mutes
    what follows."""
    r = pyhv("--command", "printf '@@PYHV-EXIT 0@@\\nafter\\n'; printf abc; exit 3")
    assert r.returncode == 3, (r.stdout, r.stderr.decode()[-2000:])
    assert r.stdout == b"@@PYHV-EXIT 0@@\r\nafter\r\nabc", r.stderr.decode()[-2000:]


def test_piped_shell_session(image: images.LinuxImage) -> None:
    r = pyhv(stdin=b"echo piped-$((40+2))\ncat /proc/cmdline\npoweroff -f\n")
    out = r.stdout.decode(errors="replace")
    assert r.returncode == 0, (out[-2000:], r.stderr.decode())
    # emu's TSC is constant-rate on virtual time: no clock workaround on the command line
    assert "piped-42" in out and "console=ttyS0" in out
    assert "tsc=unstable" not in out and "no_timer_check" not in out
    assert "Run /init as init process" in out


def test_kernel_panic_ends_the_run(image: images.LinuxImage) -> None:
    r = pyhv("--command", "echo c > /proc/sysrq-trigger")
    assert r.returncode == 4
    assert "pyhv: Kernel panic - not syncing: sysrq triggered crash" in r.stderr.decode()


def test_reboot_restarts_then_exit_flag_ends(image: images.LinuxImage, tmp_path: Path) -> None:
    r = pyhv("--on-reboot", "exit", stdin=b"reboot -f\n")
    assert r.returncode == 0, r.stderr.decode()
    assert "the guest reset (ACPI reset register)" in r.stderr.decode()
    assert b"reboot: Restarting system" in r.stdout


def test_acpi_tables_and_the_io_apic_are_used(image: images.LinuxImage) -> None:
    """Linux takes pyhv's ACPI tables (no "ACPI disabled", no table or AML errors), its
    MADT (symmetric I/O mode, the IRQ 0 -> GSI 2 override) and routes the PIT, the UART
    and the keyboard through the I/O APIC."""
    r = pyhv("--command", "dmesg; cat /proc/interrupts")
    out = r.stdout.decode(errors="replace")
    assert r.returncode == 0, (out[-3000:], r.stderr.decode()[-2000:])
    for want in ("ACPI: RSDP 0x00000000000E0000", "ACPI: Interpreter enabled",
                 "ACPI: PM: (supports S0 S5)", "ACPI: Using IOAPIC for interrupt routing",
                 "INT_SRC_OVR (bus 0 bus_irq 0 global_irq 2",
                 "APIC: Switch to symmetric I/O mode setup",
                 "clocksource: Switched to clocksource tsc",
                 "ACPI: PCI Root Bridge [PCI0]",
                 "root bus resource [mem 0xc0000000-0xfebfffff window]"):
        assert want in out, want
    for bad in ("ACPI disabled", "ACPI BIOS Error", "ACPI Error", "MP-BIOS bug",
                "Invalid checksum", "ACPI: Interpreter disabled", "[Firmware Bug]"):
        assert bad not in out, bad
    irqs = {ln.split(":")[0].strip(): ln for ln in out.splitlines() if "IO-APIC" in ln}
    assert "2-edge" in irqs.get("0", "") and "timer" in irqs["0"], out[-2000:]
    assert "4-edge" in irqs.get("4", "") and "ttyS0" in irqs["4"]


def test_too_little_memory_is_refused_before_boot(image: images.LinuxImage) -> None:
    r = pyhv("--mem", "32M", "--command", "true")
    assert r.returncode == 2
    err = r.stderr.decode()
    assert err.startswith("pyhv: ") and "--mem" in err and "Traceback" not in err
    assert r.stdout == b""


def test_interactive_terminal_session(image: images.LinuxImage) -> None:
    """On a terminal: raw mode (keys reach the guest's shell), Ctrl-] leaves with status
    0, and the terminal's settings are exactly restored afterwards."""
    import pty
    import select
    import termios
    import time

    master, slave = pty.openpty()
    before = termios.tcgetattr(slave)
    proc = subprocess.Popen([sys.executable, "-m", "pyhv", "run", "--engine", "emu",
                             "--timeout", str(BOOT_TIMEOUT)],
                            stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    seen = bytearray()

    def read_until(marker: bytes, limit: float) -> bool:
        end = time.monotonic() + limit
        while time.monotonic() < end:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    seen.extend(os.read(master, 65536))
                except OSError:
                    return False
                if marker in seen:
                    return True
        return False

    try:
        assert read_until(b"pyhv:/# ", BOOT_TIMEOUT), seen[-2000:]
        raw = termios.tcgetattr(slave)
        assert not raw[3] & termios.ICANON and not raw[3] & termios.ECHO   # raw mode
        os.write(master, b"echo tty-$((6*7))\r")
        assert read_until(b"tty-42", 30), seen[-2000:]
        os.write(master, b"\x1d")                                      # Ctrl-]
        assert proc.wait(timeout=30) == 0
        assert termios.tcgetattr(slave) == before
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
        os.close(slave)
