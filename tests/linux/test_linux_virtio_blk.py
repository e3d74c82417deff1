"""virtio-blk with Debian's kernel and its own virtio_blk driver, through `pyhv run --disk`
on the emu engine: a file system made in one run is read back in the next and QEMU's
`qemu-img check` agrees with the image; completed writes survive every way a run ends;
an image in use is locked against QEMU and a second pyhv.

Two boots in the default run (the round trip); the rest are marked slow.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyhv import images

BOOT_TIMEOUT = 120

needs_qemu_img = pytest.mark.skipif(shutil.which("qemu-img") is None,
                                    reason="needs qemu-img (qemu-utils)")


def pyhv_argv(*args: str, timeout: float = BOOT_TIMEOUT) -> list[str]:
    return [sys.executable, "-m", "pyhv", "run", "--engine", "emu", "--timeout",
            str(timeout), *args]


def pyhv(*args: str, timeout: float = BOOT_TIMEOUT) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(pyhv_argv(*args, timeout=timeout), stdin=subprocess.DEVNULL,
                          capture_output=True, timeout=timeout + 30, env=dict(os.environ))


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=60)


def check_clean(path: Path) -> None:
    r = qemu_img("check", str(path))
    assert r.returncode == 0 and "No errors were found" in r.stdout, r.stdout + r.stderr


def new_qcow2(path: Path, size: str = "64M") -> Path:
    r = qemu_img("create", "-f", "qcow2", str(path), size)
    assert r.returncode == 0, r.stderr
    return path


def info(r: subprocess.CompletedProcess[bytes]) -> str:
    return r.stdout.decode(errors="replace") + r.stderr.decode(errors="replace")[-3000:]


@needs_qemu_img
def test_file_system_round_trip(debian_image: images.LinuxImage, tmp_path: Path) -> None:
    """The issue's acceptance test: mke2fs + mount + write, then a second run reads it,
    with a second (raw, read-only) disk as vdb and its serial visible in sysfs, and
    virtio-rng behind /dev/hwrng; every virtio interrupt is an MSI-X message."""
    disk = new_qcow2(tmp_path / "d.qcow2")
    raw = tmp_path / "ro.raw"
    raw.write_bytes(b"RAWDISK!" + bytes(1 << 20))
    r = pyhv("--disk", str(disk), "--disk", f"{raw},format=raw,readonly=on,serial=ro-1",
             "--rng", "--command", "mke2fs /dev/vda >/dev/null && mount /dev/vda /mnt && "
             "echo hello > /mnt/f && umount /mnt && cat /sys/block/vdb/serial && echo && "
             "cat /sys/block/vdb/ro && head -c 8 /dev/vdb && echo && "
             "if dd if=/dev/zero of=/dev/vdb count=1 conv=fsync 2>/dev/null; then echo WROTE;"
             " else echo REFUSED; fi; head -c 16 /dev/hwrng | wc -c; "
             "grep virtio /proc/interrupts")
    out = info(r)
    assert r.returncode == 0, out
    lines = [ln.strip() for ln in r.stdout.decode().splitlines()]
    irqs = [ln for ln in lines if "virtio" in ln]
    lines = [ln for ln in lines if "virtio" not in ln]
    assert lines[-5:] == ["ro-1", "1", "RAWDISK!", "REFUSED", "16"], out
    # virtio-pci takes MSI-X vectors (config + each queue of the three devices), none
    # through the I/O APIC
    assert len(irqs) >= 6 and all("PCI-MSI" in ln for ln in irqs), irqs
    check_clean(disk)
    assert raw.read_bytes()[:8] == b"RAWDISK!"
    r = pyhv("--disk", str(disk), "--command", "mount /dev/vda /mnt && cat /mnt/f")
    assert r.returncode == 0 and r.stdout.decode().strip() == "hello", info(r)
    check_clean(disk)


WRITE = ("dd if=/dev/urandom of=/tmp/x bs=64k count=16 2>/dev/null; "
         "dd if=/tmp/x of=/dev/vda bs=64k oflag=direct 2>/dev/null; md5sum /tmp/x; "
         "echo WRITTEN; ")


def written_sum(r: subprocess.CompletedProcess[bytes] | bytes) -> str:
    out = r if isinstance(r, bytes) else r.stdout
    return out.decode().split()[0]


def wait_for(p: subprocess.Popen[bytes], marker: bytes) -> bytes:
    """Console output of a running pyhv up to `marker` (or whatever came before the end)."""
    assert p.stdout is not None
    os.set_blocking(p.stdout.fileno(), False)
    out = b""
    t_end = time.monotonic() + BOOT_TIMEOUT
    while marker not in out and time.monotonic() < t_end and p.poll() is None:
        time.sleep(0.2)
        out += p.stdout.read() or b""
    return out


def disk_sum(path: Path) -> str:
    import hashlib

    from pyhv.disk.open import open_image
    d = open_image(str(path), read_only=True, force_share=True)
    try:
        return hashlib.md5(d.read(0, 1 << 20)).hexdigest()
    finally:
        d.close()


@pytest.mark.slow
@needs_qemu_img
@pytest.mark.parametrize("ending", ["timeout", "sigterm", "panic"])
def test_completed_writes_survive_every_ending(debian_image: images.LinuxImage,
                                               tmp_path: Path, ending: str) -> None:
    """dd with O_DIRECT completes only when pyhv reported the write done; whatever ends
    the run next (pyhv's --timeout, SIGTERM, a kernel panic), the data is on the image
    and the image is clean."""
    disk = new_qcow2(tmp_path / "d.qcow2")
    tail = {"timeout": "sleep 600", "sigterm": "sleep 600",
            "panic": "echo c > /proc/sysrq-trigger"}[ending]
    argv = pyhv_argv("--disk", str(disk), "--command", WRITE + tail,
                     timeout=25 if ending == "timeout" else BOOT_TIMEOUT)
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    out = b""
    try:
        if ending == "sigterm":
            out = wait_for(p, b"WRITTEN")
            assert b"WRITTEN" in out
            p.send_signal(signal.SIGTERM)
        more, err = p.communicate(timeout=BOOT_TIMEOUT + 30)
        out += more
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    expected = {"timeout": 124, "sigterm": 143, "panic": 4}[ending]
    assert p.returncode == expected, (out, err[-2000:])
    assert disk_sum(disk) == written_sum(out)
    check_clean(disk)


@pytest.mark.slow
@needs_qemu_img
def test_image_in_use_is_locked(debian_image: images.LinuxImage, tmp_path: Path) -> None:
    disk = new_qcow2(tmp_path / "d.qcow2")
    p = subprocess.Popen(pyhv_argv("--disk", str(disk), "--command", "echo UP; sleep 600"),
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    try:
        assert b"UP" in wait_for(p, b"UP")
        second = pyhv("--disk", str(disk), "--command", "true", timeout=30)
        assert second.returncode == 2, info(second)
        assert 'Failed to get "write" lock' in second.stderr.decode(), info(second)
        if shutil.which("qemu-io"):
            q = subprocess.run(["qemu-io", "-c", "write 0 512", str(disk)],
                               capture_output=True, text=True, timeout=60)
            assert q.returncode != 0 and "lock" in (q.stdout + q.stderr), q
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 143
    check_clean(disk)
    r = qemu_img("info", str(disk))           # the lock went with pyhv
    assert r.returncode == 0, r.stderr


def test_bad_disk_options_are_refused(tmp_path: Path) -> None:
    disk = tmp_path / "x.raw"
    disk.write_bytes(bytes(4096))
    for spec, words in ((str(tmp_path / "none.qcow2"), "no such file"),
                        (f"{disk},format=vmdk", "format must be raw or qcow2"),
                        (f"{disk},readonly=yes", "readonly must be on or off"),
                        (f"{disk},serial={'x' * 21}", "serial"),
                        (f"{disk},cache=none", "unknown option")):
        r = subprocess.run([sys.executable, "-m", "pyhv", "run", "--kernel", str(disk),
                            "--disk", spec], capture_output=True, timeout=60)
        assert r.returncode == 2 and words in r.stderr.decode(), (spec, r.stderr)
