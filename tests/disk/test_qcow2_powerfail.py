"""Host crash / power loss, dm-log-writes style: every write and flush pyhv makes to the
image file is recorded (fileio.ImageFile.observer), then every prefix of that log is
replayed onto the starting file, with the writes of the last, unflushed, epoch (those
since the last flush) applied in several subsets and orders, and torn at sector
granularity, as a disk may persist them. Each resulting file must:

- open in pyhv and pass pyhv's check with no corruption (leaked clusters are allowed),
- pass `qemu-img check` with no corruption (on a sample in the default run, on every
  distinct file under -m slow),
- show the guest, sector by sector, a content the sector had at some point between the
  last completed guest flush and the operation that was cut short.

The workloads cover guest writes (new clusters, in place, partial copy-on-write),
discards, compressed writes, new L2 tables, new refcount blocks, a refcount table that
has to move, snapshot create / apply / delete, resizes, an overlay grown (and shrunk and
grown again) over a longer backing file, whose new area must read as zeros, and discard /
write_zeroes table by table (zero clusters over a backing file, deallocation in v2).
Subsets are deterministic (no randomness in the default run; -m slow adds seeded random
subsets).
"""

from __future__ import annotations

import hashlib
import random
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pyhv.disk.open import open_image
from pyhv.disk.qcow2 import Qcow2Image, check, create
from pyhv.disk.qcow2.fileio import ImageFile
from pyhv.errors import ImageError

HAVE_QEMU = shutil.which("qemu-img") is not None

SECTOR = 512
Entry = tuple[str, int, bytes]  # ("write", offset, data) | ("flush", 0, b"")


@dataclass
class Recording:
    base: bytes
    log: list[Entry] = field(default_factory=list)
    op_ends: list[int] = field(default_factory=list)  # log length after each op
    flushed_ops: list[tuple[int, int]] = field(default_factory=list)  # (log len, ops done)
    states: list[bytes] = field(default_factory=list)  # guest view before / after each op


Step = Callable[[Qcow2Image], None]


def _open(path: str) -> Qcow2Image:
    dev = open_image(path, read_only=False)  # with its backing chain, if any
    assert isinstance(dev, Qcow2Image)
    return dev


def record(path: Path, steps: list[Step]) -> Recording:
    """Run `steps` on the image at `path`, recording its file's writes and flushes.

    A step may call img.flush(): that is a guest flush (everything before it is then
    durable). The guest's view is taken after every step."""
    rec = Recording(path.read_bytes())
    real = str(path)

    def observe(f: ImageFile, op: str, off: int, data: bytes) -> None:
        if f.path == real:
            rec.log.append((op, off, data))

    img = _open(real)
    rec.states.append(view(img))
    ImageFile.observer = observe
    ImageFile.skip_sync = True  # the order is what is recorded; the syscall adds nothing
    try:
        for i, step in enumerate(steps):
            flushes = len([e for e in rec.log if e[0] == "flush"])
            step(img)
            rec.op_ends.append(len(rec.log))
            rec.states.append(view(img))
            if getattr(step, "guest_flush", False):
                assert len([e for e in rec.log if e[0] == "flush"]) > flushes
                rec.flushed_ops.append((len(rec.log), i + 1))
        img.close()
    finally:
        ImageFile.observer = None
        ImageFile.skip_sync = False
    return rec


VIEW_LIMIT = 1 << 20


def view(img: Qcow2Image) -> bytes:
    """The guest's view compared by the test: the disk's first MiB (the workloads write
    there; an 8 GiB disk is not read whole), and the size as the length when smaller."""
    return img.read(0, min(img.size, VIEW_LIMIT))


def flushed(step: Step) -> Step:
    """`step`, then a guest flush."""
    def run(img: Qcow2Image) -> None:
        step(img)
        img.flush()
    run.guest_flush = True  # type: ignore[attr-defined]
    return run


def apply(img: bytearray, off: int, data: bytes) -> None:
    if off > len(img):
        img.extend(bytes(off - len(img)))
    img[off:off + len(data)] = data


