"""Guest images built from Debian's packages: the cloud kernel and a busybox initramfs.

`pyhv guest fetch linux` (and `ensure_linux_image()`, which `pyhv run` calls when no
--kernel is given) resolves the kernel that Debian's `linux-image-cloud-amd64`
metapackage currently depends on, downloads it and `busybox-static` with
`apt-get download` (nothing else is downloaded, and nothing is installed), unpacks them
with `dpkg-deb -x`, and builds an initramfs. The cache:

    $PYHV_CACHE (default ~/.cache/pyhv/images)/
      debs/                         the .deb files as apt-get downloaded them
      linux-6.1.0-56-cloud-amd64.v6/  one directory per kernel release and image
                                    format (IMAGE_FORMAT: other formats are built
                                    beside, never over, so other pyhv versions keep theirs)
        vmlinuz                     Debian's bzImage, unmodified
        config, System.map          from the same package, for reference
        initramfs.cpio.gz           busybox + /init + the virtio and power-button modules
        image.json                  what was built from which package versions

Invariants: an image directory is complete exactly when its image.json exists (it is
written last, atomically), so an interrupted fetch is rebuilt rather than used; fetch is
idempotent (a complete image of the current package versions is reused, not rebuilt);
`ensure_linux_image()` uses a cached image without asking apt anything, so booting works
offline once fetched.

The initramfs:

    /init                 the busybox sh script from `init_script()` (protocol below)
    /bin/busybox          Debian's static busybox, every applet a symlink to it
    /bin/pyhv-boottimer   49-byte static ELF: ioperm(0x440); outb(123, 0x440); exit
    /dev/console (c 5 1), /dev/null (c 1 3), /dev/ttyS0 (c 4 64)
    /etc/inittab          busybox init: a shell on the console, respawned (/init adds
                          acpid when the power button has an event device)
    /etc/acpid.conf, /etc/acpi/power   busybox acpid: the power button (PWRF) runs
                          /etc/acpi/power, which is `poweroff` (init's orderly shutdown)
    /etc/udhcpc/default.script   udhcpc's hook: address, MTU, route, resolv.conf
    /lib/modules/<release>/kernel/...   virtio, virtio_ring, virtio_pci(+_modern_dev,
                          _legacy_dev), virtio_blk, virtio_net, net_failover, failover
                          and their dependencies, uncompressed, with modules.dep;
                          button and evdev (the ACPI power button as an input device)

The /init protocol (also in docs/linux.md):
- first, /bin/pyhv-boottimer writes 123 to port 0x440 (devices/boottimer.py timestamps
  it: the guest boot time `--stats` prints);
- it mounts devtmpfs, proc, sysfs, devpts and tmpfs (/tmp, /run), and loads the virtio
  modules when the PCI bus shows a virtio device (vendor 0x1af4; `pyhv.modules=all` or
  `none` on the kernel command line overrides); the power-button modules (button,
  evdev) are loaded whenever no command runs (not with `pyhv.modules=none`);
- with `pyhv.net=dhcp` (what `pyhv run --net user` adds), it configures eth0 by DHCP
  (`udhcpc -q`: one lease, then udhcpc exits; the lease's MTU is applied) before the
  command or the shell;
- with `pyhv.cmd=<base64 of a shell command>` on the command line it runs that command
  with `sh -c` (so pipes and $((...)) work), then prints `@@PYHV-EXIT <status>@@\n` right
  after the command's output (on the output's last line if that lacks a newline) and
  powers off with `poweroff -f`. A marker rather than a port because the status then
  survives any console, QEMU's included, and needs no second helper. `pyhv run
  --command` passes a wrapper that prints a marker with a per-run nonce first
  (pyhv.exitmarker: the one parser of both markers);
- otherwise it execs busybox init, which keeps a shell on the console (`cttyhack sh`)
  and handles `poweroff`/`reboot` from that shell, and runs busybox `acpid -f`
  (respawned): the ACPI power button (`pyhv shutdown`) arrives through button.ko and
  evdev as KEY_POWER on /dev/input/event*, acpid runs /etc/acpi/power (`poweroff`), and
  init runs its ::shutdown actions (sync; with a root disk, remount it read-only), ends
  every process and powers off through ACPI S5.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import unquote

from pyhv.arch.x86 import layout
from pyhv.errors import HostError, ImageError
from pyhv.exitmarker import MARKER_WORD, ExitMarker
from pyhv.loader.initramfs import Initramfs

CACHE_ENV = "PYHV_CACHE"
METAPACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
DEFAULT_CMDLINE = "console=ttyS0"
CMD_PARAM = "pyhv.cmd"
MODULES_PARAM = "pyhv.modules"
NET_PARAM = "pyhv.net"
ROOT_PARAM = "pyhv.root"
ROOT_MOUNT = "/newroot"
ROOT_WAIT_TENTHS = 100      # /init waits up to 10 s for the root disk's device node
BOOT_TIMER_VALUE = 123
VIRTIO_VENDOR = "0x1af4"
# The virtio modules the guest needs for disks and network (docs/host.md: all =m in Debian).
VIRTIO_MODULES = ("virtio", "virtio_ring", "virtio_pci_modern_dev", "virtio_pci_legacy_dev",
                  "virtio_pci", "virtio_blk", "virtio_net", "net_failover", "failover",
                  "virtio_rng", "virtio_balloon")
# The ACPI power button as an input event, for acpid; loaded when the shell runs. Debian's
# cloud kernel builds both as modules (CONFIG_ACPI_BUTTON=m, CONFIG_INPUT_EVDEV=m in the
# image's `config`).
BUTTON_MODULES = ("button", "evdev")
IMAGE_FORMAT = 7           # 6: button + evdev + acpid (the power button powers off);
                           # 7: virtio_balloon (`pyhv run --balloon`)
WANTED_MODULES = VIRTIO_MODULES + BUTTON_MODULES
APT_TIMEOUT = 600


@dataclass(frozen=True)
class LinuxImage:
    """A cached, complete guest image: what `pyhv run` needs to boot Linux."""

    kernel_path: Path
    initrd_path: Path
    version: str                # the kernel release, e.g. "6.1.0-56-cloud-amd64"
    cmdline_default: str
    package: str = ""           # e.g. "linux-image-6.1.0-56-cloud-amd64"
    package_version: str = ""   # e.g. "6.1.192-2"
    busybox_version: str = ""
    modules: tuple[str, ...] = ()
    wanted_modules: tuple[str, ...] = ()    # WANTED_MODULES when it was built

    @property
    def current(self) -> bool:
        """Built with every module this pyhv wants (an older pyhv's image is rebuilt)."""
        return set(WANTED_MODULES) <= set(self.wanted_modules)

    @property
    def directory(self) -> Path:
        return self.kernel_path.parent


# ---------------------------------------------------------------- the guest side

def command_param(command: str, marker: ExitMarker | None = None) -> str:
    """The kernel command-line word that makes /init run `command` and power off; with
    a `marker` (a nonce), `command` is wrapped to print that marker with its status."""
    script = marker.wrap(command) if marker is not None else command
    return f"{CMD_PARAM}={base64.b64encode(script.encode()).decode()}"


def init_script(release: str = "") -> str:
    """The guest's /init (busybox sh). `release` names the modules directory."""
    moddir = f"/lib/modules/{release}" if release else "/lib/modules/$(uname -r)"
    return f"""#!/bin/sh
# /init of pyhv's Linux guest, generated by pyhv.images: see docs/linux.md.
/bin/pyhv-boottimer 2>/dev/null  # port {layout.BOOT_TIMER_PORT:#x} <- {BOOT_TIMER_VALUE}
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root
mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev 2>/dev/null
mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mkdir -p /dev/pts /dev/shm /tmp /run
mount -t devpts -o gid=5,mode=620 devpts /dev/pts 2>/dev/null
mount -t tmpfs -o nosuid,nodev tmpfs /tmp
mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs /run
hostname pyhv
ip link set lo up 2>/dev/null

set -f   # the command line is split into words below, never globbed
cmd= modules=auto net= root=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        {CMD_PARAM}=*) cmd=${{arg#{CMD_PARAM}=}} ;;
        {NET_PARAM}=*) net=${{arg#{NET_PARAM}=}} ;;
        {MODULES_PARAM}=*) modules=${{arg#{MODULES_PARAM}=}} ;;
        {ROOT_PARAM}=*) root=${{arg#{ROOT_PARAM}=}} modules=all ;;
    esac
done
set +f
button=yes       # for acpid, which only the shell's init runs
{{ [ "$modules" = none ] || [ -n "$cmd" ]; }} && button=no

if [ "$modules" = auto ]; then
    modules=none
    for v in /sys/bus/pci/devices/*/vendor; do
        [ "$(cat "$v" 2>/dev/null)" = {VIRTIO_VENDOR} ] && modules=all && break
    done
fi
if [ "$modules" = all ] && [ -r {moddir}/pyhv-load-order ]; then
    while read -r m; do
        insmod {moddir}/"$m" 2>/dev/null
    done < {moddir}/pyhv-load-order
fi
# the power button (for acpid): button.ko finds ACPI's fixed-feature button, evdev
# gives it /dev/input/event*; loaded whatever the PCI bus shows, unless a command runs or
# {MODULES_PARAM}=none
if [ "$button" = yes ] && [ -r {moddir}/pyhv-load-button ]; then
    while read -r m; do
        insmod {moddir}/"$m" 2>/dev/null
    done < {moddir}/pyhv-load-button
fi

if [ "$net" = dhcp ]; then
    ip link set eth0 up 2>/dev/null
    udhcpc -i eth0 -q -n -t 10 -T 1 -O mtu >/dev/null 2>&1 ||
        echo "pyhv: no DHCP lease on eth0" >&2
fi

# A root disk ({ROOT_PARAM}=DEV): mount it on {ROOT_MOUNT}; commands and the shell run
# chrooted into it, this busybox stays PID 1 (poweroff, reaping).
chroot=
if [ -n "$root" ]; then
    i=0
    while [ ! -b "$root" ] && [ $i -lt {ROOT_WAIT_TENTHS} ]; do sleep 0.1; i=$((i + 1)); done
    mkdir -p {ROOT_MOUNT}
    if [ ! -b "$root" ]; then
        echo "pyhv: the root disk $root did not appear (no virtio-blk disk?)" >&2
    elif ! mount -o rw "$root" {ROOT_MOUNT}; then
        echo "pyhv: cannot mount the root disk $root" >&2
    elif [ ! -x {ROOT_MOUNT}/bin/sh ]; then
        echo "pyhv: the root disk $root has no /bin/sh" >&2
        umount {ROOT_MOUNT}
    else
        mkdir -p {ROOT_MOUNT}/dev {ROOT_MOUNT}/proc {ROOT_MOUNT}/sys {ROOT_MOUNT}/run
        mount -o rbind /dev {ROOT_MOUNT}/dev
        mount -t proc -o nosuid,nodev,noexec proc {ROOT_MOUNT}/proc
        mount -t sysfs -o nosuid,nodev,noexec sysfs {ROOT_MOUNT}/sys
        mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs {ROOT_MOUNT}/run
        # modules the kernel asks for come from the root disk's own tree
        echo /bin/pyhv-modprobe > /proc/sys/kernel/modprobe
        chroot="chroot {ROOT_MOUNT}"
        [ -s {ROOT_MOUNT}/etc/hostname ] && hostname -F {ROOT_MOUNT}/etc/hostname
        # the console's shell is the root disk's (busybox init respawns it)
        echo "::respawn:/bin/cttyhack /bin/pyhv-rootshell" > /etc/inittab
        echo "::ctrlaltdel:/sbin/reboot" >> /etc/inittab
        echo "::shutdown:/bin/sync" >> /etc/inittab
        echo "::shutdown:/bin/mount -o remount,ro {ROOT_MOUNT}" >> /etc/inittab
    fi
    if [ -z "$chroot" ] && [ -z "$cmd" ]; then
        echo "pyhv: starting the initramfs's shell instead" >&2
    fi
fi

if [ -n "$cmd" ]; then
    cd /root
    if [ -n "$root" ] && [ -z "$chroot" ]; then
        status=127       # the command cannot run where it was asked to
    elif script=$(echo "$cmd" | base64 -d 2>/dev/null) && [ -n "$script" ]; then
        $chroot /bin/sh -c 'cd /root 2>/dev/null; exec /bin/sh -c "$1"' sh "$script"
        status=$?
    else
        echo "pyhv: {CMD_PARAM}= is not a base64-encoded command" >&2
        status=127
    fi
    printf '{MARKER_WORD} %d@@\\n' "$status"
    sync
    [ -n "$chroot" ] && mount -o remount,ro {ROOT_MOUNT} 2>/dev/null
    poweroff -f
    while :; do sleep 3600; done   # init must never exit
fi

# acpid (the power button: `pyhv shutdown`), when evdev gave the button an event device
if ls /dev/input/event* >/dev/null 2>&1; then
    echo "::respawn:{ACPID}" >> /etc/inittab
fi
exec /sbin/init
"""


ROOT_SHELL = f"""#!/bin/sh
# The console's login shell with a root disk: bash (else sh) inside {ROOT_MOUNT}.
export HOME=/root TERM="${{TERM:-linux}}"
exec chroot {ROOT_MOUNT} /bin/sh -c \
    'cd /root 2>/dev/null; [ -x /bin/bash ] && exec /bin/bash -l; exec /bin/sh -l'
"""

MODPROBE_HELPER = f"""#!/bin/sh
# /proc/sys/kernel/modprobe with a root disk: the kernel's module requests are served by
# the root disk's modprobe and module tree (pyhv.images).
exec chroot {ROOT_MOUNT} /sbin/modprobe "$@"
"""


# busybox acpid in the foreground (init respawns it), its log discarded: it listens on
# /dev/input/event* and maps KEY_POWER to "PWRF", which /etc/acpid.conf sends to
# /etc/acpi/power (relative to -c /etc/acpi).
ACPID = "/sbin/acpid -f -c /etc/acpi -a /etc/acpid.conf -l /dev/null"
ACPID_CONF = "PWRF power\n"
ACPI_POWER = """\
#!/bin/sh
# acpid's action for the ACPI power button (pyhv shutdown): busybox init's orderly
# poweroff (its ::shutdown actions, then SIGTERM/SIGKILL to all, then ACPI S5).
exec /sbin/poweroff
"""

INITTAB = """\
# busybox init: a shell on the console (cttyhack gives it job control), respawned.
# (/init adds acpid, which turns the ACPI power button into `poweroff`.)
::respawn:/bin/cttyhack /bin/sh -l
::ctrlaltdel:/sbin/reboot
::shutdown:/bin/sync
"""

# udhcpc's hook (busybox runs it with deconfig, bound, renew, leasefail, nak): apply
# the lease: address/prefix, MTU (option 26, asked for with -O mtu), default route, DNS.
UDHCPC_SCRIPT = """\
#!/bin/sh
# udhcpc hook of pyhv's initramfs (pyhv.images)
case "$1" in
    deconfig)
        ip -4 addr flush dev "$interface"
        ip link set "$interface" up
        ;;
    bound|renew)
        ip -4 addr flush dev "$interface"
        ip addr add "$ip/${mask:-24}" dev "$interface"
        [ -n "$mtu" ] && ip link set "$interface" mtu "$mtu"
        if [ -n "$router" ]; then
            while ip route del default dev "$interface" 2>/dev/null; do :; done
            set -- $router
            ip route add default via "$1" dev "$interface"
        fi
        : > /etc/resolv.conf
        [ -n "$domain" ] && echo "search $domain" >> /etc/resolv.conf
        for d in $dns; do echo "nameserver $d" >> /etc/resolv.conf; done
        ;;
esac
exit 0
"""

PROFILE = """\
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root
PS1='pyhv:\\w# '
"""


def boottimer_elf(port: int = layout.BOOT_TIMER_PORT, value: int = BOOT_TIMER_VALUE) -> bytes:
    """A static x86-64 ELF executable that writes `value` to I/O port `port` and exits.

    The code (49 bytes; `as` + `objdump` checked):

        mov $173, %eax ; mov $port, %edi ; mov $1, %esi ; mov $1, %edx ; syscall  # ioperm
        test %eax, %eax ; jnz 1f
        mov $port, %dx ; mov $value, %al ; out %al, (%dx) ; xor %edi, %edi ; jmp 2f
    1:  mov $1, %edi
    2:  mov $60, %eax ; syscall                                                # exit
    """
    code = (b"\xb8\xad\x00\x00\x00" + b"\xbf" + struct.pack("<I", port)
            + b"\xbe\x01\x00\x00\x00" + b"\xba\x01\x00\x00\x00" + b"\x0f\x05"
            + b"\x85\xc0" + b"\x75\x0b"
            + b"\x66\xba" + struct.pack("<H", port) + b"\xb0" + bytes([value & 0xFF]) + b"\xee"
            + b"\x31\xff" + b"\xeb\x05"
            + b"\xbf\x01\x00\x00\x00"
            + b"\xb8\x3c\x00\x00\x00" + b"\x0f\x05")
    base, ehsize, phsize = 0x400000, 64, 56
    entry = base + ehsize + phsize
    ehdr = (b"\x7fELF\x02\x01\x01" + bytes(9)
            + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, entry, ehsize, 0, 0, ehsize, phsize,
                          1, 0, 0, 0))
    size = ehsize + phsize + len(code)
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 0, base, base, size, size, 0x1000)  # PT_LOAD, R+X
    return ehdr + phdr + code


