"""`pyhv img`: qemu-img's verbs (create, info, check, snapshot, convert, commit, rebase,
resize, map, compare) with qemu-img's meanings, options and exit statuses.

Each verb is one function `_cmd_<verb>(args) -> int`; failures are ImageError/ConfigError
(an OSError from the file system becomes one too), printed as one `pyhv: <message>` line.

Exit statuses are qemu-img's: 0 success, 1 any error (a bad command line, a file that
cannot be opened, an image lock held by another process, a refused or failed change),
except where qemu-img gives statuses a meaning of their own:
- check: 0 clean, 1 the image could not be checked, 2 corruptions, 3 leaks only,
  63 a format without checks (raw);
- compare: 0 identical, 1 different, 2 an image could not be opened, 3 block status
  could not be read, 4 data could not be read.
(`USAGE_STATUS` tells the CLI that a bad command line exits 1 here too, not argparse's 2.)

Invariants, so that no verb loses data:
- images are opened read-only unless the verb writes, and chains through `open_image`
  (acyclic, at most 64 deep) or `chain.walk` (header by header, loops reported);
- nothing is created, truncated or grown before every check that can refuse the
  command has passed (convert's output against every file of its input chain, create's
  image against its backing chain, commit's base growth before any data is copied);
- a failed command removes only the output it created itself;
- the data verbs iterate block status (`status.py`), so they read data runs only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator

from pyhv.disk.blockdev import BlockDevice
from pyhv.disk.chain import chain_holds, device_path, devices, walk
from pyhv.disk.open import (
    FORMATS,
    FileId,
    file_id,
    open_image,
    probe,
    resolve_backing,
    same_file,
)
from pyhv.disk.qcow2 import check, create
from pyhv.disk.qcow2.image import Qcow2Image
from pyhv.disk.raw import RawImage
from pyhv.disk.status import Status, runs, status
from pyhv.errors import ConfigError, ImageError, PyhvError
from pyhv.units import format_size, parse_size

CHUNK = 4 << 20

# ---------------------------------------------------------------------------- arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="img_cmd", metavar="COMMAND", required=True)

    p = sub.add_parser("create", help="create a new image")
    p.add_argument("-f", dest="fmt", default="raw", help="format (raw, qcow2)")
    p.add_argument("-b", dest="backing", help="backing file")
    p.add_argument("-F", dest="backing_fmt", help="backing file format")
    p.add_argument("-o", dest="options", action="append", default=[],
                   help="cluster_size=, compat=0.10|1.1, refcount_bits=, lazy_refcounts=")
    p.add_argument("-u", dest="unsafe", action="store_true", help="do not open the backing")
    p.add_argument("-q", dest="quiet", action="store_true")
    p.add_argument("filename")
    p.add_argument("size", nargs="?")

    p = sub.add_parser("info", help="describe an image")
    p.add_argument("-f", dest="fmt")
    p.add_argument("-U", dest="force_share", action="store_true")
    p.add_argument("--output", choices=("human", "json"), default="human")
    p.add_argument("--backing-chain", action="store_true")
    p.add_argument("filename")

    p = sub.add_parser("check", help="check (and repair) an image's metadata")
    p.add_argument("-f", dest="fmt")
    p.add_argument("-r", dest="repair", choices=("leaks", "all"))
    p.add_argument("-U", dest="force_share", action="store_true")
    p.add_argument("-q", dest="quiet", action="store_true")
    p.add_argument("--output", choices=("human", "json"), default="human")
    p.add_argument("filename")

    p = sub.add_parser("snapshot", help="list, create, apply, delete internal snapshots")
    g = p.add_mutually_exclusive_group()
    g.add_argument("-l", dest="list", action="store_true")
    g.add_argument("-c", dest="create", metavar="NAME")
    g.add_argument("-a", dest="apply", metavar="NAME")
    g.add_argument("-d", dest="delete", metavar="NAME")
    p.add_argument("-f", dest="fmt")
    p.add_argument("-U", dest="force_share", action="store_true")
    p.add_argument("-q", dest="quiet", action="store_true")
    p.add_argument("filename")

    p = sub.add_parser("convert", help="copy an image into another format")
    p.add_argument("-f", dest="fmt")
    p.add_argument("-O", dest="out_fmt", default="raw")
    p.add_argument("-c", dest="compress", action="store_true")
    p.add_argument("-o", dest="options", action="append", default=[])
    p.add_argument("-p", dest="progress", action="store_true")
    p.add_argument("-U", dest="force_share", action="store_true")
    p.add_argument("-q", dest="quiet", action="store_true")
    p.add_argument("source")
    p.add_argument("dest")

    p = sub.add_parser("commit", help="write an image's data into its backing file")
    p.add_argument("-f", dest="fmt")
    p.add_argument("-d", dest="keep", action="store_true", help="do not empty the image")
    p.add_argument("-p", dest="progress", action="store_true")
    p.add_argument("-q", dest="quiet", action="store_true")
    p.add_argument("filename")

    p = sub.add_parser("rebase", help="change an image's backing file")
    p.add_argument("-f", dest="fmt")
    p.add_argument("-b", dest="backing", required=True, help="new backing file ('' for none)")
    p.add_argument("-F", dest="backing_fmt")
    p.add_argument("-u", dest="unsafe", action="store_true", help="only rewrite the header")
    p.add_argument("-p", dest="progress", action="store_true")
    p.add_argument("-q", dest="quiet", action="store_true")
    p.add_argument("filename")

    p = sub.add_parser("resize", help="grow or shrink an image")
    p.add_argument("-f", dest="fmt")
    p.add_argument("--shrink", action="store_true")
    p.add_argument("-q", dest="quiet", action="store_true")
    p.add_argument("filename")
    # everything after FILE, so that "-2M" is a size, not an option (as in qemu-img)
    p.add_argument("size", nargs=argparse.REMAINDER, metavar="SIZE",
                   help="new size, or +SIZE / -SIZE")

    p = sub.add_parser("map", help="show where the image's data lives")
    p.add_argument("-f", dest="fmt")
    p.add_argument("-U", dest="force_share", action="store_true")
    p.add_argument("--output", choices=("human", "json"), default="human")
    p.add_argument("filename")

    p = sub.add_parser("compare", help="compare the contents of two images")
    p.add_argument("-f", dest="fmt1")
    p.add_argument("-F", dest="fmt2")
    p.add_argument("-s", dest="strict", action="store_true")
    p.add_argument("-p", dest="progress", action="store_true")
    p.add_argument("-U", dest="force_share", action="store_true")
    p.add_argument("-q", dest="quiet", action="store_true")
    p.add_argument("image1")
    p.add_argument("image2")


USAGE_STATUS = 1  # a bad command line (qemu-img: 1; argparse's default is 2)
ERROR_STATUS = 1  # any other error a verb reports (qemu-img: 1)


def main(args: argparse.Namespace) -> int:
    cmd = args.img_cmd
    handler = {"create": _cmd_create, "info": _cmd_info, "check": _cmd_check,
               "snapshot": _cmd_snapshot, "convert": _cmd_convert, "commit": _cmd_commit,
               "rebase": _cmd_rebase, "resize": _cmd_resize, "map": _cmd_map,
               "compare": _cmd_compare}[cmd]
    try:
        return handler(args)
    except BrokenPipeError:
        raise
    except (PyhvError, OSError) as e:  # (OSError: EIO, ENOSPC, EACCES...): one line
        _say_error(e)
        return ERROR_STATUS


def _say_error(e: BaseException) -> None:
    msg = _os_message(e) if isinstance(e, OSError) else str(e)
    print(f"pyhv: {msg}", file=sys.stderr)


def _os_message(e: OSError) -> str:
    what = e.strerror or str(e)
    return f"{e.filename}: {what}" if e.filename else what


# ---------------------------------------------------------------------------- helpers


class Progress:
    """`-p`: a percentage on stderr, redrawn in place (as qemu-img prints it)."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled = enabled
        self.total = max(total, 1)
        self._last = -1.0

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        pct = 100.0 * done / self.total
        if pct - self._last >= 1 or done >= self.total:
            self._last = pct
            sys.stderr.write(f"    ({pct:.2f}/100%)\r")
            sys.stderr.flush()

    def done(self) -> None:
        if self.enabled:
            self.update(self.total)
            sys.stderr.write("\n")


