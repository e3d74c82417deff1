"""A damaged image is never made worse: a corpus of corrupted images (built here), every
pyhv verb run on each, and `qemu-img check`'s error count compared before and after.
Verbs that change metadata refuse a damaged image (pointing at `pyhv img check -r
all`) and leave the file untouched; repair may only lower the count."""

from __future__ import annotations

import contextlib
import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pyhv.cli import main
from pyhv.disk.open import open_image
from pyhv.disk.qcow2 import Qcow2Image, create
from pyhv.errors import ImageError

pytestmark = pytest.mark.qemu

CS = 4096
MASK = 0x00FFFFFFFFFFFE00
COPIED = 1 << 63


def img(*args: str) -> int:
    return main(["img", *args])


def _u64(p: Path, off: int) -> int:
    with open(p, "rb") as f:
        f.seek(off)
        return int.from_bytes(f.read(8), "big")


def _put64(p: Path, off: int, v: int) -> None:
    with open(p, "r+b") as f:
        f.seek(off)
        f.write(v.to_bytes(8, "big"))


class Layout:
    """Where things are in the corpus image (read with pyhv before corrupting it)."""

    def __init__(self, p: Path) -> None:
        with Qcow2Image(str(p), read_only=True) as i:
            self.l1 = i.h.l1_table_offset
            self.l2 = i.l1[0] & MASK
            self.refblock0 = i.refs.table[0]
            self.data = {g: i.entry(g) & MASK for g in range(12) if i.entry(g) & MASK}
            self.snap_l1 = i.snapshots[0].l1_table_offset

    def set_count(self, p: Path, host: int, count: int) -> None:
        with open(p, "r+b") as f:  # 16-bit refcounts, all in block 0
            f.seek(self.refblock0 + 2 * (host // CS))
            f.write(struct.pack(">H", count))


def _corpus_image(tmp: Path) -> Path:
    """top.qcow2 over base.qcow2: data in guest clusters 0-3 shared with snapshot s0,
    cluster 1 rewritten after it (copied on write), cluster 8 new."""
    base = tmp / "base.qcow2"
    create(str(base), 1 << 20, cluster_size=CS)
    with Qcow2Image(str(base)) as b:
        b.write(0, b"\xbb" * (1 << 20))
    top = tmp / "top.qcow2"
    create(str(top), 1 << 20, cluster_size=CS, backing_file="base.qcow2",
           backing_format="qcow2")
    dev = open_image(str(top), read_only=False)
    try:
        dev.write(0, b"\x01" * 4 * CS)
        assert isinstance(dev, Qcow2Image)
        dev.snapshot_create("s0")
        dev.write(CS, b"\x02" * CS)
        dev.write(8 * CS, b"\x03" * CS)
    finally:
        dev.close()
    return top


Corruption = Callable[[Path, Layout], None]
KINDS: list[tuple[str, Corruption]] = [
    ("L2 entry into the L1 table", lambda p, L: _put64(p, L.l2 + 8 * 5, L.l1 | COPIED)),
    ("L2 entry into a refcount block",
     lambda p, L: _put64(p, L.l2 + 8 * 5, L.refblock0 | COPIED)),
    ("two L2 entries, one cluster", lambda p, L: _put64(p, L.l2 + 8 * 5, L.data[8] | COPIED)),
    ("data cluster counted 0", lambda p, L: L.set_count(p, L.data[8], 0)),
    ("shared data cluster counted 1", lambda p, L: L.set_count(p, L.data[0], 1)),
    ("L2 table counted 0", lambda p, L: L.set_count(p, L.l2, 0)),
    ("L1 table counted 0", lambda p, L: L.set_count(p, L.l1, 0)),
    ("snapshot L1 counted 0", lambda p, L: L.set_count(p, L.snap_l1, 0)),
    ("COPIED on a shared cluster",
     lambda p, L: _put64(p, L.l2, _u64(p, L.l2) | COPIED)),
]

# verbs that change the image's metadata: refused, the file unchanged
REFUSE: list[tuple[str, list[str]]] = [
    ("resize", ["resize", "{top}", "+64K"]),
    ("snapshot -c", ["snapshot", "-c", "s1", "{top}"]),
    ("snapshot -d", ["snapshot", "-d", "s0", "{top}"]),
    ("snapshot -a", ["snapshot", "-a", "s0", "{top}"]),
    ("commit", ["commit", "{top}"]),
    ("rebase", ["rebase", "-b", "", "{top}"]),
]
# verbs that may run (reading, header-only, repair), but never raise the error count
OTHERS: list[tuple[str, list[str]]] = [
    ("rebase -u", ["rebase", "-u", "-b", "base.qcow2", "-F", "qcow2", "{top}"]),
    ("check -r leaks", ["check", "-r", "leaks", "{top}"]),
    ("check -r all", ["check", "-r", "all", "{top}"]),
    ("convert", ["convert", "-O", "qcow2", "{top}", "{tmp}/out.qcow2"]),
    ("map", ["map", "{top}"]),
]


def qemu_errors(qemu: Any, p: Path) -> int:
    r = qemu.img("check", "--output=json", str(p), ok=False)
    if not r.stdout.strip():
        return 10 ** 6  # qemu-img cannot even check it
    d = json.loads(r.stdout)
    return int(d.get("corruptions", 0)) + int(d.get("check-errors", 0))


def _guest_writes(p: Path) -> None:
    """What a guest would do: writes in place, into new clusters, over the snapshot's."""
    dev = open_image(str(p), read_only=False)
    try:
        for off in (0, CS, 5 * CS, 8 * CS, 20 * CS):
            with contextlib.suppress(ImageError):  # refusing is fine; worse is not
                dev.write(off + 7, b"\x99" * 100)
    finally:
        dev.close()


@pytest.mark.parametrize(("kind", "corrupt"), KINDS, ids=[k[0] for k in KINDS])
def test_damaged_image_never_made_worse(qemu: Any, tmp_path: Path, kind: str,
                                        corrupt: Corruption, digest: Any,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    clean = _corpus_image(tmp_path)
    layout = Layout(clean)
    pristine = tmp_path / "pristine.qcow2"
    shutil.copy(clean, pristine)
    corrupt(pristine, layout)
    errors = qemu_errors(qemu, pristine)
    assert errors > 0, f"{kind}: qemu-img sees no error; the corpus is wrong"
    top = tmp_path / "top.qcow2"
    base = tmp_path / "base.qcow2"
    base_digest = digest(base)
    for name, argv in REFUSE + OTHERS:
        shutil.copy(pristine, top)
        before = digest(top)
        capsys.readouterr()
        rc = img(*[a.format(top=top, tmp=tmp_path) for a in argv])
        err = capsys.readouterr().err
        after = qemu_errors(qemu, top)
        assert after <= errors, f"{kind}: {name} raised qemu-img's errors {errors}->{after}"
        if (name, argv) in REFUSE:
            assert rc == 1, f"{kind}: {name} was not refused"
            assert "pyhv img check -r all" in err or "overlaps metadata" in err, err
            assert digest(top) == before, f"{kind}: {name} changed the file"
        assert digest(base) == base_digest, f"{kind}: {name} changed the backing file"
    shutil.copy(pristine, top)
    _guest_writes(top)
    after = qemu_errors(qemu, top)
    assert after <= errors, f"{kind}: guest writes raised qemu-img's errors {errors}->{after}"


def test_commit_into_a_damaged_base_refused(qemu: Any, tmp_path: Path, digest: Any,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    top = _corpus_image(tmp_path)
    base = tmp_path / "base.qcow2"
    with Qcow2Image(str(base), read_only=True) as b:
        l1, refblock = b.h.l1_table_offset, b.refs.table[0]
        l2 = b.l1[0] & MASK
    _put64(base, l2 + 8 * 3, l1 | COPIED)  # base: an L2 entry into its L1 table
    errors = qemu_errors(qemu, base)
    before_top, before_base = digest(top), digest(base)
    assert img("commit", str(top)) == 1
    assert f"pyhv img check -r all {base}" in capsys.readouterr().err
    assert (digest(top), digest(base)) == (before_top, before_base)
    assert qemu_errors(qemu, base) == errors
    assert refblock  # the layout was read


def test_issue_example_resize_after_overlap(qemu: Any, tmp_path: Path, digest: Any,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """The issue's reproduction: an L2 entry pointing at the L1 table's cluster; check
    reports it, resize +64K must not free the cluster still in use."""
    p = tmp_path / "c.qcow2"
    qemu.img("create", "-f", "qcow2", str(p), "1M")
    qemu.io(p, "write -P 0x11 0 64k")
    l1 = _u64(p, 40)
    l2 = _u64(p, l1) & MASK
    _put64(p, l2 + 8, l1 | COPIED)
    errors = qemu_errors(qemu, p)
    assert img("check", str(p)) == 2
    before = digest(p)
    capsys.readouterr()
    assert img("resize", str(p), "+64K") == 1
    err = capsys.readouterr().err
    assert "corruption" in err and f"pyhv img check -r all {p}" in err
    assert digest(p) == before
    assert qemu_errors(qemu, p) == errors


def test_in_place_write_refused_when_copied_lies(tmp_path: Path, digest: Any) -> None:
    """The cheap check on the write path: a COPIED entry whose cluster is shared (the
    snapshot's data) is not written in place."""
    top = _corpus_image(tmp_path)
    layout = Layout(top)
    _put64(top, layout.l2, _u64(top, layout.l2) | COPIED)  # guest cluster 0: shared
    dev = open_image(str(top), read_only=False)
    try:
        before = digest(top)
        with pytest.raises(ImageError, match="COPIED.*refcount is 2.*check -r all"):
            dev.write(10, b"x")
        assert digest(top) == before
    finally:
        dev.close()
