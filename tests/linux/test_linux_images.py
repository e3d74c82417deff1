"""The guest-side protocol pieces of pyhv.images and the boot-timer device (no network)."""

from __future__ import annotations

import base64
import shutil
import subprocess
from pathlib import Path

import pytest

from pyhv import cli, images
from pyhv.arch.x86 import layout
from pyhv.devices.boottimer import BootTimer
from pyhv.exitmarker import ExitMarker
from pyhv.loader import elf
from pyhv.loader.initramfs import read_newc


def test_command_param_round_trip() -> None:
    cmd = "echo $((6*7)) | tr 4 x; exit 3"
    word = images.command_param(cmd)
    assert word.startswith("pyhv.cmd=") and " " not in word
    assert base64.b64decode(word.split("=", 1)[1]).decode() == cmd


def test_command_param_with_a_marker_wraps_the_command() -> None:
    marker = ExitMarker.fresh()
    word = images.command_param("printf 'a b'; exit 3", marker)
    assert " " not in word
    script = base64.b64decode(word.split("=", 1)[1]).decode()
    assert script == marker.wrap("printf 'a b'; exit 3")
    assert script.startswith("sh -c 'printf '\"'\"'a b'\"'\"'; exit 3'\n")


def test_the_plain_marker_is_parsed_anywhere() -> None:
    plain = ExitMarker()
    assert plain.parse(b"hello\n@@PYHV-EXIT 0@@\n") == 0
    assert plain.parse(b"no newline at end@@PYHV-EXIT 127@@") == 127
    assert plain.parse(b"@@PYHV-EXIT @@") is None
    assert plain.parse(b"plain output") is None
    assert ExitMarker.fresh().parse(b"@@PYHV-EXIT 0@@") is None   # a nonce is required


def test_init_script() -> None:
    text = images.init_script("6.1.0-test")
    assert text.startswith("#!/bin/sh\n/bin/pyhv-boottimer") or \
        text.splitlines()[2].startswith("/bin/pyhv-boottimer")
    for needle in ("mount -t proc", "mount -t sysfs", "mount -t devtmpfs",
                   'exec /bin/sh -c "$1"\' sh "$script"',
                   "@@PYHV-EXIT %d@@", "poweroff -f", "exec /sbin/init",
                   "/lib/modules/6.1.0-test/pyhv-load-order", "0x1af4",
                   "/lib/modules/6.1.0-test/pyhv-load-button", "::respawn:/sbin/acpid"):
        assert needle in text
    sh = shutil.which("sh")
    if sh:
        subprocess.run([sh, "-n"], input=text.encode(), check=True, timeout=10)   # parses


def test_boottimer_elf(tmp_path: Path) -> None:
    blob = images.boottimer_elf()
    image = elf.parse(blob)
    assert image.bits == 64 and image.machine == elf.EM_X86_64
    (seg,) = image.segments
    assert seg.filesz == len(blob) and seg.vaddr <= image.entry < seg.vaddr + seg.memsz
    code = blob[image.entry - seg.vaddr:]
    # what GNU as assembles from the listing in boottimer_elf's docstring
    assert code.hex() == ("b8ad000000bf40040000be01000000ba010000000f0585c0750b66ba4004"
                          "b07bee31ffeb05bf01000000b83c0000000f05")
    assert b"\x66\xba" + layout.BOOT_TIMER_PORT.to_bytes(2, "little") + b"\xb0\x7b\xee" in code
    objdump = shutil.which("objdump")
    if objdump:
        (tmp_path / "bt").write_bytes(blob)
        out = subprocess.run([objdump, "-D", "-b", "binary", "-mi386:x86-64",
                              f"--start-address={image.entry - seg.vaddr}", str(tmp_path / "bt")],
                             capture_output=True, timeout=30, check=True).stdout.decode()
        assert "out    %al,(%dx)" in out and out.count("syscall") == 2


def test_build_initramfs_without_modules(tmp_path: Path) -> None:
    fake_busybox = tmp_path / "busybox"
    fake_busybox.write_bytes(b"\x7fELF not really")
    blob = images.build_initramfs(fake_busybox, applets=["bin/sh", "sbin/init", "linuxrc",
                                                         "usr/bin/awk"])
    entries = {e.path: e for e in read_newc(blob)}
    assert entries["bin/sh"].data == b"/bin/busybox" and "linuxrc" not in entries
    assert entries["usr/bin/awk"].kind == "symlink"
    assert entries["dev/console"].rdev == (5, 1)
    assert b"cttyhack" in entries["etc/inittab"].data
    assert not any(p.startswith("lib/modules/") for p in entries if p != "lib/modules")


def test_boot_timer_device() -> None:
    class FakeClock:
        t = 0

        def now_ns(self) -> int:
            return self.t

    clock = FakeClock()
    seen: list[int] = []
    dev = BootTimer(clock, seen.append)
    assert "never" in dev.report()
    clock.t = 5
    dev.write(0, 1, 7)
    assert dev.boot_ns is None and dev.other_writes == 1
    clock.t = 1_500_000_000
    dev.write(0, 1, 123)
    clock.t = 2_000_000_000
    dev.write(0, 1, 123)                      # only the first counts
    assert dev.boot_ns == 1_500_000_000 and seen == [1_500_000_000]
    assert dev.read(0, 1) == 0 and "1.500 s" in dev.report()


def test_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PYHV_CACHE", str(tmp_path / "c"))
    assert images.cache_dir() == tmp_path / "c"
    assert images.cached_images() == []
    monkeypatch.delenv("PYHV_CACHE")
    assert images.cache_dir() == Path.home() / ".cache" / "pyhv" / "images"


def test_incomplete_image_is_not_used(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PYHV_CACHE", str(tmp_path))
    d = tmp_path / "linux-1.2.3"
    d.mkdir()
    (d / "vmlinuz").write_bytes(b"x")           # no initramfs, no image.json
    assert images.cached_images() == []


def test_cli_guest_without_verb(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["guest"]) == 2
    assert "choose a verb" in capsys.readouterr().err


def test_cli_guest_list_empty(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PYHV_CACHE", str(tmp_path))
    assert cli.main(["guest", "list"]) == 0
    assert "pyhv guest fetch linux" in capsys.readouterr().out
    assert cli.main(["guest", "path", "linux"]) == 2


def test_cli_image_is_gone_with_a_hint(capsys: pytest.CaptureFixture[str]) -> None:
    """`pyhv image` (now `pyhv guest`) was too close to `pyhv img` (disk images)."""
    with pytest.raises(SystemExit) as e:
        cli.main(["image", "list"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'image'" in err and "`pyhv guest`" in err
