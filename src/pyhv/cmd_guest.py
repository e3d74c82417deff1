"""`pyhv guest`: fetch and list guest images (Debian's cloud kernel + busybox initramfs,
and a Debian root disk).

    pyhv guest fetch linux [--force]    download, unpack and build (idempotent); prints
                                        where the kernel and initramfs are
    pyhv guest fetch debian [--force]   the same kernel and initramfs, plus a Debian root
                                        disk (qcow2) built with mmdebstrap (pyhv.debian)
    pyhv guest list [--json]            what the cache holds
    pyhv guest path linux               kernel and initrd paths of the newest image, one a
                                        line (for scripts and `qemu -kernel ... -initrd`)
    pyhv guest path debian              kernel, initrd, disk, and the kernel command-line
                                        words the disk needs, one a line

Called `guest` (it was `pyhv image`) so that it cannot be mistaken for `pyhv img`, the
disk-image verbs of qemu-img. The work lives in `pyhv.images`; this module only parses
arguments and prints.
"""

from __future__ import annotations

import argparse
import json

from pyhv import debian, images
from pyhv.errors import ConfigError

KINDS = ("linux", "debian")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="guest_command", metavar="VERB")
    fetch = sub.add_parser("fetch", help="fetch Debian's cloud kernel and build an initramfs "
                           "(linux), and a Debian root disk (debian)")
    fetch.add_argument("kind", choices=KINDS, help="the image to fetch")
    fetch.add_argument("--force", action="store_true",
                       help="rebuild even when the current packages are already cached")
    fetch.add_argument("--quiet", "-q", action="store_true", help="print only the paths")
    lst = sub.add_parser("list", help="list cached images")
    lst.add_argument("--json", action="store_true", help="machine-readable output")
    path = sub.add_parser("path", help="print the kernel and initrd (and disk) paths of a "
                          "cached image")
    path.add_argument("kind", choices=KINDS)


def _describe(img: images.LinuxImage) -> list[str]:
    return [f"Linux {img.version} ({img.package} {img.package_version}, "
            f"busybox {img.busybox_version})",
            f"  kernel:  {img.kernel_path}",
            f"  initrd:  {img.initrd_path}",
            f"  cmdline: {img.cmdline_default}",
            f"  modules: {', '.join(img.modules) or '(none)'}"]


def _describe_disk(disk: debian.DebianDisk) -> list[str]:
    return [f"Debian {disk.suite} root disk ({', '.join(disk.packages)}, apt, "
            f"{disk.linux.package} {disk.linux.package_version}; "
            f"{disk.used_bytes >> 20} MiB used of {disk.disk_size >> 30} GiB)",
            f"  disk:    {disk.disk_path}",
            f"  kernel:  {disk.linux.kernel_path}",
            f"  initrd:  {disk.linux.initrd_path}",
            f"  cmdline: {disk.linux.cmdline_default} {' '.join(disk.cmdline_words)}"]


def main(args: argparse.Namespace) -> int:
    verb = getattr(args, "guest_command", None)
    if verb == "fetch" and args.kind == "debian":
        disk = debian.fetch_debian(force=args.force, quiet=args.quiet)
        if args.quiet:
            print(disk.linux.kernel_path)
            print(disk.linux.initrd_path)
            print(disk.disk_path)
        else:
            print("\n".join(_describe_disk(disk)))
        return 0
    if verb == "fetch":
        img = images.fetch_linux(force=args.force, quiet=args.quiet)
        if args.quiet:
            print(img.kernel_path)
            print(img.initrd_path)
        else:
            print("\n".join(_describe(img)))
        return 0
    if verb == "list":
        found = images.cached_images()
        if args.json:
            print(json.dumps([{"version": i.version, "kernel": str(i.kernel_path),
                               "initrd": str(i.initrd_path), "package": i.package,
                               "package_version": i.package_version,
                               "busybox_version": i.busybox_version,
                               "cmdline_default": i.cmdline_default,
                               "modules": list(i.modules)} for i in found], indent=2))
            return 0
        if not found:
            print(f"no images in {images.cache_dir()} (run: pyhv guest fetch linux)")
            return 0
        print(f"images in {images.cache_dir()}:")
        for img in found:
            print("\n".join(_describe(img)))
        for disk in debian.cached_disks():
            print("\n".join(_describe_disk(disk)))
        return 0
    if verb == "path" and args.kind == "debian":
        disks = debian.cached_disks()
        if not disks:
            raise ConfigError("no Debian disk is cached (run: pyhv guest fetch debian)")
        print(disks[0].linux.kernel_path)
        print(disks[0].linux.initrd_path)
        print(disks[0].disk_path)
        print(" ".join(disks[0].cmdline_words))
        return 0
    if verb == "path":
        found = images.cached_images()
        if not found:
            raise ConfigError("no Linux image is cached (run: pyhv guest fetch linux)")
        print(found[0].kernel_path)
        print(found[0].initrd_path)
        return 0
    raise ConfigError("pyhv guest: choose a verb: fetch, list or path")
