"""A Debian root disk built from Debian's packages: `pyhv guest fetch debian`.

    mmdebstrap --variant=apt --include=bc,python3,linux-image-<release>=<version> \\
        --customize-hook=<pyhv's hook> <suite> /dev/null <the host's apt sources>
        -> the hook: pyhv's files into the tree, then `mke2fs -t ext4 -d TREE disk.raw`
    pyhv's block layer: disk.raw -> disk.qcow2 (zero clusters left out), then checked
        by pyhv's qcow2 checker and by `qemu-img check` (when installed)

The kernel is the one `pyhv guest fetch linux` caches (pyhv.images): the disk gets the
same `linux-image-<release>` package at the same version, so its /lib/modules matches
the kernel pyhv boots and userland in the guest can load modules. The suite is the
host's Debian release (/etc/os-release) and the packages come from the host's own apt
sources, the same archive the kernel was fetched from.

No loop mounts: mmdebstrap builds the tree in a temporary directory (as root, or in a
user namespace otherwise) and runs the hook while the tree exists; the hook bind-mounts
it (in a private mount namespace, so the /proc, /sys and /dev mmdebstrap mounted inside
are not seen) and `mke2fs -d` copies it, ownership included, into a sparse raw file.

The cache (pyhv.images.cache_dir()):

    debian-<suite>-<release>/   disk.qcow2 (the root file system, ext4, no partition
                                table: /dev/vda), image.json (what was built from what)

Invariants: a disk is complete exactly when its image.json exists, written last and
atomically (disk.qcow2 is renamed into place before it); the raw file and the tree live
in a temporary directory that is removed on every path; fetch is idempotent (a complete
disk of the same kernel package, suite, package list and builder version is reused);
`pyhv run --image debian` never writes the cached disk (it boots a throwaway overlay).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pyhv import images
from pyhv.errors import HostError, ImageError

PACKAGES = ("bc", "python3")           # besides apt (the variant) and the kernel
VARIANT = "apt"                        # Debian's Essential set + apt
DISK_SIZE = 4 << 30                    # virtual size: room for apt installs (qcow2: sparse)
DISK_FORMAT = 1                        # bump when the disk's content or layout changes
MMDEBSTRAP_TIMEOUT = 1800
MKE2FS_OPTS = ("-t", "ext4", "-L", "pyhv-root", "-E", "lazy_itable_init=1,lazy_journal_init=1")
MMDEBSTRAP_INSTALL_HINT = ("install it with `apt-get install mmdebstrap` (Debian 11 and "
                           "later; scripts/setup.sh installs it)")

# pyhv's files in the Debian tree. /init (pyhv.images) stays PID 1 and runs the disk's
# programs chrooted, so power-off goes to it: busybox's poweroff signals PID 1, and busybox
# is reached through PID 1's root. /usr/local/sbin comes first in Debian's root PATH.
_POWER_HELPER = """#!/bin/sh
# pyhv: {verb} through pyhv's init (PID 1, busybox, in the initramfs): see docs/linux.md.
exec /proc/1/root/bin/busybox {verb} "$@"
"""

# The customize hook, run by `sh` with $1 = the tree, $2 = the work directory, $3 = the
# kernel release, $4 = the raw file's size in KiB. `set -e`: any failure fails the build.
_HOOK = """set -eu
root=$1 work=$2 release=$3 size_kib=$4
if [ ! -s "$root/lib/modules/$release/modules.dep" ]; then
    echo "E: the tree has no /lib/modules/$release/modules.dep" >&2
    exit 1
fi
cp -R "$work/files/." "$root/"
# what mmdebstrap would clean after the hooks: the downloaded .debs and package lists
find "$root/var/cache/apt/archives" "$root/var/lib/apt/lists" -type f \
    ! -name lock -delete 2>/dev/null || true