def torn(entry: Entry, keep: str) -> list[Entry]:
    """The sectors of a write that reached the disk: the first half, or every other."""
    _op, off, data = entry
    pieces = []
    first = off // SECTOR
    last = (off + len(data) - 1) // SECTOR
    sectors = list(range(first, last + 1))
    chosen = sectors[:max(1, len(sectors) // 2)] if keep == "head" else sectors[::2]
    for s in chosen:
        a = max(off, s * SECTOR) - off
        b = min(off + len(data), (s + 1) * SECTOR) - off
        pieces.append(("write", off + a, data[a:b]))
    return pieces


def subsets(epoch: list[Entry], pos: int, explore: bool) -> Iterator[list[Entry]]:
    """Which writes of the unflushed epoch reached the disk (applied in issue order, as
    a page cache writes back the newest content of each page)."""
    n = len(epoch)
    yield []
    if not n:
        return
    yield epoch
    yield epoch[-1:]
    if n > 2:
        yield epoch[::2]
        yield epoch[1::2]
        yield epoch[n // 2:]
    yield epoch[:-1] + torn(epoch[-1], "head")
    if len(epoch[-1][2]) > SECTOR:
        yield epoch[:-1] + torn(epoch[-1], "odd")
    if explore:
        rng = random.Random(pos)
        for _ in range(6):
            pick = [e for e in epoch if rng.random() < 0.5]
            if pick and rng.random() < 0.5:
                k = rng.randrange(len(pick))
                pick[k:k + 1] = torn(pick[k], rng.choice(["head", "odd"]))
            yield pick


def crash_images(rec: Recording, explore: bool) -> Iterator[tuple[int, bytes]]:
    """(log position, file content) of every distinct crash state."""
    durable = bytearray(rec.base)
    epoch: list[Entry] = []
    seen: set[bytes] = set()
    for pos in range(len(rec.log) + 1):
        if pos:
            op, off, data = rec.log[pos - 1]
            if op == "flush":
                for _op, o, d in epoch:
                    apply(durable, o, d)
                epoch = []
            elif op == "write":
                epoch.append(rec.log[pos - 1])
            else:
                raise AssertionError(f"unexpected log entry {op}")
        for pick in subsets(epoch, pos, explore):
            img = bytearray(durable)
            for _op, o, d in pick:
                apply(img, o, d)
            key = hashlib.sha256(img).digest()
            if key not in seen:
                seen.add(key)
                yield pos, bytes(img)


def allowed_states(rec: Recording, pos: int) -> list[bytes]:
    """Guest views a crash at log position `pos` may show: from the last completed guest
    flush to the end of the operation in progress."""
    done_at_flush = max([ops for at, ops in rec.flushed_ops if at <= pos], default=0)
    in_progress = next((i for i, end in enumerate(rec.op_ends) if pos <= end),
                       len(rec.op_ends) - 1)
    return rec.states[done_at_flush:in_progress + 2]


def guest_view_ok(got: bytes, allowed: list[bytes]) -> str | None:
    if any(got == s for s in allowed):
        return None
    if len(got) not in {len(s) for s in allowed}:
        return f"size {len(got)} is none of {sorted({len(s) for s in allowed})}"
    for at in range(0, len(got), SECTOR):
        piece = got[at:at + SECTOR]
        if not any(s[at:at + SECTOR].ljust(len(piece), b"\0") == piece for s in allowed):
            return f"sector {at // SECTOR} reads as none of its states"
    return None


def replay(tmp: Path, rec: Recording, *, qemu_sample: int, explore: bool) -> int:
    """Check every distinct crash state; returns how many there were."""
    f = tmp / "crash.qcow2"
    n = 0
    qemu_every = 1
    images = list(crash_images(rec, explore))
    if qemu_sample and len(images) > qemu_sample:
        qemu_every = -(-len(images) // qemu_sample)
    for k, (pos, data) in enumerate(images):
        f.write_bytes(data)
        try:
            img = open_image(str(f))  # through the backing chain, if any
            assert isinstance(img, Qcow2Image)
            try:
                res = check(img)
                got = view(img)
            finally:
                img.close()
        except ImageError as e:
            raise AssertionError(f"crash at log entry {pos}: pyhv cannot open it: {e}") \
                from e
        assert res.corruptions == 0, f"crash at log entry {pos}: {res.messages[:4]}"
        why = guest_view_ok(got, allowed_states(rec, pos))
        assert why is None, f"crash at log entry {pos}: {why}"
        if HAVE_QEMU and qemu_sample and k % qemu_every == 0:
            r = subprocess.run(["qemu-img", "check", str(f)], capture_output=True,
                               text=True, timeout=60)
            assert r.returncode in (0, 3), \
                f"crash at log entry {pos}: qemu-img check {r.returncode}\n{r.stdout}"
        n += 1
    return n


# ------------------------------------------------------------------------ workloads

def _pattern(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def workload_writes(tmp: Path) -> tuple[Path, list[Step]]:
    """Guest writes in 4 KiB clusters: new, in place, partial COW, discard,
    compressed; several operations share an epoch between guest flushes."""
    p = tmp / "w.qcow2"
    create(str(p), 256 << 10, cluster_size=4096)
    cs = 4096
    steps: list[Step] = [
        lambda i: i.write(100, _pattern(1, 3 * cs)),
        flushed(lambda i: i.write(5 * cs, _pattern(2, 2 * cs))),
        lambda i: i.write(200, _pattern(3, 300)),  # in place
        lambda i: i.write(7 * cs - 10, _pattern(4, 20)),  # partial, COW of two clusters
        flushed(lambda i: i.discard(0, 2 * cs)),
        lambda i: i.write_compressed(20, b"\x07" * cs) and None,
        lambda i: i.write_compressed(21, b"\x08" * cs) and None,
        flushed(lambda i: i.write(cs + 5, b"\x09" * 10)),
        lambda i: i.write(0, _pattern(5, 4 * cs)),  # reuses the discarded clusters
        flushed(lambda i: i.write(20 * cs + 1, b"\x0a")),  # copies a compressed cluster
    ]
    return p, steps


def workload_tables(tmp: Path, grow_to: int = 64 << 20) -> tuple[Path, list[Step]]:
    """512-byte clusters, 64-bit refcounts: one L2 table maps 32 KiB, one refcount block
    counts 32 KiB of file and the one-cluster refcount table 2 MiB. The writes add L2
    tables and refcount blocks; growing the disk needs a larger L1 table (at 8 GiB, a
    2 MiB one, which also moves the refcount table: workload_table_move)."""
    p = tmp / "t.qcow2"
    create(str(p), 256 << 10, cluster_size=512, refcount_bits=64)
    steps: list[Step] = [
        flushed(lambda i: i.write(0, _pattern(9, 40 << 10))),
        lambda i: i.write(100 << 10, _pattern(10, 40 << 10)),
        flushed(lambda i: i.discard(8 << 10, 16 << 10)),
        flushed(lambda i: i.write(4 << 10, _pattern(11, 24 << 10))),
        flushed(lambda i: i.resize(grow_to)),
        flushed(lambda i: i.write(300 << 10, _pattern(12, 20 << 10))),
    ]
    return p, steps


def workload_snapshots(tmp: Path) -> tuple[Path, list[Step]]:
    """Snapshot create, copy-on-write after it, apply, delete, resize (growing L1)."""
    p = tmp / "s.qcow2"
    create(str(p), 128 << 10, cluster_size=1024)
    cs = 1024
    steps: list[Step] = [
        flushed(lambda i: i.write(0, _pattern(6, 10 * cs))),
        lambda i: i.snapshot_create("s1") and None,
        flushed(lambda i: i.write(3 * cs + 7, _pattern(7, 2 * cs))),  # COW of L2 and data
        lambda i: i.snapshot_create("s2") and None,
        lambda i: i.write(50 * cs, b"\x44" * cs),
        flushed(lambda i: i.snapshot_apply("s1")),
        lambda i: i.snapshot_delete("s2"),
        flushed(lambda i: i.resize(2 << 20)),  # L1 grows
        flushed(lambda i: i.write((2 << 20) - cs, b"\x55" * cs)),
        flushed(lambda i: i.snapshot_delete("s1")),
    ]
    return p, steps


def workload_backing_v2(tmp: Path) -> tuple[Path, list[Step]]:
    """A v2 overlay on a backing file: partial writes copy the backing data in."""
    base = tmp / "base.qcow2"
    create(str(base), 64 << 10, cluster_size=512)
    with Qcow2Image(str(base)) as b:
        b.write(0, _pattern(8, 64 << 10))
    p = tmp / "o.qcow2"
    create(str(p), 64 << 10, cluster_size=512, version=2, backing_file="base.qcow2")
    steps: list[Step] = [
        lambda i: i.write(700, b"\x66" * 1000),
        flushed(lambda i: i.discard(0, 4096)),  # v2 over a backing file: kept
        flushed(lambda i: i.write(10000, b"\x77" * 3000)),
    ]
    return p, steps


def workload_table_move(tmp: Path) -> tuple[Path, list[Step]]:
    p, steps = workload_tables(tmp, 8 << 30)
    return p, steps


def _base(tmp: Path, size: int) -> None:
    """base.qcow2: `size` bytes of data, longer than the overlays made over it."""
    base = tmp / "base.qcow2"
    create(str(base), size, cluster_size=4096)
    with Qcow2Image(str(base)) as b:
        b.write(0, _pattern(13, size))


def workload_overlay_resize(tmp: Path, cs: int = 4096,
                            grow_to: int = 2 << 20) -> tuple[Path, list[Step]]:
    """An overlay shorter than its backing file grows: the new area must read as zeros
    (zero clusters, the unaligned head written as zeros) in every crash state that
    shows the new size, never as the backing file's data. Then a shrink and a grow
    again: the cut-off data must not come back, nor show through early."""
    _base(tmp, 1 << 20)
    p = tmp / "r.qcow2"
    create(str(p), 250 << 10, cluster_size=cs, backing_file="base.qcow2",
           backing_format="qcow2")  # 250 KiB: the old end is inside a cluster
    steps: list[Step] = [
        flushed(lambda i: i.write(4096, _pattern(14, 8192))),
        flushed(lambda i: i.resize(grow_to)),
        flushed(lambda i: i.write(600 << 10, _pattern(15, 5000))),
        flushed(lambda i: i.resize(100 << 10, shrink=True)),
        flushed(lambda i: i.resize(1 << 20)),
        flushed(lambda i: i.write(90 << 10, _pattern(16, 20 << 10))),
    ]
    return p, steps


def workload_overlay_resize_l1(tmp: Path) -> tuple[Path, list[Step]]:
    """As workload_overlay_resize with 512-byte clusters: the grow also moves to a
    larger L1 table and writes zero clusters into many new L2 tables."""
    return workload_overlay_resize(tmp, cs=512, grow_to=3 << 20)


def workload_zeroes(tmp: Path) -> tuple[Path, list[Step]]:
    """Discard and write_zeroes over a longer backing file (v3: zero clusters, table by
    table, the unaligned ends written as zeros), mixed with writes in one epoch."""
    _base(tmp, 512 << 10)
    p = tmp / "z.qcow2"
    create(str(p), 512 << 10, cluster_size=4096, backing_file="base.qcow2",
           backing_format="qcow2")
    steps: list[Step] = [
        flushed(lambda i: i.write(0, _pattern(17, 64 << 10))),
        lambda i: i.discard(4096, 16384),  # data clusters become zero clusters
        flushed(lambda i: i.write_zeroes(30000, 100000)),  # data and backing, unaligned
        lambda i: i.write(32 << 10, _pattern(18, 8192)),
        flushed(lambda i: i.write_zeroes(200 << 10, 312 << 10)),  # to the end
        flushed(lambda i: i.write(300 << 10, b"\x21" * 4096)),  # over a zero cluster
    ]
    return p, steps


def workload_zeroes_v2(tmp: Path) -> tuple[Path, list[Step]]:
    """write_zeroes and discard in a v2 image without a backing file: deallocation."""
    p = tmp / "z2.qcow2"
    create(str(p), 256 << 10, cluster_size=4096, version=2)
    steps: list[Step] = [
        flushed(lambda i: i.write(0, _pattern(19, 128 << 10))),
        lambda i: i.write_zeroes(5000, 40000),
        flushed(lambda i: i.discard(64 << 10, 32 << 10)),
        flushed(lambda i: i.write(8192, b"\x22" * 8192)),  # reuses a freed cluster
    ]
    return p, steps


WORKLOADS = [workload_writes, workload_tables, workload_snapshots, workload_backing_v2,
             workload_overlay_resize, workload_zeroes, workload_zeroes_v2]


@pytest.mark.parametrize("workload", WORKLOADS, ids=[w.__name__[9:] for w in WORKLOADS])
def test_power_loss_every_prefix(tmp_path: Path, workload: Callable[
        [Path], tuple[Path, list[Step]]]) -> None:
    p, steps = workload(tmp_path)
    rec = record(p, steps)
    assert any(e[0] == "flush" for e in rec.log)
    n = replay(tmp_path, rec, qemu_sample=6, explore=False)
    assert n > len(steps)


@pytest.mark.slow
def test_power_loss_overlay_resize_growing_l1(tmp_path: Path) -> None:
    p, steps = workload_overlay_resize_l1(tmp_path)
    rec = record(p, steps)
    with Qcow2Image(str(p), read_only=True) as img:
        assert img.h.l1_size > 64  # the L1 table did grow past its first cluster
    replay(tmp_path, rec, qemu_sample=20, explore=False)


@pytest.mark.slow
def test_power_loss_refcount_table_move(tmp_path: Path) -> None:
    p, steps = workload_table_move(tmp_path)
    rec = record(p, steps)
    with Qcow2Image(str(p), read_only=True) as img:
        assert img.h.refcount_table_offset != 512  # it did move
    replay(tmp_path, rec, qemu_sample=20, explore=False)


@pytest.mark.slow
@pytest.mark.parametrize("workload", WORKLOADS, ids=[w.__name__[9:] for w in WORKLOADS])
def test_power_loss_explore(tmp_path: Path, workload: Callable[
        [Path], tuple[Path, list[Step]]]) -> None:
    p, steps = workload(tmp_path)
    rec = record(p, steps)
    replay(tmp_path, rec, qemu_sample=0 if not HAVE_QEMU else 10 ** 9, explore=True)


def test_recorder_sees_the_barriers(tmp_path: Path) -> None:
    """The ordering the replay relies on, seen in the log: the data of an allocating
    write, then a flush, then the L2 entry; the L2 entry, a flush, then the refcount
    decrement of what it replaced."""
    p = tmp_path / "b.qcow2"
    create(str(p), 1 << 20, cluster_size=4096)
    with Qcow2Image(str(p)) as img:
        img.write(0, b"\x01" * 4096)
        img.flush()
        img.snapshot_create("s")  # the data cluster is now shared: the next write COWs
        log: list[Entry] = []
        ImageFile.observer = lambda f, op, off, data: log.append((op, off, data))
        try:
            img.write(0, b"\x02" * 4096)
            img.flush()
        finally:
            ImageFile.observer = None
        l2 = img.l1[0] & 0x00FFFFFFFFFFFE00
        data_off = img.entry(0) & 0x00FFFFFFFFFFFE00
    kinds = [(op, off, len(d)) for op, off, d in log]
    data_at = kinds.index(("write", data_off, 4096))
    l2_at = kinds.index(("write", l2, 8))  # the entry
    assert ("flush", 0, 0) in kinds[data_at:l2_at]
    later = [i for i, (op, _off, _n) in enumerate(kinds) if op == "write" and i > l2_at]
    assert later  # the old data cluster's refcount drops (it stays in the snapshot)
    assert ("flush", 0, 0) in kinds[l2_at:later[0]]


@pytest.mark.parametrize("backed", [False, True], ids=["alone", "backed"])
def test_grow_after_an_interrupted_shrink_reads_zeros(tmp_path: Path, backed: bool) -> None:
    """A crash after a shrink's size write but before its deallocation leaves clusters
    mapped past the end (allowed: nothing can read them). A later grow must not bring
    them back: it zeroes or deallocates whatever the file still maps past the old end."""
    if backed:
        _base(tmp_path, 64 << 10)  # shorter than the old size: no zero clusters needed
    p = tmp_path / "i.qcow2"
    create(str(p), 1 << 20, cluster_size=4096,
           backing_file="base.qcow2" if backed else None,
           backing_format="qcow2" if backed else None)
    for cut in (100 << 10, (100 << 10) + 512):  # the old end on / inside a cluster
        with _open(str(p)) as img:
            if img.size < 1 << 20:
                img.resize(1 << 20)
            img.write(0, b"\x33" * (1 << 20))
        with open(p, "r+b") as f:  # the size write of `resize --shrink` reached the disk
            f.seek(24)
            f.write(cut.to_bytes(8, "big"))
        with _open(str(p)) as img:
            assert img.read(0, img.size) == b"\x33" * cut
            img.resize(1 << 20)
            assert img.read(0, img.size) == b"\x33" * cut + bytes((1 << 20) - cut)
            assert check(img).corruptions == 0


def test_convert_output_is_not_synced(tmp_path: Path) -> None:
    """convert's output is a new file (qemu-img convert's default cache=unsafe): no
    flush barriers, no fdatasync; the same writes into an image opened normally are
    ordered by barriers."""
    from pyhv.cli import main

    src = tmp_path / "src.qcow2"
    create(str(src), 4 << 20, cluster_size=4096)
    with Qcow2Image(str(src)) as img:
        img.write(0, _pattern(20, 3 << 20))
    log: list[tuple[str, str]] = []
    ImageFile.observer = lambda f, op, off, data: log.append((f.path, op))
    try:
        assert main(["img", "convert", "-O", "qcow2", "-o", "cluster_size=4096", str(src),
                     str(tmp_path / "out.qcow2")]) == 0
        out = [op for path, op in log if path.endswith("out.qcow2")]
        assert out.count("write") > 3 and "flush" not in out
        log.clear()
        with Qcow2Image(str(tmp_path / "out.qcow2")) as img:  # a normal open
            img.write(4 << 19, _pattern(21, 1 << 20))
    finally:
        ImageFile.observer = None
    assert (str(tmp_path / "out.qcow2"), "flush") in log
