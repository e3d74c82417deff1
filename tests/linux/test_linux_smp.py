"""Debian's kernel with several vCPUs on emu (`pyhv run --cpus N`): it brings every AP
up by INIT/SIPI from the MADT, sees N CPUs, runs work on all of them, uses x2APIC, the
TSC-deadline timer and the TSC clocksource (emu's TSC is constant-rate on virtual time,
so no `tsc=unstable`), and powers off and reboots through ACPI. One boot in the default
run; the rest are slow."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from pyhv import images

BOOT_TIMEOUT = 150


def pyhv(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "pyhv", "run", "--engine", "emu",
                           "--timeout", str(BOOT_TIMEOUT), *args],
                          input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL,
                          capture_output=True, timeout=BOOT_TIMEOUT + 30, env=dict(os.environ))


BUSY = ("grep -c ^processor /proc/cpuinfo; nproc; "
        "for i in 1 2 3 4; do (n=0; while [ $n -lt 30000 ]; do n=$((n+1)); done; "
        "echo loop$i done) & done; wait; grep '^cpu[0-9]' /proc/stat; "
        "grep LOC /proc/interrupts; "
        "echo flags: $(grep -o -w -E 'x2apic|tsc_deadline_timer|constant_tsc' /proc/cpuinfo "
        "| sort | uniq -c); cat /proc/cmdline; "
        "echo clocksource: $(cat /sys/devices/system/clocksource/clocksource0/"
        "current_clocksource); dmesg | grep -i -E 'x2apic|unstable|clocksource: Switched'")


def test_four_vcpus_run_four_busy_loops(debian_image: images.LinuxImage) -> None:
    r = pyhv("--cpus", "4", "--stats", "--command", BUSY)
    out = r.stdout.decode(errors="replace")
    err = r.stderr.decode(errors="replace")
    assert r.returncode == 0, (out[-3000:], err[-3000:])
    lines = [ln.strip() for ln in out.splitlines()]
    assert lines[:2] == ["4", "4"], out                  # /proc/cpuinfo, nproc
    assert sorted(ln for ln in lines if ln.startswith("loop")) == \
        [f"loop{i} done" for i in range(1, 5)]
    user = {m.group(1): int(m.group(2))
            for m in re.finditer(r"^cpu(\d) (\d+)", out, re.MULTILINE)}
    assert sorted(user) == ["0", "1", "2", "3"] and all(user.values()), user
    loc = re.search(r"LOC:\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", out)
    assert loc and all(int(x) > 0 for x in loc.groups()), out[-1000:]
    # x2APIC and the TSC: every CPU has the flags, Linux switches its APIC to x2APIC,
    # runs on the TSC clocksource, and neither workaround nor "unstable" is seen
    assert "flags: 4 constant_tsc 4 tsc_deadline_timer 4 x2apic" in out, out[-2000:]
    assert "x2apic enabled" in out and "physical x2apic" in out, out[-2000:]
    assert "clocksource: tsc" in out, out[-2000:]
    assert "unstable" not in out and "no_timer_check" not in out, out[-2000:]
    assert "the run ended by poweroff: ACPI S5 through PM1a_CNT" in err


@pytest.mark.slow
def test_smp_boot_log_and_reboot_through_acpi(debian_image: images.LinuxImage) -> None:
    r = pyhv("--cpus", "4", "--on-reboot", "exit",
             stdin=b"dmesg | grep -E 'smp|CPU'\nreboot -f\n")
    out = r.stdout.decode(errors="replace")
    assert r.returncode == 0, (out[-3000:], r.stderr.decode()[-2000:])
    assert "smp: Brought up 1 node, 4 CPUs" in out
    assert "Allowing 4 CPUs, 0 hotplug CPUs" in out
    assert "the guest reset (ACPI reset register)" in r.stderr.decode()


@pytest.mark.slow
@pytest.mark.parametrize("cpus", [2, 16])
def test_other_cpu_counts(debian_image: images.LinuxImage, cpus: int) -> None:
    r = pyhv("--cpus", str(cpus), "--mem", "256M", "--command", "nproc")
    out = r.stdout.decode(errors="replace")
    assert r.returncode == 0 and out.strip() == str(cpus), (out[-2000:],
                                                            r.stderr.decode()[-2000:])