rm -f "$root"/var/cache/apt/*.bin
mkdir -p "$work/tree"
echo "I: pyhv: copying the tree into an ext4 file system (mke2fs -d)" >&2
exec unshare --mount --propagation private sh -c '
    set -eu
    mount --bind "$1" "$2/tree"
    du -sxk "$2/tree" | cut -f1 > "$2/used_kib"
    mke2fs -q -F -d "$2/tree" {mke2fs_opts} "$2/disk.raw" "$3"k
' sh "$root" "$work" "$size_kib"
"""


def _hook() -> str:
    return _HOOK.replace("{mke2fs_opts}", " ".join(MKE2FS_OPTS))


def _pyhv_files(files: Path) -> None:
    """What pyhv adds to the Debian tree (copied in by the hook)."""
    sbin = files / "usr" / "local" / "sbin"
    sbin.mkdir(parents=True)
    for verb in ("poweroff", "halt", "reboot"):
        (sbin / verb).write_text(_POWER_HELPER.format(verb=verb))
        (sbin / verb).chmod(0o755)
    (files / "etc").mkdir()
    (files / "etc" / "hostname").write_text("pyhv-debian\n")
    (files / "etc" / "fstab").write_text("/dev/vda / ext4 defaults 0 1\n")


@dataclass(frozen=True)
class DebianDisk:
    """A cached, complete Debian root disk and the kernel + initramfs that boot it."""

    disk_path: Path
    linux: images.LinuxImage
    suite: str
    packages: tuple[str, ...]
    used_bytes: int
    disk_size: int

    @property
    def directory(self) -> Path:
        return self.disk_path.parent

    @property
    def cmdline_words(self) -> tuple[str, ...]:
        """What the kernel command line needs for this disk as the guest's /dev/vda."""
        return (f"{images.ROOT_PARAM}=/dev/vda",)


def host_suite() -> str:
    """The host's Debian release codename (VERSION_CODENAME of /etc/os-release)."""
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        text = ""
    fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    if fields.get("ID", "").strip('"') != "debian" or not fields.get("VERSION_CODENAME"):
        raise HostError("pyhv builds its Debian disk for the host's Debian release, and this "
                        "host is not Debian (no ID=debian/VERSION_CODENAME in /etc/os-release)")
    return fields["VERSION_CODENAME"].strip('"')


def host_apt_sources() -> list[Path]:
    """The host's apt source files (one-line .list and deb822 .sources), in apt's order."""
    etc = Path("/etc/apt")
    found = [etc / "sources.list"] if (etc / "sources.list").is_file() else []
    d = etc / "sources.list.d"
    if d.is_dir():
        found += sorted(p for p in d.iterdir()
                        if p.is_file() and p.suffix in (".list", ".sources"))
    return [p for p in found if p.stat().st_size > 0]


def _dir_name(suite: str, release: str) -> str:
    return f"debian-{suite}-{release}"


def _read(directory: Path, linux: images.LinuxImage | None) -> DebianDisk | None:
    try:
        d = json.loads((directory / "image.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(d, dict) or d.get("format") != DISK_FORMAT:
        return None
    disk = directory / "disk.qcow2"
    if not disk.is_file():
        return None
    if linux is None:
        linux = next((i for i in images.cached_images(directory.parent) if i.current
                      and i.version == d.get("kernel_release")
                      and i.package_version == d.get("kernel_package_version")), None)
        if linux is None:
            return None
    if (linux.version, linux.package_version) != (d.get("kernel_release"),
                                                  d.get("kernel_package_version")):
        return None
    return DebianDisk(disk_path=disk, linux=linux, suite=str(d.get("suite", "")),
                      packages=tuple(d.get("packages", ())),
                      used_bytes=int(d.get("used_bytes", 0)),
                      disk_size=int(d.get("disk_size", 0)))


def cached_disks(root: Path | None = None) -> list[DebianDisk]:
    """Complete Debian disks whose kernel image is cached too, newest first."""
    root = root or images.cache_dir()
    if not root.is_dir():
        return []
    found = [disk for d in root.glob("debian-*") if d.is_dir()
             if (disk := _read(d, None)) is not None]
    found.sort(key=lambda x: (x.directory / "image.json").stat().st_mtime, reverse=True)
    return found


def _need(tool: str, hint: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise HostError(f"pyhv guest fetch debian needs {tool}, which is not installed: "
                        f"{hint}")
    return path


def _apt_error(lines: list[str]) -> str:
    """The most telling line of a failed mmdebstrap: apt's first complaint about the
    archive (no network, a missing package), else the last E: line."""
    telling = ("Failed to fetch", "Could not resolve", "Unable to connect", "Could not connect",
               "Unable to locate package", "has no installation candidate",
               "Temporary failure", "Connection failed", "is not signed",
               "Version '", "Unable to correct problems", "Depends:")
    for line in lines:
        if any(t in line for t in telling):
            return line.strip()
    errors = [ln for ln in lines if ln.startswith("E:")]
    generic = ("E: mmdebstrap failed", "E: setup failed", "E: apt-get update failed")
    specific = [ln for ln in errors if not ln.startswith(generic)]
    if specific:
        return specific[-1].strip()
    if errors:
        return errors[-1].strip()
    return lines[-1].strip() if lines else "no output"


def _stream(argv: list[str], env: dict[str, str], steps: images._Steps,
            timeout: float) -> None:
    """Run mmdebstrap, showing its `I:` progress lines; a failure is one HostError."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, errors="replace", env=env)
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        proc.kill()
    timer = threading.Timer(timeout, kill)
    timer.daemon = True
    timer.start()
    lines: list[str] = []
    try:
        assert proc.stderr is not None
        for line in _lines(proc.stderr):
            lines.append(line)
            del lines[:-200]
            if line.startswith("I: "):
                steps.say(f"mmdebstrap: {line[3:]}")
        proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if timed_out.is_set():
        raise HostError(f"mmdebstrap took more than {timeout:.0f} s; gave up")
    if proc.returncode != 0:
        raise HostError(f"building the Debian disk failed (mmdebstrap, status "
                        f"{proc.returncode}): {_apt_error(lines)}")


def _lines(stream: object) -> Iterator[str]:
    for line in stream:  # type: ignore[attr-defined]
        yield str(line).rstrip("\n")


def mmdebstrap_argv(*, suite: str, release: str, package_version: str, work: Path,
                    size: int, sources: list[str], packages: tuple[str, ...] = PACKAGES,
                    variant: str = VARIANT) -> list[str]:
    """The mmdebstrap command that builds the tree and, in its hook, work/disk.raw."""
    hook = work / "hook.sh"
    include = [*packages, f"linux-image-{release}={package_version}"]
    return ["mmdebstrap", f"--variant={variant}", "--include=" + ",".join(include),
            "--aptopt=APT::Install-Recommends \"false\"",
            "--customize-hook=sh " + shlex.quote(str(hook)) + ' "$1" '
            + " ".join(shlex.quote(a) for a in (str(work), release, str(size // 1024))),
            suite, "/dev/null", *sources]


def raw_to_qcow2(raw: Path, dest: Path, *, progress: bool = False) -> None:
    """Convert a raw file into a new qcow2 image with pyhv's own block layer (all-zero
    clusters stay unallocated), then check it with pyhv's checker."""
    from pyhv.disk.imgcli import Progress, _copy
    from pyhv.disk.qcow2.check import check
    from pyhv.disk.qcow2.create import create
    from pyhv.disk.qcow2.image import Qcow2Image
    from pyhv.disk.raw import RawImage

    src = RawImage(str(raw), read_only=True)
    try:
        create(str(dest), src.size)
        dst = Qcow2Image(str(dest), read_only=False, unsafe=True)
        try:
            _copy(src, dst, Progress(progress, src.size))
        finally:
            dst.close()
    finally:
        src.close()
    img = Qcow2Image(str(dest), read_only=True)
    try:
        res = check(img)
    finally:
        img.close()
    if res.exit_status != 0:
        raise ImageError(f"the converted disk {dest} fails its check: "
                         f"{'; '.join(res.messages[:3]) or res.exit_status}")
    os.sync()


def qemu_img_check(disk: Path) -> None:
    """`qemu-img check` as a second opinion on a disk pyhv wrote (skipped, as a check that
    cannot run, when qemu-img is not installed: pyhv's own check has run already)."""
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        return
    proc = subprocess.run([qemu_img, "check", "-q", str(disk)], capture_output=True,
                          text=True, timeout=600)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines()
                or [f"exit status {proc.returncode}"])[-1]
        raise ImageError(f"qemu-img check finds the converted disk {disk} damaged: {last}")


def mke2fs_dir(tree: Path, raw: Path, size: int) -> None:
    """`mke2fs -t ext4 -d tree` into a new sparse raw file of `size` bytes (for trees that
    need no namespace: the caller owns every file in them)."""
    mke2fs = _need("mke2fs", "apt-get install e2fsprogs")
    proc = subprocess.run([mke2fs, "-q", "-F", "-d", str(tree), *MKE2FS_OPTS, str(raw),
                           f"{size // 1024}k"], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise HostError(f"mke2fs -d {tree} failed: {last}")


def fetch_debian(*, force: bool = False, quiet: bool = False, root: Path | None = None,
                 sources: list[str] | None = None, packages: tuple[str, ...] = PACKAGES,
                 linux: images.LinuxImage | None = None) -> DebianDisk:
    """Make sure a Debian root disk for the current kernel is cached; return it.

    `sources` (mmdebstrap MIRROR arguments) default to the host's apt source files;
    `linux` (the kernel image whose package goes on the disk) to `fetch_linux()`'s. A
    failed build leaves a complete disk built before it as it was."""
    steps = images._Steps(quiet)
    root = root or images.cache_dir()
    suite = host_suite()
    _need("mmdebstrap", MMDEBSTRAP_INSTALL_HINT)
    _need("mke2fs", "apt-get install e2fsprogs")
    _need("unshare", "apt-get install util-linux")
    if linux is None:
        linux = images.fetch_linux(quiet=quiet, root=root)
    outdir = root / _dir_name(suite, linux.version)
    existing = _read(outdir, linux)
    if existing is not None and not force and existing.packages == packages:
        steps.say(f"the Debian {suite} disk for {linux.version} is up to date in {outdir}")
        return existing
    if sources is None:
        sources = [str(p) for p in host_apt_sources()]
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="debian-", dir=root) as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)      # mmdebstrap's unshare mode maps other ids into it
        (work / "hook.sh").write_text(_hook())
        _pyhv_files(work / "files")
        env = dict(os.environ, TMPDIR=str(work))
        argv = mmdebstrap_argv(suite=suite, release=linux.version,
                               package_version=linux.package_version, work=work,
                               size=DISK_SIZE, sources=sources, packages=packages)
        t0 = time.monotonic()
        with steps.step(f"building Debian {suite} with {', '.join(packages)}, apt and "
                        f"linux-image-{linux.version} (mmdebstrap, about a minute with a "
                        "fast mirror)"):
            _stream(argv, env, steps, MMDEBSTRAP_TIMEOUT)
        raw = work / "disk.raw"
        if not raw.is_file():
            raise HostError("mmdebstrap succeeded but its hook left no disk.raw")
        used = int((work / "used_kib").read_text().split()[0]) * 1024
        with steps.step(f"converting the {used >> 20} MiB file system to qcow2"):
            raw_to_qcow2(raw, work / "disk.qcow2")
            qemu_img_check(work / "disk.qcow2")
        outdir.mkdir(parents=True, exist_ok=True)
        (outdir / "image.json").unlink(missing_ok=True)      # incomplete until rewritten
        (work / "disk.qcow2").replace(outdir / "disk.qcow2")
        built_s = time.monotonic() - t0
    meta = {"format": DISK_FORMAT, "suite": suite, "packages": list(packages),
            "variant": VARIANT, "kernel_release": linux.version,
            "kernel_package": linux.package, "kernel_package_version": linux.package_version,
            "used_bytes": used, "disk_size": DISK_SIZE, "sources": sources,
            "build_seconds": round(built_s, 1),
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    images._write_atomic(outdir / "image.json", (json.dumps(meta, indent=2) + "\n").encode())
    disk = _read(outdir, linux)
    if disk is None:
        raise ImageError(f"{outdir}: the disk just built does not read back")
    steps.say(f"Debian {suite} ({used >> 20} MiB used of {DISK_SIZE >> 30} GiB) is in "
              f"{disk.disk_path}")
    return disk


def ensure_debian_disk(*, quiet: bool = False) -> DebianDisk:
    """A cached Debian disk, building one only if the cache has none (offline once built)."""
    disks = cached_disks()
    if disks:
        return disks[0]
    return fetch_debian(quiet=quiet)


__all__ = ["DebianDisk", "cached_disks", "ensure_debian_disk", "fetch_debian", "host_suite",
           "mke2fs_dir", "raw_to_qcow2"]