def _parse_options(opts: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for group in opts:
        for item in group.split(","):
            if not item:
                continue
            key, sep, val = item.partition("=")
            if not sep:
                raise ConfigError(f"option {item!r} needs a value (key=value)")
            out[key.strip()] = val.strip()
    return out


def _bool_opt(key: str, val: str) -> bool:
    if val in ("on", "true", "yes"):
        return True
    if val in ("off", "false", "no"):
        return False
    raise ConfigError(f"option {key} expects on/off, not {val!r}")


def _qcow2_create_kwargs(opts: dict[str, str]) -> dict[str, object]:
    kw: dict[str, object] = {}
    for key, val in opts.items():
        if key == "cluster_size":
            kw["cluster_size"] = parse_size(val)
        elif key == "compat":
            if val in ("0.10", "v2"):
                kw["version"] = 2
            elif val in ("1.1", "v3"):
                kw["version"] = 3
            else:
                raise ConfigError(f"compat must be 0.10 or 1.1, not {val!r}")
        elif key == "refcount_bits":
            if not val.isdecimal():
                raise ConfigError(f"option refcount_bits expects a number, not {val!r}")
            kw["refcount_bits"] = int(val)
        elif key == "lazy_refcounts":
            kw["lazy_refcounts"] = _bool_opt(key, val)
        elif key == "backing_file":
            kw["backing_file"] = val
        elif key in ("backing_fmt", "backing_format"):
            kw["backing_format"] = val
        elif key == "preallocation":
            if val != "off":
                raise ConfigError("only preallocation=off is supported")
        elif key == "compression_type":
            if val != "zlib":
                raise ConfigError("only compression_type=zlib is supported")
        else:
            raise ConfigError(f"unsupported qcow2 option {key!r}")
    return kw


def _open(path: str, fmt: str | None, *, rw: bool = False, backing: bool = True,
          force_share: bool = False) -> BlockDevice:
    """Open an image named on the command line (and, by default, its backing chain),
    with QEMU's image locks; `force_share` is -U (read-only opens only, as qemu-img)."""
    if os.path.isdir(path):
        raise ImageError(f"cannot open {path}: Is a directory")
    return open_image(path, fmt, read_only=not rw, backing=backing, force_share=force_share)


def _qcow2(dev: BlockDevice, what: str) -> Qcow2Image:
    if not isinstance(dev, Qcow2Image):
        dev.close()
        raise ImageError(f"{what} needs a qcow2 image")
    return dev


def _remove_created(path: str, ident: FileId | None) -> None:
    """Remove `path` after a failure, if it is still the file this command created."""
    try:
        if ident is None or file_id(path) == ident:
            os.unlink(path)
    except OSError:
        pass


def _write_zeroes(dev: BlockDevice, offset: int, length: int) -> None:
    if isinstance(dev, Qcow2Image):
        dev.write_zeroes(offset, length)
        return
    zero = bytes(min(CHUNK, length))
    pos, end = offset, offset + length
    while pos < end:
        n = min(CHUNK, end - pos)
        dev.write(pos, zero[:n])
        pos += n


def _grow(dev: BlockDevice, size: int) -> None:
    """Grow a disk as qemu-img's truncate does (qcow2: the new area reads zeros even over
    a longer backing file)."""
    if isinstance(dev, (Qcow2Image, RawImage)):
        dev.resize(size)
    else:
        raise ImageError(f"cannot grow {device_path(dev)}")


# ---------------------------------------------------------------------------- verbs


def _cmd_create(args: argparse.Namespace) -> int:
    opts = _parse_options(args.options)
    fmt, target = args.fmt, args.filename
    backing = args.backing if args.backing is not None else opts.pop("backing_file", None)
    bfmt = args.backing_fmt or opts.pop("backing_fmt", None) or opts.pop("backing_format",
                                                                         None)
    opts.pop("backing_fmt", None)
    opts.pop("backing_format", None)
    if fmt not in ("raw", "qcow2"):
        raise ConfigError(f"unknown format {fmt!r} (raw, qcow2)")
    if fmt == "raw" and (backing or opts):
        raise ConfigError("raw images take no options or backing file")
    kw = _qcow2_create_kwargs(opts) if fmt == "qcow2" else {}
    size = parse_size(args.size) if args.size is not None else None
    if backing == "":
        raise ConfigError("create: expected a backing file name, got an empty string")
    if os.path.isdir(target):
        raise ImageError(f"cannot create {target}: Is a directory")
    if backing:
        bpath = resolve_backing(target, backing)
        if same_file(bpath, target):
            raise ImageError(f"{target}: cannot create an image backed by itself (qemu-img: "
                             "the same filename as the backing file)")
        if args.unsafe:  # the backing file need not exist; its chain is read from headers
            if chain_holds(bpath, bfmt, target):
                raise ImageError(f"{target} is in the backing chain of {bpath}: the new "
                                 "image would be backed by itself")
        else:
            if bfmt is None:
                bfmt = probe(bpath)
            # the whole chain (cycles are refused there), shared with its users: qemu-img
            # create opens the backing file with force-share too
            dev = open_image(bpath, bfmt, force_share=True)
            try:
                if any(same_file(device_path(d), target) for d in devices(dev)):
                    raise ImageError(f"{target} is in the backing chain of {bpath}: the new "
                                     "image would be backed by itself")
                if size is None:
                    size = dev.size
            finally:
                dev.close()
        kw["backing_file"], kw["backing_format"] = backing, bfmt
    if size is None:
        raise ConfigError("create: a size is needed (or -b with a backing file)")
    existed = os.path.lexists(target)
    try:
        if fmt == "raw":
            RawImage.create(target, size)
        else:
            create(target, size, **kw)  # type: ignore[arg-type]
    except BaseException:
        if not existed:
            _remove_created(target, None)
        raise
    if not args.quiet:
        extra = f" backing_file={backing}" if backing else ""
        print(f"Formatting '{target}', fmt={fmt} size={size}{extra}")
    return 0


def _info_dict(dev: BlockDevice, path: str) -> dict[str, object]:
    st = os.stat(path)
    d: dict[str, object] = {"virtual-size": dev.size, "filename": path,
                            "format": "qcow2" if isinstance(dev, Qcow2Image) else "raw",
                            "actual-size": st.st_blocks * 512, "dirty-flag": False}
    if isinstance(dev, Qcow2Image):
        h = dev.h
        d["cluster-size"] = h.cluster_size
        if h.backing_file:
            d["backing-filename"] = h.backing_file
            d["full-backing-filename"] = resolve_backing(path, h.backing_file)
            if h.backing_format:
                d["backing-filename-format"] = h.backing_format
        if dev.snapshots:
            d["snapshots"] = [{
                "icount": sn.icount if sn.icount is not None else (1 << 64) - 1,
                "vm-clock-nsec": sn.vm_clock_nsec % 1_000_000_000,
                "name": sn.name, "date-sec": sn.date_sec, "date-nsec": sn.date_nsec,
                "vm-clock-sec": sn.vm_clock_nsec // 1_000_000_000, "id": sn.id_str,
                "vm-state-size": sn.vm_state_size} for sn in dev.snapshots]
        data: dict[str, object] = {"compat": "1.1" if h.version == 3 else "0.10",
                                   "compression-type": "zlib"}
        if h.version == 3:
            data["lazy-refcounts"] = bool(h.compatible_features & 1)
        data["refcount-bits"] = h.refcount_bits
        if h.version == 3:
            data["corrupt"] = bool(h.incompatible_features & 2)
            data["extended-l2"] = False
        d["format-specific"] = {"type": "qcow2", "data": data}
        d["dirty-flag"] = bool(h.incompatible_features & 1)
    return d


def _snapshot_table(snaps: list[dict[str, object]]) -> str:
    lines = ["Snapshot list:",
             f"{'ID':<10}{'TAG':<17}{'VM SIZE':>8}{'DATE':>20}{'VM CLOCK':>13}"
             f"{'ICOUNT':>11}"]
    for s in snaps:
        date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(int(str(s["date-sec"]))))
        secs = int(str(s["vm-clock-sec"]))
        clock = (f"{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}."
                 f"{int(str(s['vm-clock-nsec'])) // 1_000_000:03d}")
        vm = format_size(int(str(s["vm-state-size"])))
        ic = int(str(s["icount"]))
        icount = "" if ic == (1 << 64) - 1 else str(ic)
        lines.append(f"{str(s['id']):<9} {str(s['name']):<16} {vm:>8}{date:>20}{clock:>13}"
                     f"{icount:>11}")
    return "\n".join(lines)