# ---------------------------------------------------------------- kernel modules

def _modinfo(ko: bytes) -> dict[str, str]:
    """The key=value strings of a module's .modinfo section (ELF64 section headers)."""
    if ko[:4] != b"\x7fELF" or ko[4] != 2 or len(ko) < 64:
        raise ImageError("kernel module is not an ELF64 object")
    shoff, = struct.unpack_from("<Q", ko, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", ko, 0x3A)
    if shoff + shnum * shentsize > len(ko) or shstrndx >= shnum:
        raise ImageError("kernel module has a truncated section table")

    def section(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, off, size = struct.unpack_from("<IIQQQQ", ko,
                                                                    shoff + i * shentsize)
        return name, off, size

    _, str_off, str_size = section(shstrndx)
    for i in range(shnum):
        name_off, off, size = section(i)
        end = ko.find(b"\0", str_off + name_off)
        if ko[str_off + name_off:end] == b".modinfo":
            info: dict[str, str] = {}
            for item in ko[off:off + size].split(b"\0"):
                key, sep, val = item.decode("utf-8", "replace").partition("=")
                if sep and key not in info:
                    info[key] = val
            return info
    _ = str_size
    return {}


def _decompress_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".xz":
        import lzma
        return lzma.decompress(data)
    if path.suffix == ".gz":
        import gzip
        return gzip.decompress(data)
    if path.suffix == ".zst":
        zstd = shutil.which("zstd")
        if zstd is None:
            raise HostError(f"{path.name} is zstd-compressed and the zstd tool is missing "
                            "(apt-get install zstd)")
        return subprocess.run([zstd, "-dc", str(path)], check=True, capture_output=True).stdout
    return data


def _module_name(path: Path) -> str:
    name = path.name
    for suffix in (".xz", ".zst", ".gz"):
        name = name.removesuffix(suffix)
    return name.removesuffix(".ko").replace("-", "_")


@dataclass(frozen=True)
class Module:
    name: str
    relpath: str        # under lib/modules/<release>/, always ending in ".ko"
    data: bytes         # uncompressed
    depends: tuple[str, ...]


def collect_modules(moddir: Path, wanted: tuple[str, ...] = WANTED_MODULES) -> list[Module]:
    """The wanted modules that exist under moddir (lib/modules/<release>) and everything
    they depend on (per .modinfo "depends="), dependencies first."""
    index = {_module_name(p): p for p in sorted(moddir.rglob("*.ko*"))
             if p.is_file() and re.search(r"\.ko(\.xz|\.zst|\.gz)?$", p.name)}
    loaded: dict[str, Module] = {}
    order: list[Module] = []

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in loaded or name not in index:
            return
        if name in chain:
            raise ImageError(f"kernel modules depend on each other in a cycle: {chain}")
        path = index[name]
        data = _decompress_module(path)
        deps = tuple(d.replace("-", "_") for d in _modinfo(data).get("depends", "").split(",")
                     if d)
        for dep in deps:
            visit(dep, (*chain, name))
        rel = str(path.relative_to(moddir))
        rel = re.sub(r"\.ko\.(xz|zst|gz)$", ".ko", rel)
        mod = Module(name, rel, data, deps)
        loaded[name] = mod
        order.append(mod)

    for name in wanted:
        visit(name, ())
    return order


# ---------------------------------------------------------------- the initramfs

def build_initramfs(busybox: Path, *, release: str = "", modules: list[Module] | None = None,
                    applets: list[str] | None = None) -> bytes:
    """The gzip-compressed initramfs: busybox and its applets, /init, devices, modules."""
    fs = Initramfs()
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "tmp",
              "run", "mnt", "var", "lib/modules"):
        fs.add_dir(d)
    fs.add_dir("root", 0o700)
    fs.add_device("dev/console", "c", 5, 1, 0o600)
    fs.add_device("dev/null", "c", 1, 3, 0o666)
    fs.add_device("dev/ttyS0", "c", 4, 64, 0o660)
    fs.add_file("bin/busybox", busybox.read_bytes(), 0o755)
    for applet in applets if applets is not None else busybox_applets(busybox):
        path = applet.strip("/")
        if path in ("linuxrc", "bin/busybox", "init") or path in fs:
            continue
        fs.add_symlink(path, "/bin/busybox")
    fs.add_file("bin/pyhv-boottimer", boottimer_elf(), 0o755)
    fs.add_file("init", init_script(release).encode(), 0o755)
    fs.add_file("bin/pyhv-modprobe", MODPROBE_HELPER.encode(), 0o755)
    fs.add_file("bin/pyhv-rootshell", ROOT_SHELL.encode(), 0o755)
    fs.add_file("etc/inittab", INITTAB.encode())
    fs.add_file("etc/acpid.conf", ACPID_CONF.encode())
    fs.add_dir("etc/acpi")
    fs.add_file("etc/acpi/power", ACPI_POWER.encode(), 0o755)
    fs.add_file("etc/profile", PROFILE.encode())
    fs.add_file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    fs.add_file("etc/group", b"root:x:0:\ntty:x:5:\n")
    fs.add_file("etc/hostname", b"pyhv\n")
    fs.add_file("etc/udhcpc/default.script", UDHCPC_SCRIPT.encode(), 0o755)
    if modules and release:
        base = f"lib/modules/{release}"
        fs.add_dir(base)
        dep_lines = []
        by_name = {m.name: m for m in modules}
        for m in modules:
            fs.add_file(f"{base}/{m.relpath}", m.data)
            closure = _closure(m.name, by_name)
            dep_lines.append(f"{m.relpath}: " + " ".join(by_name[d].relpath for d in closure))
        fs.add_file(f"{base}/modules.dep", ("\n".join(dep_lines) + "\n").encode())
        button = set(_load_set(BUTTON_MODULES, by_name)) - set(_load_set(VIRTIO_MODULES,
                                                                          by_name))
        fs.add_file(f"{base}/pyhv-load-order", "".join(
            m.relpath + "\n" for m in modules if m.name not in button).encode())
        fs.add_file(f"{base}/pyhv-load-button", "".join(
            m.relpath + "\n" for m in modules if m.name in button).encode())
    return fs.to_bytes("gzip")


def _load_set(wanted: tuple[str, ...], by_name: dict[str, Module]) -> list[str]:
    """The wanted modules present and their dependencies (a module the virtio and the
    button group share is loaded with the virtio one)."""
    return [n for w in wanted if w in by_name for n in (w, *_closure(w, by_name))]


def _closure(name: str, by_name: dict[str, Module]) -> list[str]:
    """All of name's dependencies in modules.dep order: every module before the ones it
    depends on, so that loading the list from right to left loads dependencies first."""
    seen: set[str] = set()
    todo = list(by_name[name].depends)
    while todo:
        d = todo.pop()
        if d in by_name and d not in seen:
            seen.add(d)
            todo.extend(by_name[d].depends)
    topo = list(by_name)            # by_name preserves collect_modules' deps-first order
    return sorted(seen, key=topo.index, reverse=True)


# Used when the busybox binary cannot run on this host to list its applets.
_FALLBACK_APPLETS = [f"bin/{a}" for a in (
    "sh", "ash", "cat", "cp", "dd", "dmesg", "echo", "grep", "ls", "mkdir", "mknod", "mount",
    "mv", "ps", "rm", "sed", "sleep", "sync", "umount", "uname", "vi", "base64", "printf",
    "cttyhack", "setsid", "hostname", "ip", "insmod", "lsmod", "modprobe", "head", "tail",
    "wc", "awk", "expr", "test", "[", "true", "false", "env", "free", "top", "seq")] + [
    f"sbin/{a}" for a in ("init", "poweroff", "reboot", "halt")]


def busybox_applets(busybox: Path) -> list[str]:
    """The applet paths (e.g. "bin/ls", "usr/bin/awk") busybox was built with."""
    try:
        out = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return _FALLBACK_APPLETS
    return out or _FALLBACK_APPLETS


# ---------------------------------------------------------------- the cache

def image_dir_name(release: str) -> str:
    """The cache directory of one kernel release's image. Formats after the first carry
    their number, so pyhv versions that share a cache (two checkouts, an upgrade) each
    keep the image they can boot instead of rebuilding it over the other's."""
    return f"linux-{release}" if IMAGE_FORMAT == 1 else f"linux-{release}.v{IMAGE_FORMAT}"


def cache_dir() -> Path:
    """Where images live: $PYHV_CACHE, else ~/.cache/pyhv/images."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pyhv" / "images"


def _read_image(directory: Path) -> LinuxImage | None:
    meta = directory / "image.json"
    try:
        d = json.loads(meta.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(d, dict) or d.get("format") != IMAGE_FORMAT:
        return None
    img = LinuxImage(kernel_path=directory / "vmlinuz", initrd_path=directory /
                     "initramfs.cpio.gz", version=str(d.get("version", "")),
                     cmdline_default=str(d.get("cmdline_default", DEFAULT_CMDLINE)),
                     package=str(d.get("package", "")),
                     package_version=str(d.get("package_version", "")),
                     busybox_version=str(d.get("busybox_version", "")),
                     modules=tuple(d.get("modules", ())),
                     wanted_modules=tuple(d.get("wanted_modules", ())))
    if not (img.kernel_path.is_file() and img.initrd_path.is_file()):
        return None
    return img


def cached_images(root: Path | None = None) -> list[LinuxImage]:
    """Complete images in the cache, newest first."""
    root = root or cache_dir()
    if not root.is_dir():
        return []
    found = [img for d in root.glob("linux-*") if d.is_dir()
             if (img := _read_image(d)) is not None]
    found.sort(key=lambda i: (i.directory / "image.json").stat().st_mtime, reverse=True)
    return found


class _Steps:
    """Progress for the long steps: a rich spinner on a terminal, plain lines otherwise."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    @contextmanager
    def step(self, what: str) -> Iterator[None]:
        if self.quiet:
            yield
            return
        t0 = time.monotonic()
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.text import Text
            console = Console(stderr=True, highlight=False)
            with console.status(Text(what + " ...")):
                yield
            console.print(Text(f"{what}: done ({time.monotonic() - t0:.1f} s)"))
        else:
            print(f"pyhv: {what} ...", file=sys.stderr, flush=True)
            yield

    def say(self, text: str) -> None:
        if not self.quiet:
            print(f"pyhv: {text}", file=sys.stderr, flush=True)


def _run(argv: list[str], *, cwd: Path | None = None, what: str) -> str:
    """Run a host tool; a failure becomes a one-line HostError with its last stderr line."""
    if shutil.which(argv[0]) is None:
        raise HostError(f"{what} needs {argv[0]!r}, which is not installed (pyhv fetches "
                        "guest images with Debian's apt tools)")
    try:
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True,
                              timeout=APT_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise HostError(f"{what}: {' '.join(argv)} took more than {APT_TIMEOUT} s") from None
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()
                 and not ln.startswith("W: Download is performed unsandboxed")]
        last = lines[-1] if lines else f"exit status {proc.returncode}"
        raise HostError(f"{what} failed: {' '.join(argv[:3])}: {last}")
    return proc.stdout


