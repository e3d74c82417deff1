"""pyhv's Linux loader, checked by QEMU's CPU: the memory and entry state pyhv's loader
produces boot Debian's kernel to the initramfs's /init under `qemu -accel tcg`.

pyhv loads the kernel into its own GuestMemory (512 MiB); every range it wrote (the boot
GDT, TSS, zero page and page tables below 64 KiB, the command line, the kernel, the
initrd) becomes a multiboot module, and qemu_handoff.S, assembled with pyhv's entry
CpuState, copies them into place and enters the kernel exactly as a pyhv engine would.
QEMU gets 1 GiB so that its own ACPI tables, at the top of its RAM, lie outside the 512
MiB e820 map pyhv gave the kernel. The guest then reports what the kernel understood of
boot_params (command line, e820, RAMDISK) through a pyhv.cmd command.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from linuxfakes import new_memory

from pyhv import images
from pyhv.arch.x86 import layout
from pyhv.arch.x86.cpustate import EFER_LME
from pyhv.exitmarker import ExitMarker
from pyhv.loader import linux
from pyhv.loader.image import BootRequest

HERE = Path(__file__).parent
QEMU = shutil.which("qemu-system-x86_64")
pytestmark = [pytest.mark.qemu,
              pytest.mark.skipif(QEMU is None or shutil.which("as") is None
                                 or shutil.which("ld") is None,
                                 reason="needs qemu-system-x86_64 and binutils (as, ld)")]
GUEST_RAM = 512 << 20
TRAMPOLINE_AT = 0x1000_0000      # 256 MiB: above the kernel, below the initrd
ANSI = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|c)")


def handoff(tmp: Path, kernel: Path, initrd: Path, cmdline: str, *,
            decompress: bool) -> tuple[str, str]:
    mem = new_memory(GUEST_RAM)
    try:
        g = linux.load(mem, BootRequest(kernel, cmdline, initrd), decompress=decompress)
        st = g.entry
        assert st.mode == "long"
        chunks = [(layout.BOOT_GDT, layout.PAGE_TABLES_END - layout.BOOT_GDT),
                  (layout.CMDLINE, len(cmdline) + 1)]
        chunks += [(lo, hi - lo) for lo, hi in g.extents]
        # QEMU puts the handoff code and, after it, the modules (~50 MiB) at 256 MiB+
        assert all(hi <= TRAMPOLINE_AT or lo >= TRAMPOLINE_AT + (128 << 20)
                   for lo, hi in g.extents)
        modules = []
        for i, (addr, size) in enumerate(chunks):
            f = tmp / f"chunk{i}.bin"
            f.write_bytes(mem.read(addr, size))
            modules.append(f"{f} {addr:x}")
    finally:
        mem.close()
    syms = {"CR4": st.cr4, "CR3": st.cr3, "EFER": st.efer & EFER_LME, "CR0": st.cr0,
            "CS": st.cs.selector, "DS": st.ds.selector, "RSI": st.rsi, "RSP": st.rsp,
            "RIP": st.rip, "GDT_LIMIT": st.gdt.limit, "GDT_BASE": st.gdt.base}
    defs = [a for k, v in syms.items() for a in ("--defsym", f"{k}={v:#x}")]
    subprocess.run(["as", "--32", *defs, "-o", str(tmp / "h.o"), str(HERE / "qemu_handoff.S")],
                   check=True, timeout=60)
    subprocess.run(["ld", "-m", "elf_i386", f"-Ttext={TRAMPOLINE_AT:#x}", "-e", "_start",
                    "-o", str(tmp / "handoff.elf"), str(tmp / "h.o")], check=True, timeout=60)
    assert QEMU is not None
    proc = subprocess.run([QEMU, "-accel", "tcg", "-M", "pc", "-m", "1024", "-nographic",
                           "-no-reboot", "-monitor", "none", "-serial", "stdio", "-nic", "none",
                           "-kernel", str(tmp / "handoff.elf"), "-initrd", ",".join(modules)],
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
    return g.description, ANSI.sub("", proc.stdout.decode(errors="replace")).replace("\r", "")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("how", ["pyhv-decompressed", "kernel-decompressor", "bare-vmlinux"])
def test_pyhv_loaded_kernel_boots_under_qemu(debian_image: images.LinuxImage, tmp_path: Path,
                                             how: str) -> None:
    kernel = debian_image.kernel_path
    if how == "bare-vmlinux":
        data = kernel.read_bytes()
        vmlinux = linux.decompress_payload(data, linux.parse_header(data))
        assert vmlinux is not None
        kernel = tmp_path / "vmlinux"
        kernel.write_bytes(vmlinux)
    cmd = "echo; dmesg | grep -E 'BIOS-e820|RAMDISK'; cat /proc/cmdline; exit 9"
    cmdline = f"console=ttyS0 {images.command_param(cmd)}"
    desc, out = handoff(tmp_path, kernel, debian_image.initrd_path, cmdline,
                        decompress=how != "kernel-decompressor")
    assert ExitMarker().parse(out.encode()) == 9, out[-3000:]
    assert "Run /init as init process" in out
    assert cmdline in out.splitlines()
    e820 = list(dict.fromkeys(       # the boot log and the dmesg output both show it
        (int(a, 16), int(b, 16), kind) for a, b, kind in
        re.findall(r"BIOS-e820: \[mem 0x([0-9a-f]+)-0x([0-9a-f]+)\] (\w+)", out)))
    assert e820 == [(a, a + n - 1, "usable" if t == 1 else "reserved")
                    for a, n, t in layout.e820_map(GUEST_RAM)]
    start, end = (int(x, 16) for x in re.findall(r"RAMDISK: \[mem 0x(\w+)-0x(\w+)\]", out)[0])
    size = debian_image.initrd_path.stat().st_size
    assert start % 4096 == 0 and end == GUEST_RAM - 1 and end - start + 1 >= size
    assert ("kernel's decompressor" in desc) == (how == "kernel-decompressor")