def _cmd_info(args: argparse.Namespace) -> int:
    chain: list[dict[str, object]] = []
    if args.backing_chain:  # header by header: a loop is reported, never followed
        for path, dev in walk(args.filename, args.fmt, force_share=args.force_share):
            chain.append(_info_dict(dev, path))
    else:
        dev = _open(args.filename, args.fmt, backing=False, force_share=args.force_share)
        try:
            chain.append(_info_dict(dev, args.filename))
        finally:
            dev.close()
    if args.output == "json":
        print(json.dumps(chain if args.backing_chain else chain[0], indent=4))
        return 0
    out = []
    for d in chain:
        lines = [f"image: {d['filename']}", f"file format: {d['format']}",
                 f"virtual size: {format_size(int(str(d['virtual-size'])))} "
                 f"({d['virtual-size']} bytes)",
                 f"disk size: {format_size(int(str(d['actual-size'])))}"]
        if "cluster-size" in d:
            lines.append(f"cluster_size: {d['cluster-size']}")
        if "backing-filename" in d:
            full = d["full-backing-filename"]
            actual = f" (actual path: {full})" if full != d["backing-filename"] else ""
            lines.append(f"backing file: {d['backing-filename']}{actual}")
            if "backing-filename-format" in d:
                lines.append(f"backing file format: {d['backing-filename-format']}")
        if "snapshots" in d:
            lines.append(_snapshot_table(d["snapshots"]))  # type: ignore[arg-type]
        fs = d.get("format-specific")
        if isinstance(fs, dict):
            lines.append("Format specific information:")
            for k, v in fs["data"].items():
                val = str(v).lower() if isinstance(v, bool) else str(v)
                lines.append(f"    {k.replace('-', ' ')}: {val}")
        out.append("\n".join(lines))
    print("\n\n".join(out))
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    """qemu-img check's statuses: 0 clean, 1 not checked (cannot open, I/O error),
    2 corruptions, 3 leaks, 63 a format without checks (raw)."""
    try:
        dev = _open(args.filename, args.fmt, rw=args.repair is not None, backing=False,
                    force_share=args.force_share)
        try:
            if not isinstance(dev, Qcow2Image):
                print(f"pyhv: {args.filename}: this image format (raw) does not support "
                      "checks", file=sys.stderr)
                return 63
            res = check(dev, repair=args.repair)
        finally:
            dev.close()
    except (PyhvError, OSError) as e:
        _say_error(e)
        return 1  # qemu-img check: the image could not be checked
    if args.output == "json":
        print(json.dumps({"image-end-offset": res.image_end_offset,
                          "total-clusters": res.total_clusters,
                          "check-errors": res.check_errors,
                          "allocated-clusters": res.allocated_clusters,
                          "filename": args.filename, "format": "qcow2",
                          "fragmented-clusters": res.fragmented_clusters,
                          "compressed-clusters": res.compressed_clusters,
                          "corruptions": res.corruptions, "leaks": res.leaks,
                          "leaks-fixed": res.leaks_fixed,
                          "corruptions-fixed": res.corruptions_fixed}, indent=4))
        return res.exit_status
    if args.quiet:
        return res.exit_status
    for m in res.messages:
        print(m, file=sys.stderr)
    if res.leaks_fixed or res.corruptions_fixed:
        print(f"The following inconsistencies were found and repaired:\n\n"
              f"    {res.leaks_fixed} leaked clusters\n    {res.corruptions_fixed} "
              "corruptions\n\nDouble checking the fixed image now...")
    if res.corruptions:
        print(f"\n{res.corruptions} errors were found on the image.\nData may be corrupted, "
              "or further writes to the image may corrupt it.")
    if res.leaks:
        print(f"\n{res.leaks} leaked clusters were found on the image.\nThis means waste of "
              "disk space, but no harm to data.")
    if not res.corruptions and not res.leaks:
        print("No errors were found on the image.")
    if res.total_clusters:
        t = res.total_clusters
        a = max(res.allocated_clusters, 1)
        print(f"{res.allocated_clusters}/{t} = {100 * res.allocated_clusters / t:.2f}% "
              f"allocated, {100 * res.fragmented_clusters / a:.2f}% fragmented, "
              f"{100 * res.compressed_clusters / a:.2f}% compressed clusters")
    print(f"Image end offset: {res.image_end_offset}")
    return res.exit_status


