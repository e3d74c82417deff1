"""`pyhv img`: qemu-img's verbs (create, info, check, snapshot, convert, commit, rebase,
resize, map, compare) with qemu-img's meanings, options and exit statuses.

Each verb is one function `_cmd_<verb>(args) -> int`; failures are ImageError/ConfigError
(the CLI prints `pyhv: <message>` and exits 2). Images are opened read-only unless the
verb writes; `convert` and `compare` read through backing chains.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator

from pyhv.disk.blockdev import BlockDevice
from pyhv.disk.open import open_image, probe, resolve_backing
from pyhv.disk.qcow2 import check, create
from pyhv.disk.qcow2.image import Qcow2Image
from pyhv.disk.raw import RawImage
from pyhv.errors import ConfigError, ImageError
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
    p.add_argument("size", help="new size, or +SIZE / -SIZE")

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


def main(args: argparse.Namespace) -> int:
    cmd = args.img_cmd
    handler = {"create": _cmd_create, "info": _cmd_info, "check": _cmd_check,
               "snapshot": _cmd_snapshot, "convert": _cmd_convert, "commit": _cmd_commit,
               "rebase": _cmd_rebase, "resize": _cmd_resize, "map": _cmd_map,
               "compare": _cmd_compare}[cmd]
    return handler(args)


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


def _open(path: str, fmt: str | None, *, rw: bool = False) -> BlockDevice:
    return open_image(path, fmt, read_only=not rw)


def _qcow2(dev: BlockDevice, what: str) -> Qcow2Image:
    if not isinstance(dev, Qcow2Image):
        dev.close()
        raise ImageError(f"{what} needs a qcow2 image")
    return dev


def _runs(dev: BlockDevice, start: int = 0) -> Iterator[tuple[int, int, str, int | None]]:
    """(offset, length, kind, host offset) runs of the top image."""
    pos, size = start, dev.size
    while pos < size:
        if isinstance(dev, Qcow2Image):
            kind, n, host = dev.block_status(pos, size - pos)
        else:
            kind, n, host = "data", size - pos, pos
        yield pos, n, kind, host
        pos += n


# ---------------------------------------------------------------------------- verbs


def _cmd_create(args: argparse.Namespace) -> int:
    opts = _parse_options(args.options)
    fmt = args.fmt
    backing = args.backing or opts.pop("backing_file", None)
    bfmt = args.backing_fmt or opts.pop("backing_fmt", None)
    if args.size is not None:
        size = parse_size(args.size)
    elif backing:
        bpath = resolve_backing(args.filename, backing)
        dev = open_image(bpath, bfmt)
        size = dev.size
        dev.close()
    else:
        raise ConfigError("create: a size is needed (or -b with a backing file)")
    if fmt == "raw":
        if backing or opts:
            raise ConfigError("raw images take no options or backing file")
        RawImage.create(args.filename, size)
    elif fmt == "qcow2":
        kw = _qcow2_create_kwargs(opts)
        if backing:
            bpath = resolve_backing(args.filename, backing)
            if not args.unsafe:
                if bfmt is None:
                    bfmt = probe(bpath)
                open_image(bpath, bfmt).close()
            kw["backing_file"], kw["backing_format"] = backing, bfmt
        create(args.filename, size, **kw)  # type: ignore[arg-type]
    else:
        raise ConfigError(f"unknown format {fmt!r} (raw, qcow2)")
    if not args.quiet:
        extra = f" backing_file={backing}" if backing else ""
        print(f"Formatting '{args.filename}', fmt={fmt} size={size}{extra}")
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
    path, fmt = args.filename, args.fmt
    while True:
        dev = open_image(path, fmt, backing=False, force_share=args.force_share)
        try:
            d = _info_dict(dev, path)
        finally:
            dev.close()
        chain.append(d)
        if not args.backing_chain or "full-backing-filename" not in d:
            break
        path = str(d["full-backing-filename"])
        fmt = str(d.get("backing-filename-format")) if "backing-filename-format" in d \
            else None
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
    dev = open_image(args.filename, args.fmt, read_only=args.repair is None, backing=False,
                     force_share=args.force_share)
    try:
        img = _qcow2(dev, "check")
        res = check(img, repair=args.repair)
    finally:
        dev.close()
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
    dev = open_image(args.filename, args.fmt, read_only=not writes, backing=False,
                     force_share=args.force_share)
    try:
        img = _qcow2(dev, "snapshot")
        if args.create:
            img.snapshot_create(args.create)
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


def _copy(src: BlockDevice, dst: BlockDevice, progress: Progress, *,
          compress: bool = False) -> None:
    """Copy every non-zero chunk of `src` into the (empty) `dst`."""
    size = src.size
    step = CHUNK
    zero = bytes(step)
    cs = dst.cs if isinstance(dst, Qcow2Image) else 0
    pos = 0
    while pos < size:
        n = min(step, size - pos)
        data = src.read(pos, n)
        if data != zero[:n]:
            if not cs:
                dst.write(pos, data)
            elif compress:
                for off in range(0, n, cs):
                    piece = data[off:off + cs]
                    if piece == zero[:len(piece)]:
                        continue
                    assert isinstance(dst, Qcow2Image)
                    if not dst.write_compressed((pos + off) // cs, piece):
                        dst.write(pos + off, piece)
            else:  # write runs of non-zero clusters; zero clusters stay unallocated
                start = None
                view = memoryview(data)
                for off in [*range(0, n, cs), n]:
                    nz = off < n and view[off:off + cs] != zero[:min(cs, n - off)]
                    if nz and start is None:
                        start = off
                    elif not nz and start is not None:
                        dst.write(pos + start, data[start:off])
                        start = None
        pos += n
        progress.update(pos)
    progress.done()


def _cmd_convert(args: argparse.Namespace) -> int:
    opts = _parse_options(args.options)
    src = open_image(args.source, args.fmt, force_share=args.force_share)
    try:
        size = src.size
        if args.out_fmt == "qcow2":
            kw = _qcow2_create_kwargs(opts)
            create(args.dest, size, **kw)  # type: ignore[arg-type]
            dst: BlockDevice = Qcow2Image(args.dest, read_only=False, unsafe=True)
        elif args.out_fmt == "raw":
            if args.compress:
                raise ConfigError("raw images cannot be compressed (-c needs -O qcow2)")
            RawImage.create(args.dest, size)
            dst = RawImage(args.dest)
        else:
            raise ConfigError(f"unknown output format {args.out_fmt!r}")
        if isinstance(dst, Qcow2Image) and dst.size != size:  # not a sector multiple
            dst.close()
            raise ImageError("source size is not a multiple of 512 bytes")
        try:
            # no fsync at the end: qemu-img convert's default cache mode (unsafe) has none
            _copy(src, dst, Progress(args.progress, size), compress=args.compress)
        finally:
            dst.close()
    finally:
        src.close()
    return 0


def _cmd_commit(args: argparse.Namespace) -> int:
    top = _qcow2(open_image(args.filename, args.fmt, backing=False), "commit")
    try:
        top.validate()
        name, bfmt = top.h.backing_file, top.h.backing_format
        if not name:
            raise ImageError(f"{args.filename} has no backing file to commit into")
        base = open_image(resolve_backing(args.filename, name), bfmt, read_only=False,
                          backing=False)
        if isinstance(base, Qcow2Image):
            try:
                base.validate()
            except BaseException:
                base.close()
                raise
        top.backing = base
        prog = Progress(args.progress, top.size)
        for pos, n, kind, _host in list(_runs(top)):
            if kind != "unallocated":
                for off in range(pos, pos + n, CHUNK):
                    m = min(CHUNK, pos + n - off, base.size - off)
                    if m > 0:
                        base.write(off, top.read(off, m))
            prog.update(pos + n)
        prog.done()
        base.flush()
        top.backing = None
        base.close()
    finally:
        top.close()
    if not args.keep:
        img = _qcow2(open_image(args.filename, args.fmt, read_only=False, backing=False),
                     "commit")
        try:
            img.discard(0, img.size)  # no backing attached: clusters become unallocated
            img.flush()
        finally:
            img.close()
    if not args.quiet:
        print("Image committed.")
    return 0


def _cmd_rebase(args: argparse.Namespace) -> int:
    img = _qcow2(open_image(args.filename, args.fmt, read_only=False), "rebase")
    try:
        if not args.unsafe:
            img.validate()
        new_name = args.backing or None
        new_fmt = args.backing_fmt
        if new_name and new_fmt is None:
            new_fmt = probe(resolve_backing(args.filename, new_name))
        if not args.unsafe:
            new: BlockDevice | None = None
            if new_name:
                new = open_image(resolve_backing(args.filename, new_name), new_fmt)
            old = img.backing
            prog = Progress(args.progress, img.size)
            try:
                for pos, n, kind, _h in list(_runs(img)):
                    if kind == "unallocated":
                        for off in range(pos, pos + n, CHUNK):
                            m = min(CHUNK, pos + n - off)
                            a = _read_or_zero(old, off, m)
                            b = _read_or_zero(new, off, m)
                            if a != b:
                                img.write(off, a)
                    prog.update(pos + n)
                prog.done()
            finally:
                if new is not None:
                    new.close()
        img.h.backing_file = new_name
        img.h.backing_format = new_fmt if new_name else None
        img.write_header()
        img.flush()
    finally:
        img.close()
    return 0


def _read_or_zero(dev: BlockDevice | None, off: int, n: int) -> bytes:
    if dev is None or off >= dev.size:
        return bytes(n)
    m = min(n, dev.size - off)
    return dev.read(off, m) + bytes(n - m)


def _cmd_resize(args: argparse.Namespace) -> int:
    dev = open_image(args.filename, args.fmt, read_only=False, backing=False)
    try:
        text = args.size
        if text.startswith("+"):
            new = dev.size + parse_size(text[1:])
        elif text.startswith("-"):
            new = dev.size - parse_size(text[1:])
        else:
            new = parse_size(text)
        if new < 0:
            raise ConfigError("the new size would be negative")
        if isinstance(dev, Qcow2Image):
            new = -(-new // 512) * 512
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


def _map_runs(dev: BlockDevice, path: str, pos: int, n: int,
              depth: int) -> Iterator[dict[str, object]]:
    if not isinstance(dev, Qcow2Image):
        yield {"start": pos, "length": n, "depth": depth, "present": True, "zero": False,
               "data": True, "offset": pos, "filename": path}
        return
    end = pos + n
    while pos < end:
        kind, m, host = dev.block_status(pos, end - pos)
        if kind == "unallocated" and dev.backing is not None:
            b = dev.backing
            bpath = getattr(b, "path", "?")
            inside = max(0, min(m, b.size - pos))
            if inside:
                yield from _map_runs(b, bpath, pos, inside, depth + 1)
            if m > inside:
                yield {"start": pos + inside, "length": m - inside, "depth": depth + 1,
                       "present": False, "zero": True, "data": False}
        elif kind == "unallocated":
            yield {"start": pos, "length": m, "depth": depth, "present": False,
                   "zero": True, "data": False}
        else:
            r: dict[str, object] = {"start": pos, "length": m, "depth": depth,
                                    "present": True, "zero": kind == "zero",
                                    "data": kind != "zero"}
            if host is not None:
                r["offset"] = host
                r["filename"] = path
            yield r
        pos += m


def _cmd_map(args: argparse.Namespace) -> int:
    dev = open_image(args.filename, args.fmt, force_share=args.force_share)
    try:
        runs: list[dict[str, object]] = []
        for r in _map_runs(dev, args.filename, 0, dev.size, 0):
            last = runs[-1] if runs else None
            keys = ("depth", "present", "zero", "data", "filename")
            if last is not None and all(last.get(k) == r.get(k) for k in keys) and (
                    ("offset" not in r and "offset" not in last) or
                    ("offset" in r and "offset" in last and
                     int(str(last["offset"])) + int(str(last["length"])) == r["offset"])):
                last["length"] = int(str(last["length"])) + int(str(r["length"]))
            else:
                runs.append(r)
    finally:
        dev.close()
    if args.output == "json":
        print("[" + ",\n".join(
            "{ " + json.dumps({k: v for k, v in r.items() if k != "filename"})[1:]
            for r in runs) + "]")
        return 0

    def hx(v: object) -> str:  # C's %#x: "0" for zero
        n = int(str(v))
        return hex(n) if n else "0"

    print(f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File")
    for r in runs:
        if r.get("data") and "offset" in r:
            print(f"{hx(r['start']):<16}{hx(r['length']):<16}{hx(r['offset']):<16}"
                  f"{r['filename']}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    a = open_image(args.image1, args.fmt1, force_share=args.force_share)
    try:
        b = open_image(args.image2, args.fmt2, force_share=args.force_share)
    except BaseException:
        a.close()
        raise
    try:
        if args.strict and a.size != b.size:
            print("Strict mode: Image size mismatch!")
            return 1
        n = max(a.size, b.size)
        prog = Progress(args.progress, n)
        pos = 0
        while pos < n:
            m = min(CHUNK, n - pos)
            x, y = _read_or_zero(a, pos, m), _read_or_zero(b, pos, m)
            if x != y:
                i = next(k for k in range(m) if x[k] != y[k])
                print(f"Content mismatch at offset {pos + i}!")
                return 1
            pos += m
            prog.update(pos)
        prog.done()
    finally:
        a.close()
        b.close()
    if not args.quiet:
        print("Images are identical.")
    return 0