def _apt_depends(package: str) -> list[str] | None:
    """The packages `package`'s candidate version depends on, or None if apt has no
    candidate for it (empty or stale package lists)."""
    try:
        out = subprocess.run(["apt-cache", "depends", "--no-recommends", "--no-suggests",
                              package], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return [line.split(":", 1)[1].strip() for line in out.stdout.splitlines()
            if line.strip().startswith("Depends:")]


def _apt_version(package: str) -> str:
    out = _run(["apt-cache", "show", "--no-all-versions", package], what="apt-cache show")
    for line in out.splitlines():
        if line.startswith("Version:"):
            return line.split(":", 1)[1].strip()
    raise HostError(f"apt-cache show {package}: no Version field")


def resolve_kernel_package(steps: _Steps | None = None) -> str:
    """The versioned kernel package the cloud metapackage depends on now; runs
    `apt-get update` once if apt does not know the metapackage (empty package lists)."""
    deps = _apt_depends(METAPACKAGE)
    if not deps:
        (steps or _Steps(True)).say("apt knows no candidate for "
                                    f"{METAPACKAGE}: running apt-get update")
        _run(["apt-get", "update"], what="apt-get update")
        deps = _apt_depends(METAPACKAGE)
    if not deps:
        raise HostError(f"apt has no candidate for {METAPACKAGE}: is a Debian amd64 "
                        "archive in the apt sources?")
    for dep in deps:
        name = dep.split()[0]
        if re.fullmatch(r"linux-image-[0-9].*-cloud-amd64(-unsigned)?", name):
            return name
    raise HostError(f"{METAPACKAGE} depends on no versioned kernel ({', '.join(deps)})")


def _find_deb(debs: Path, package: str, version: str) -> Path | None:
    for p in debs.glob(f"{package}_*.deb"):
        parts = p.name[:-4].split("_")
        if len(parts) == 3 and parts[0] == package and unquote(parts[1]) == version:
            return p
    return None


def _download(debs: Path, packages: list[tuple[str, str]], steps: _Steps) -> list[Path]:
    """apt-get download each (package, version) not already in debs/; return the files."""
    debs.mkdir(parents=True, exist_ok=True)
    missing = [(p, v) for p, v in packages if _find_deb(debs, p, v) is None]
    if missing:
        with steps.step("downloading " + ", ".join(f"{p} {v}" for p, v in missing)):
            argv = ["apt-get", "download"]
            if os.geteuid() == 0:      # apt's _apt sandbox user cannot write into ~/.cache
                argv += ["-o", "APT::Sandbox::User=root"]
            _run(argv + [f"{p}={v}" for p, v in missing], cwd=debs, what="apt-get download")
    found = []
    for p, v in packages:
        deb = _find_deb(debs, p, v)
        if deb is None:
            raise HostError(f"apt-get download {p}={v} left no .deb in {debs}")
        found.append(deb)
    return found


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def fetch_linux(*, force: bool = False, quiet: bool = False,
                root: Path | None = None) -> LinuxImage:
    """Make sure the current Debian cloud kernel + busybox initramfs is cached; return it."""
    steps = _Steps(quiet)
    root = root or cache_dir()
    with steps.step(f"resolving {METAPACKAGE}"):
        kpkg = resolve_kernel_package(steps)
        kver = _apt_version(kpkg)
        bver = _apt_version(BUSYBOX_PACKAGE)
    release = kpkg.removeprefix("linux-image-").removesuffix("-unsigned")
    outdir = root / image_dir_name(release)
    existing = _read_image(outdir)
    if (existing is not None and not force and existing.package_version == kver
            and existing.busybox_version == bver and existing.current):
        steps.say(f"Linux {release} is up to date in {outdir}")
        return existing
    kdeb, bdeb = _download(root / "debs", [(kpkg, kver), (BUSYBOX_PACKAGE, bver)], steps)
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / "image.json").unlink(missing_ok=True)     # incomplete until rewritten
    with tempfile.TemporaryDirectory(prefix="extract-", dir=root) as tmp:
        tree = Path(tmp)
        with steps.step(f"extracting {kdeb.name} and {bdeb.name}"):
            _run(["dpkg-deb", "-x", str(kdeb), str(tree)], what="dpkg-deb -x")
            _run(["dpkg-deb", "-x", str(bdeb), str(tree)], what="dpkg-deb -x")
        vmlinuz = tree / "boot" / f"vmlinuz-{release}"
        busybox = tree / "bin" / "busybox"
        if not vmlinuz.is_file():
            raise ImageError(f"{kdeb.name} holds no boot/vmlinuz-{release}")
        if not busybox.is_file():
            raise ImageError(f"{bdeb.name} holds no bin/busybox")
        with steps.step("building the initramfs (busybox, /init, kernel modules)"):
            moddir = tree / "lib" / "modules" / release
            modules = collect_modules(moddir) if moddir.is_dir() else []
            initrd = build_initramfs(busybox, release=release, modules=modules)
        shutil.copyfile(vmlinuz, outdir / "vmlinuz.tmp")
        (outdir / "vmlinuz.tmp").replace(outdir / "vmlinuz")
        for name in ("config", "System.map"):
            src = tree / "boot" / f"{name}-{release}"
            if src.is_file():
                shutil.copyfile(src, outdir / name)
        _write_atomic(outdir / "initramfs.cpio.gz", initrd)
    img = LinuxImage(kernel_path=outdir / "vmlinuz", initrd_path=outdir / "initramfs.cpio.gz",
                     version=release, cmdline_default=DEFAULT_CMDLINE, package=kpkg,
                     package_version=kver, busybox_version=bver,
                     modules=tuple(m.name for m in modules), wanted_modules=WANTED_MODULES)
    meta = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(img).items()}
    meta["format"] = IMAGE_FORMAT
    meta["built"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    _write_atomic(outdir / "image.json", (json.dumps(meta, indent=2) + "\n").encode())
    steps.say(f"Linux {release} ({kpkg} {kver}) and its initramfs are in {outdir}")
    return img


def ensure_linux_image(*, quiet: bool = False) -> LinuxImage:
    """A cached Linux image, fetching one only if the cache has none (so it works offline
    once fetched). What `pyhv run` with no --kernel boots."""
    images = cached_images()
    if images and images[0].current:
        return images[0]
    return fetch_linux(quiet=quiet)


__all__ = ["LinuxImage", "build_initramfs", "cache_dir", "cached_images", "command_param",
           "ensure_linux_image", "fetch_linux", "init_script"]
