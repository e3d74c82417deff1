"""Crash safety: a fault before any one write, or kill -9, leaves at most leaks.

The fault hook (fileio.ImageFile.fault_hook) raises before the k-th pwrite, for every k
an operation sequence performs; the half-updated file is then checked by qemu-img check
(no corruption allowed, leaks allowed) and its content compared per cluster with the
states before and after the interrupted operation. Each operation is followed by a
flush (table entries are written back at flushes, as a disk's writes are durable only
then), so "before" is the state at the previous flush. Host crashes (writes reordered
between flushes) are test_qcow2_powerfail.py's.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pyhv.disk.qcow2 import Qcow2Image, check, create
from pyhv.disk.qcow2.fileio import ImageFile, InjectedFault

pytestmark = pytest.mark.qemu

CS = 4096
SIZE = 256 << 10

Op = Callable[[Qcow2Image], None]


def _ops() -> list[tuple[str, Op]]:
    rng = random.Random(7)
    big = rng.randbytes(3 * CS + 100)
    return [
        ("write new", lambda i: i.write(100, big)),
        ("write in place", lambda i: i.write(200, b"\x01" * 50)),
        ("snapshot create", lambda i: i.snapshot_create("s1")),
        ("write cow", lambda i: i.write(CS - 10, b"\x02" * (CS + 20))),
        ("write new L2", lambda i: i.write(SIZE - 5000, b"\x03" * 5000)),
        ("discard", lambda i: i.discard(0, 2 * CS)),
        ("snapshot create 2", lambda i: i.snapshot_create("s2")),
        ("resize", lambda i: i.resize(SIZE * 40)),
        ("write grown", lambda i: i.write(SIZE * 39, b"\x04" * 3 * CS)),
        ("compressed", lambda i: i.write_compressed(SIZE * 30 // CS, b"\x06" * CS)),
        ("fill: new refcount block", lambda i: _fill(i)),
        ("snapshot delete", lambda i: i.snapshot_delete("s1")),
        ("snapshot apply", lambda i: i.snapshot_apply("s2")),
        ("write after apply", lambda i: i.write(0, b"\x05" * 10000)),
    ]


def _fill(img: Qcow2Image) -> None:
    """9 MiB of data: the file outgrows its first refcount block (2048 4-KiB clusters)."""
    for k in range(9):
        img.write(SIZE + k * (1 << 20), bytes([k + 1]) * (1 << 20))


def _states(base: Path, tmp: Path) -> tuple[int, list[bytes]]:
    """Run all ops without faults: count the writes; record the disk after each op."""
    p = tmp / "dry.qcow2"
    shutil.copy(base, p)
    n = 0

    def count(off: int, length: int) -> None:
        nonlocal n
        n += 1

    states = []
    with Qcow2Image(str(p)) as img:
        states.append(img.read(0, img.size))
        ImageFile.fault_hook = count
        try:
            for _name, op in _ops():
                op(img)
                img.flush()
                ImageFile.fault_hook = None
                states.append(img.read(0, img.size))
                ImageFile.fault_hook = count
        finally:
            ImageFile.fault_hook = None
    return n, states


def _matches_either(got: bytes, before: bytes, after: bytes) -> bool:
    """Cluster by cluster, `got` holds the old or the new content (sizes may differ)."""
    for c in range(0, len(got), CS):
        g = got[c:c + CS]
        b = before[c:c + CS].ljust(len(g), b"\0")
        a = after[c:c + CS].ljust(len(g), b"\0")
        if g not in (b, a):
            return False
    return True


def _base(tmp: Path) -> Path:
    base = tmp / "base.qcow2"
    create(str(base), SIZE, cluster_size=CS)
    with Qcow2Image(str(base)) as img:
        img.write(0, b"\xaa" * 10 * CS)
    return base


def _fault_points(total: int, limit: int | None) -> list[int]:
    pts = list(range(1, total + 1))
    if limit is not None and total > limit:
        rng = random.Random(total)
        pts = sorted(rng.sample(pts, limit))
    return pts


def _run_faults(qemu: Any, tmp: Path, limit: int | None) -> tuple[int, int]:
    base = _base(tmp)
    total, states = _states(base, tmp)
    assert total > 50
    tested = 0
    for k in _fault_points(total, limit):
        p = tmp / "f.qcow2"
        shutil.copy(base, p)
        count = 0

        def hook(off: int, length: int, k: int = k) -> None:
            nonlocal count
            count += 1
            if count == k:
                raise InjectedFault(f"write {k}")

        done = 0
        img = Qcow2Image(str(p))
        ImageFile.fault_hook = hook
        try:
            for _name, op in _ops():
                op(img)
                img.flush()
                done += 1
        except InjectedFault:
            pass
        finally:
            ImageFile.fault_hook = None
            img.f.close()
        assert done < len(_ops()), f"fault {k} never fired"
        qemu.check(p, leaks_ok=True)
        with Qcow2Image(str(p), read_only=True) as img2:
            got = img2.read(0, img2.size)
            assert check(img2).corruptions == 0
        name = _ops()[done][0]
        assert _matches_either(got, states[done], states[done + 1]), \
            f"fault before write {k} during {name!r}: data is neither before nor after"
        tested += 1
    # the last faulted image is still usable: repair leaks, write, check
    with Qcow2Image(str(p)) as img3:
        check(img3, repair="leaks")
        img3.write(0, b"ok")
    qemu.check(p)
    return tested, total


def test_fault_injection_sampled(qemu: Any, tmp_path: Path, no_faults: None) -> None:
    tested, total = _run_faults(qemu, tmp_path, limit=30)
    assert tested == min(total, 30)


@pytest.mark.slow
def test_fault_injection_every_write(qemu: Any, tmp_path: Path, no_faults: None) -> None:
    _run_faults(qemu, tmp_path, limit=None)


_CHILD = r"""
import os, random, sys
from pyhv.disk.qcow2 import Qcow2Image
path, seed = sys.argv[1], int(sys.argv[2])
rng = random.Random(seed)
img = Qcow2Image(path)
print("ready", flush=True)
i = 0
while True:
    i += 1
    r = rng.random()
    if r < 0.05:
        try:
            img.snapshot_create(f"s{i}")
        except Exception:
            pass
    elif r < 0.08 and img.snapshots:
        img.snapshot_delete(img.snapshots[0].id_str)
    elif r < 0.1:
        img.discard(rng.randrange(0, img.size // 4096) * 4096, 8192)
    else:
        n = rng.choice([1, 4096, 5000, 20000])
        off = rng.randrange(0, img.size - n)
        img.write(off, bytes([i % 251 + 1]) * n)
"""


def _kill_runs(qemu: Any, tmp: Path, runs: int) -> None:
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = dict(os.environ, PYTHONPATH=src)
    for seed in range(runs):
        p = tmp / f"k{seed}.qcow2"
        create(str(p), 1 << 20, cluster_size=CS)
        proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(p), str(seed)],
                                stdout=subprocess.PIPE, env=env)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(0.05 + random.Random(seed).random() * 0.3)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        qemu.check(p, leaks_ok=True)
        with Qcow2Image(str(p)) as img:
            assert check(img).corruptions == 0
            img.write(0, b"after")
        qemu.check(p, leaks_ok=True)


def test_sigkill_small(qemu: Any, tmp_path: Path) -> None:
    _kill_runs(qemu, tmp_path, 3)


@pytest.mark.slow
def test_sigkill_many(qemu: Any, tmp_path: Path) -> None:
    _kill_runs(qemu, tmp_path, 40)


def test_fault_injection_refcount_table_growth(qemu: Any, tmp_path: Path,
                                              no_faults: None) -> None:
    """512-byte clusters with 64-bit refcounts: one table cluster covers only 2 MiB, so
    writing 3 MiB moves the refcount table (grow) and adds blocks; fault at sampled
    writes of that, plus a snapshot on top."""
    base = tmp_path / "g.qcow2"
    create(str(base), 4 << 20, cluster_size=512, refcount_bits=64)

    def ops(img: Qcow2Image) -> None:
        for k in range(12):
            img.write(k * (256 << 10), bytes([k + 1]) * (256 << 10))
        img.snapshot_create("s")
        img.write(100, b"after")

    n = 0

    def count(off: int, length: int) -> None:
        nonlocal n
        n += 1

    dry = tmp_path / "dry.qcow2"
    shutil.copy(base, dry)
    ImageFile.fault_hook = count
    try:
        with Qcow2Image(str(dry)) as img:
            t0 = img.h.refcount_table_offset
            ops(img)
    finally:
        ImageFile.fault_hook = None
    with Qcow2Image(str(dry), read_only=True) as img:
        assert img.h.refcount_table_offset != t0
        final = img.read(0, img.size)
    qemu.check(dry)
    assert qemu.raw(dry) == final
    for k in sorted(random.Random(5).sample(range(1, n + 1), min(n, 25))):
        p = tmp_path / "f.qcow2"
        shutil.copy(base, p)
        left = k

        def hook(off: int, length: int) -> None:
            nonlocal left
            left -= 1
            if left == 0:
                raise InjectedFault

        img = Qcow2Image(str(p))
        ImageFile.fault_hook = hook
        try:
            ops(img)
        except InjectedFault:
            pass
        finally:
            ImageFile.fault_hook = None
            img.f.close()
        qemu.check(p, leaks_ok=True)
        with Qcow2Image(str(p), read_only=True) as img2:
            got = img2.read(0, img2.size)
        for c in range(512, len(got), 512):  # each cluster: old (zeros) or new
            piece = got[c:c + 512]
            k2 = c // (256 << 10)
            assert piece in (bytes(512), bytes([k2 + 1]) * 512), f"fault {k}, cluster {c}"