def _cmd_snapshot(args: argparse.Namespace) -> int:
    writes = bool(args.create or args.apply or args.delete)
    dev = _open(args.filename, args.fmt, rw=writes, backing=False,
                force_share=args.force_share)
    try:
        img = _qcow2(dev, "snapshot")
        if args.create:
            try:
                img.snapshot_create(args.create)
            except ImageError as e:  # the file is left as it was (rewrite.py)
                raise ImageError(f"cannot create snapshot {args.create!r}: {e}") from e
        elif args.apply:
            img.snapshot_apply(args.apply)
        elif args.delete:
            img.snapshot_delete(args.delete)
        else:
            d = _info_dict(img, args.filename)
            if "snapshots" in d:
                print(_snapshot_table(d["snapshots"]))  # type: ignore[arg-type]
        img.flush()
    finally:
        dev.close()
    return 0


def _zero_granules(data: bytes, start: int, gran: int) -> Iterator[tuple[int, int]]:
    """[a, b) offsets into `data` (which starts at disk offset `start`) of the runs of
    granules (aligned on the disk) that are not all zero."""
    n = len(data)
    view = memoryview(data)
    zero = bytes(gran)
    run = None
    off = 0
    while off < n:
        nxt = min(n, (start + off) // gran * gran + gran - start)
        nz = view[off:nxt] != zero[:nxt - off]
        if nz and run is None:
            run = off
        elif not nz and run is not None:
            yield run, off
            run = None
        off = nxt
    if run is not None:
        yield run, n


def _copy(src: BlockDevice, dst: BlockDevice, progress: Progress, *,
          compress: bool = False) -> None:
    """Copy the data of `src` (through its chain) into the empty, zero-reading `dst`.

    Only runs that block status reports as data are read (in CHUNK-sized reads); zero
    and unallocated runs are skipped, and so are all-zero granules inside data (a
    cluster of dst, or 64 KiB for raw), so the output stays sparse."""
    cs = dst.cs if isinstance(dst, Qcow2Image) else 0
    gran = cs or 65536
    for start, st in runs(src):
        end = start + st.length
        if st.data:
            pos = start
            while pos < end:
                n = min(CHUNK, end - pos)
                data = src.read(pos, n)
                for a, b in _zero_granules(data, pos, gran):
                    if compress and isinstance(dst, Qcow2Image):
                        for off in range(a, b, cs):
                            piece = data[off:off + cs]
                            if (pos + off) % cs or not dst.write_compressed(
                                    (pos + off) // cs, piece):
                                dst.write(pos + off, piece)
                    else:
                        dst.write(pos + a, data[a:b])
                pos += n
                progress.update(pos)
        progress.update(end)
    progress.done()


def _cmd_convert(args: argparse.Namespace) -> int:
    opts = _parse_options(args.options)
    if args.out_fmt not in ("raw", "qcow2"):
        raise ConfigError(f"unknown output format {args.out_fmt!r}")
    if args.out_fmt == "raw" and args.compress:
        raise ConfigError("raw images cannot be compressed (-c needs -O qcow2)")
    if args.out_fmt == "raw" and opts:
        raise ConfigError("raw images take no options")
    kw = _qcow2_create_kwargs(opts) if args.out_fmt == "qcow2" else {}
    if kw.get("backing_file"):
        raise ConfigError("convert: the output cannot have a backing file")
    dest = args.dest
    src = _open(args.source, args.fmt, force_share=args.force_share)
    try:
        for d in devices(src):  # before anything is created or truncated
            if same_file(device_path(d), dest):
                raise ImageError(f"convert: the output {dest} is the input image or a file "
                                 "of its backing chain; it would be overwritten while read")
        if os.path.isdir(dest):
            raise ImageError(f"cannot create {dest}: Is a directory")
        size = src.size
        existed = os.path.lexists(dest)
        ident: FileId | None = None
        try:
            if args.out_fmt == "qcow2":
                create(dest, size, **kw)  # type: ignore[arg-type]
                ident = file_id(dest)
                # a new output: no flush barriers (QEMU's cache=unsafe for convert)
                dst: BlockDevice = Qcow2Image(dest, read_only=False, unsafe=True)
            else:
                RawImage.create(dest, size)
                ident = file_id(dest)
                dst = RawImage(dest)
            try:
                # no fsync at the end: qemu-img convert's default cache mode (unsafe)
                _copy(src, dst, Progress(args.progress, size), compress=args.compress)
            finally:
                dst.close()
        except BaseException:
            if not existed:
                _remove_created(dest, ident)
            raise
    finally:
        src.close()
    return 0


def _cmd_commit(args: argparse.Namespace) -> int:
    top = _qcow2(_open(args.filename, args.fmt, backing=False), "commit")
    try:
        top.validate()
        name, bfmt = top.h.backing_file, top.h.backing_format
        if not name:
            raise ImageError(f"{args.filename} has no backing file to commit into")
        bpath = resolve_backing(args.filename, name)
        if same_file(bpath, args.filename):
            raise ImageError(f"{args.filename} is its own backing file")
        # the base with its own chain (as qemu-img opens it): a chain that leads back to
        # the top is a cycle, refused there; a grown qcow2 base needs its backing's size
        base = open_image(bpath, bfmt, read_only=False)
        try:
            if isinstance(base, Qcow2Image):
                base.validate()  # a damaged base is refused before anything is written
            if top.size > base.size:  # grow first: nothing past the old end is lost
                _grow(base, top.size)
            prog = Progress(args.progress, top.size)
            pos = 0
            while pos < top.size:  # the top's own allocation only, one run at a time
                kind, n, _host = top.block_status(pos, top.size - pos)
                if kind == "zero":
                    _write_zeroes(base, pos, n)
                elif kind != "unallocated":
                    for off in range(pos, pos + n, CHUNK):
                        m = min(CHUNK, pos + n - off)
                        base.write(off, top.read(off, m))
                pos += n
                prog.update(pos)
            prog.done()
            base.flush()
        finally:
            base.close()
    finally:
        top.close()
    if not args.keep:
        img = _qcow2(_open(args.filename, args.fmt, rw=True, backing=False), "commit")
        try:
            img.discard(0, img.size)  # no backing attached: clusters become unallocated
            img.flush()
        finally:
            img.close()
    if not args.quiet:
        print("Image committed.")
    return 0


def _cmd_rebase(args: argparse.Namespace) -> int:
    new_name = args.backing or None
    new_fmt = args.backing_fmt if new_name else None
    if new_name and new_fmt is None:
        raise ConfigError("rebase: give the new backing file's format with -F (qemu-img "
                          "requires it too)")
    if new_fmt is not None and new_fmt not in FORMATS:
        raise ConfigError(f"unknown backing format {new_fmt!r} (raw, qcow2)")
    npath = resolve_backing(args.filename, new_name) if new_name else None
    if npath is not None and chain_holds(npath, new_fmt, args.filename):
        raise ImageError(f"{args.filename} is in the backing chain of {npath}: the image "
                         "would be backed by itself")
    # -u rewrites the header only: the old chain is not opened (it may be missing or
    # loop), which is how a broken chain is repaired
    img = _qcow2(_open(args.filename, args.fmt, rw=True, backing=not args.unsafe), "rebase")
    try:
        if not args.unsafe:
            img.validate()  # -u only rewrites the header, which is how a chain is repaired
            new = open_image(npath, new_fmt) if npath is not None else None
            try:
                _rebase_copy(img, new, Progress(args.progress, img.size))
            finally:
                if new is not None:
                    new.close()
        img.h.backing_file = new_name
        img.h.backing_format = new_fmt
        img.write_header()
        img.flush()
    finally:
        img.close()
    return 0


def _zero_run(dev: BlockDevice | None, pos: int, n: int) -> tuple[bool, int]:
    """(reads as zeros, length) of the run of `dev` at pos (None or past its end: zeros)."""
    if dev is None or pos >= dev.size:
        return True, n
    st = status(dev, pos, min(n, dev.size - pos))
    return st.zero and not st.data, st.length


def _rebase_copy(img: Qcow2Image, new: BlockDevice | None, prog: Progress) -> None:
    """Write into `img`, where it is unallocated, the clusters in which the old backing
    chain (img.backing) and the new one differ; ranges where both read as zeros (by
    block status) are never read."""
    old = img.backing
    cs = img.cs
    pos = 0
    while pos < img.size:
        kind, n, _host = img.block_status(pos, img.size - pos)
        if kind == "unallocated":
            p, end = pos, pos + n
            while p < end:
                zo, lo = _zero_run(old, p, end - p)
                zn, ln = _zero_run(new, p, end - p)
                m = min(lo, ln)
                if not (zo and zn):
                    for q in range(p, p + m, CHUNK):
                        k = min(CHUNK, p + m - q)
                        a, b = _read_or_zero(old, q, k), _read_or_zero(new, q, k)
                        if a == b:
                            continue
                        for c in range(0, k, cs):  # write the differing clusters only
                            if a[c:c + cs] != b[c:c + cs]:
                                img.write(q + c, a[c:c + cs])
                p += m
        pos += n
        prog.update(pos)
    prog.done()


def _read_or_zero(dev: BlockDevice | None, off: int, n: int) -> bytes:
    if dev is None or off >= dev.size:
        return bytes(n)
    m = min(n, dev.size - off)
    return dev.read(off, m) + bytes(n - m)


def _cmd_resize(args: argparse.Namespace) -> int:
    # opened with its backing chain, as qemu-img does: a qcow2 image grown over a longer
    # backing file gets zeros in the new area, not the backing file's data
    words = list(args.size)
    for flag, attr in (("--shrink", "shrink"), ("-q", "quiet")):
        while flag in words:
            words.remove(flag)
            setattr(args, attr, True)
    if len(words) != 1:
        raise ConfigError("resize: give one new size (SIZE, +SIZE or -SIZE) after the file")
    text = words[0]
    dev = _open(args.filename, args.fmt, rw=True)
    try:
        if text.startswith("+"):
            new = dev.size + parse_size(text[1:])
        elif text.startswith("-"):
            new = dev.size - parse_size(text[1:])
        else:
            new = parse_size(text)
        if new < 0:
            raise ConfigError("the new size would be negative")
        if isinstance(dev, Qcow2Image):
            dev.resize(new, shrink=args.shrink)
        elif isinstance(dev, RawImage):
            if new < dev.size and not args.shrink:
                raise ImageError("shrinking needs --shrink (data past the new end is lost)")
            dev.resize(new)
        dev.flush()
    finally:
        dev.close()
    if not args.quiet:
        print("Image resized.")
    return 0


def _cmd_map(args: argparse.Namespace) -> int:
    dev = _open(args.filename, args.fmt, force_share=args.force_share)
    try:
        out: list[dict[str, object]] = []
        for pos, st in runs(dev):
            r: dict[str, object] = {"start": pos, "length": st.length, "depth": st.depth,
                                    "present": st.allocated, "zero": st.zero,
                                    "data": st.data}
            if st.host is not None:
                r["offset"] = st.host
                r["filename"] = device_path(st.dev)
            last = out[-1] if out else None
            keys = ("depth", "present", "zero", "data", "filename")
            if last is not None and all(last.get(k) == r.get(k) for k in keys) and (
                    ("offset" not in r and "offset" not in last) or
                    ("offset" in r and "offset" in last and
                     int(str(last["offset"])) + int(str(last["length"])) == r["offset"])):
                last["length"] = int(str(last["length"])) + st.length
            else:
                out.append(r)
    finally:
        dev.close()
    if args.output == "json":
        print("[" + ",\n".join(
            "{ " + json.dumps({k: v for k, v in r.items() if k != "filename"})[1:]
            for r in out) + "]")
        return 0

    def hx(v: object) -> str:  # C's %#x: "0" for zero
        n = int(str(v))
        return hex(n) if n else "0"

    print(f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File")
    for r in out:
        if r.get("data") and "offset" in r:
            print(f"{hx(r['start']):<16}{hx(r['length']):<16}{hx(r['offset']):<16}"
                  f"{r['filename']}")
    return 0


COMPARE_BUF = 2 << 20  # qemu-img compare's IO_BUF_SIZE


def _first_sector(x: bytes, y: bytes | None = None) -> int:
    """Offset of the first 512-byte sector where x and y differ (y None: where x is not
    zero), counted from the buffer's start as qemu-img compare counts; -1 if none."""
    other = y if y is not None else bytes(len(x))
    if x == other:
        return -1
    vx, vy = memoryview(x), memoryview(other)
    lo, hi = 0, len(x)  # x[:lo] == y[:lo] and x[:hi] != y[:hi]: bisect the first byte
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if vx[lo:mid] == vy[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo // 512 * 512


def _strict_flags(st: Status, pos: int, size: int) -> tuple[int, bool]:
    """What `compare -s` compares: qemu-img compares the whole block-status word, which
    also says whether the run reaches the end of the image (BDRV_BLOCK_EOF)."""
    return st.flags, pos + st.length >= size


class _CompareFailed(Exception):
    """An error inside compare, with qemu-img compare's status for it."""

    def __init__(self, status: int, err: BaseException) -> None:
        super().__init__(str(err))
        self.status = status
        self.err = err


def _cmp_status(dev: BlockDevice, pos: int, n: int) -> Status:
    try:
        return status(dev, pos, n)
    except (PyhvError, OSError) as e:
        raise _CompareFailed(3, e) from e


def _cmp_read(dev: BlockDevice, pos: int, n: int) -> bytes:
    try:
        return dev.read(pos, n)
    except (PyhvError, OSError) as e:
        raise _CompareFailed(4, e) from e


def _cmd_compare(args: argparse.Namespace) -> int:
    """qemu-img compare: by block status, reading only where either side has data;
    mismatches are reported at the start of the first differing sector. Exit statuses
    as qemu-img's: 0 identical, 1 different, 2 an image could not be opened, 3 an error
    reading block status, 4 an error reading data."""
    try:
        a = _open(args.image1, args.fmt1, force_share=args.force_share)
        try:
            b = _open(args.image2, args.fmt2, force_share=args.force_share)
        except BaseException:
            a.close()
            raise
    except (PyhvError, OSError) as e:
        _say_error(e)
        return 2
    try:
        return _compare(a, b, args)
    except _CompareFailed as e:
        _say_error(e.err)
        return e.status
    finally:
        a.close()
        b.close()


def _compare(a: BlockDevice, b: BlockDevice, args: argparse.Namespace) -> int:
    say = (lambda msg: None) if args.quiet else print
    n1, n2 = a.size, b.size
    if args.strict and n1 != n2:
        say("Strict mode: Image size mismatch!")
        return 1
    common, total = min(n1, n2), max(n1, n2)
    prog = Progress(args.progress, total)
    pos = 0
    while pos < common:
        s1, s2 = _cmp_status(a, pos, common - pos), _cmp_status(b, pos, common - pos)
        chunk = min(s1.length, s2.length)
        if args.strict and _strict_flags(s1, pos, n1) != _strict_flags(s2, pos, n2):
            say(f"Strict mode: Offset {pos} block status mismatch!")
            return 1
        if s1.zero and s2.zero:
            pass
        elif s1.allocated == s2.allocated:
            if s1.allocated:
                chunk = min(chunk, COMPARE_BUF)
                i = _first_sector(_cmp_read(a, pos, chunk), _cmp_read(b, pos, chunk))
                if i >= 0:
                    say(f"Content mismatch at offset {pos + i}!")
                    return 1
        else:
            chunk = min(chunk, COMPARE_BUF)
            i = _first_sector(_cmp_read(a if s1.allocated else b, pos, chunk))
            if i >= 0:
                say(f"Content mismatch at offset {pos + i}!")
                return 1
        pos += chunk
        prog.update(pos)
    if n1 != n2:
        say("Warning: Image size mismatch!")
        over = a if n1 > n2 else b
        while pos < total:
            st = _cmp_status(over, pos, total - pos)
            chunk = st.length
            if st.allocated and not st.zero:
                chunk = min(chunk, COMPARE_BUF)
                i = _first_sector(_cmp_read(over, pos, chunk))
                if i >= 0:
                    say(f"Content mismatch at offset {pos + i}!")
                    return 1
            pos += chunk
            prog.update(pos)
    prog.done()
    say("Images are identical.")
    return 0
