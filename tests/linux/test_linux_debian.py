"""The loader and the image builder against Debian's real cloud kernel (fetched once per
session by the `debian_image` fixture; skipped where apt cannot reach a Debian mirror)."""

from __future__ import annotations

import json
import stat
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from linuxfakes import new_memory

from pyhv import cli, images
from pyhv.arch.x86 import layout
from pyhv.errors import ImageError
from pyhv.loader import detect_format, elf, linux
from pyhv.loader.image import BootRequest
from pyhv.loader.initramfs import read_newc

Write = Callable[[str, bytes], Path]


def test_header_of_debians_kernel(debian_image: images.LinuxImage, debian_kernel: bytes) -> None:
    hdr = linux.parse_header(debian_kernel)
    assert hdr.version >= 0x020F                   # Linux 6.1: boot protocol 2.15
    assert hdr.kernel_64 and hdr.relocatable
    assert hdr.pref_address == 0x100_0000 and hdr.kernel_alignment == 0x200000
    assert hdr.init_size > len(debian_kernel)
    assert hdr.cmdline_size == 2047
    assert hdr.release == debian_image.version
    assert linux.payload_format(linux.payload(debian_kernel, hdr)) == "lz4"   # cloud: LZ4
    assert detect_format(debian_kernel) == "linux"


def test_decompress_debians_payload(debian_kernel: bytes) -> None:
    hdr = linux.parse_header(debian_kernel)
    vmlinux = linux.decompress_payload(debian_kernel, hdr)
    assert vmlinux is not None and linux.is_linux_elf(vmlinux)
    image = elf.parse(vmlinux)
    assert image.bits == 64 and image.entry == 0x100_0000       # startup_64, physical
    assert linux.elf_release(image) == hdr.release


@pytest.mark.parametrize("decompress", [True, False])
def test_load_debians_kernel(debian_image: images.LinuxImage, decompress: bool) -> None:
    mem = new_memory(256 << 20)
    try:
        g = linux.load(mem, BootRequest(debian_image.kernel_path, "console=ttyS0",
                                        debian_image.initrd_path), decompress=decompress)
        st = g.entry
        assert st.mode == "long" and st.cs.selector == 0x10 and st.rsi == layout.ZERO_PAGE
        assert st.rip == (0x100_0000 if decompress else 0x100_0200)
        zp = layout.ZERO_PAGE
        assert mem.read_u16(zp + 0x1FE) == 0xAA55 and mem.read(zp + 0x202, 4) == b"HdrS"
        assert mem.read_u8(zp + 0x210) == 0xFF
        assert mem.read_cstring(mem.read_u32(zp + 0x228)) == b"console=ttyS0"
        initrd = debian_image.initrd_path.read_bytes()
        start, size = mem.read_u32(zp + 0x218), mem.read_u32(zp + 0x21C)
        assert size == len(initrd) and mem.read(start, size) == initrd
        assert start >= 0x100_0000 + mem.read_u32(zp + 0x260)    # clear of init_size
        assert mem.read_u8(zp + 0x1E8) == len(layout.e820_map(mem.size))
    finally:
        mem.close()


def test_truncated_debian_kernel(debian_kernel: bytes, write: Write) -> None:
    mem = new_memory(256 << 20)
    # (Debian appends a ~1.5 KiB Authenticode signature after syssize: cutting into it
    # is harmless, so the cuts below reach into the kernel itself.)
    for keep in (0x300, 4096, len(debian_kernel) // 2, len(debian_kernel) - 4096):
        with pytest.raises(ImageError, match="truncated|too small"):
            linux.load(mem, BootRequest(write("vmlinuz", debian_kernel[:keep])))
    mem.close()


def test_corrupt_debian_payload(debian_kernel: bytes, write: Write) -> None:
    data = bytearray(debian_kernel)
    hdr = linux.parse_header(debian_kernel)
    mid = hdr.setup_size + hdr.payload_offset + hdr.payload_length // 2
    data[mid:mid + 4096] = bytes(4096)
    mem = new_memory(256 << 20)
    with pytest.raises(ImageError, match="lz4|LZ4"):
        linux.load(mem, BootRequest(write("vmlinuz", bytes(data))))
    mem.close()


def test_too_little_memory_for_debians_kernel(debian_image: images.LinuxImage) -> None:
    mem = new_memory(48 << 20)
    with pytest.raises(ImageError, match="does not fit in guest RAM.*--mem"):
        linux.load(mem, BootRequest(debian_image.kernel_path, "",
                                    debian_image.initrd_path))
    mem.close()


# ---------------------------------------------------------------- the built image

def test_initramfs_contents(debian_image: images.LinuxImage) -> None:
    entries = {e.path: e for e in read_newc(debian_image.initrd_path.read_bytes())}
    init = entries["init"]
    assert stat.S_ISREG(init.mode) and init.mode & 0o111
    assert init.data.startswith(b"#!/bin/sh") and b"pyhv.cmd=" in init.data
    assert entries["dev/console"].kind == "char" and entries["dev/console"].rdev == (5, 1)
    assert entries["dev/null"].rdev == (1, 3) and entries["dev/ttyS0"].rdev == (4, 64)
    assert entries["bin/busybox"].data[:4] == b"\x7fELF"
    assert entries["bin/sh"].kind == "symlink" and entries["bin/sh"].data == b"/bin/busybox"
    assert entries["sbin/poweroff"].kind == "symlink"
    assert entries["bin/cttyhack"].kind == "symlink"     # /etc/inittab runs it
    assert entries["bin/pyhv-boottimer"].data == images.boottimer_elf()
    base = f"lib/modules/{debian_image.version}/"
    dep = entries[base + "modules.dep"].data.decode()
    order = entries[base + "pyhv-load-order"].data.decode().split()
    names = [Path(p).name for p in order]
    for m in ("virtio.ko", "virtio_ring.ko", "virtio_pci.ko", "virtio_blk.ko", "virtio_net.ko",
              "net_failover.ko", "failover.ko", "virtio-rng.ko"):
        assert m in names
        assert entries[base + order[names.index(m)]].data[:4] == b"\x7fELF"
    assert names.index("virtio_ring.ko") < names.index("virtio.ko") < names.index(
        "virtio_net.ko")
    assert names.index("failover.ko") < names.index("net_failover.ko")
    assert "virtio_net.ko: " in dep
    # the power button for acpid: loaded for the shell, whatever the PCI bus shows
    button = entries[base + "pyhv-load-button"].data.decode().split()
    assert sorted(Path(p).name for p in button) == ["button.ko", "evdev.ko"]
    assert not set(button) & set(order)
    assert all(entries[base + p].data[:4] == b"\x7fELF" for p in button)
    assert "::respawn:/sbin/acpid -f" in init.data.decode()
    assert entries["sbin/acpid"].kind == "symlink"
    assert entries["etc/acpid.conf"].data == b"PWRF power\n"
    power = entries["etc/acpi/power"]
    assert power.mode & 0o111 and b"exec /sbin/poweroff" in power.data


def test_fetch_is_idempotent(debian_image: images.LinuxImage) -> None:
    meta = debian_image.directory / "image.json"
    before = meta.stat().st_mtime_ns
    again = images.fetch_linux(quiet=True)
    assert again == debian_image and meta.stat().st_mtime_ns == before
    assert images.ensure_linux_image(quiet=True).kernel_path == debian_image.kernel_path


def test_image_list_and_path(debian_image: images.LinuxImage,
                             capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["guest", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert any(i["kernel"] == str(debian_image.kernel_path) for i in listed)
    assert cli.main(["guest", "path", "linux"]) == 0
    out = capsys.readouterr().out.split()
    assert Path(out[0]).is_file() and Path(out[1]).is_file()


def test_busybox_cpio_lists_the_initramfs(debian_image: images.LinuxImage,
                                          tmp_path: Path) -> None:
    import gzip
    import subprocess
    bb = next(e for e in read_newc(debian_image.initrd_path.read_bytes())
              if e.path == "bin/busybox")
    exe = tmp_path / "busybox"
    exe.write_bytes(bb.data)
    exe.chmod(0o755)
    raw = gzip.decompress(debian_image.initrd_path.read_bytes())
    out = subprocess.run([str(exe), "cpio", "-t"], input=raw, capture_output=True,
                         timeout=30, check=True).stdout.decode().split()
    assert "init" in out and "dev/console" in out and "bin/busybox" in out
    assert struct.unpack("<H", bb.data[0x12:0x14])[0] == 62       # x86-64
