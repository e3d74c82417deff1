"""Fuzzing the qcow2 parser: mutated images raise ImageError or work, nothing else.

Property: for any bytes, opening (read-only and read-write), reading the whole disk,
checking and one write either succeed or raise ImageError; no other exception, no
file growth beyond what a successful write needs, and never a hang or a huge
allocation. Inputs that once broke this are kept under corpus/ and replayed; a new
failure found by exploring (`-m slow`, or `--hypothesis-profile=explore`) becomes an
`@example` here, from the arguments hypothesis prints.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyhv.disk.qcow2 import Qcow2Image, check, create
from pyhv.errors import ImageError

CORPUS = Path(__file__).parent / "corpus"
_SEED: bytes | None = None


def seed_image(tmp: Path) -> bytes:
    """A small, valid image: 512-byte clusters, data, a snapshot, a compressed cluster."""
    global _SEED
    if _SEED is None:
        p = tmp / "seed.qcow2"
        create(str(p), 64 << 10, cluster_size=512)
        with Qcow2Image(str(p)) as img:
            img.write(0, b"a" * 1500)
            img.snapshot_create("s")
            img.write(700, b"b" * 600)
            img.write_compressed(100, b"c" * 512)
            img.write(60 << 10, b"d" * 100)
        _SEED = p.read_bytes()
    return _SEED


def exercise(path: Path) -> None:
    """The property: only ImageError may escape."""
    size0 = path.stat().st_size
    try:
        with Qcow2Image(str(path), read_only=True) as img:
            img.read(0, img.size)
            check(img)
    except ImageError:
        pass
    written: tuple[int, bytes] | None = None
    try:
        with Qcow2Image(str(path)) as img:
            for off in (0, img.size // 2, max(0, img.size - 700)):
                data = b"Zz" * 350
                data = data[:max(0, img.size - off)]
                img.write(off, data)
                written = (off, data)
            img.read(0, img.size)
    except ImageError:
        written = None
    if written is not None:  # a write that succeeded reads back after reopening
        off, data = written
        with Qcow2Image(str(path), read_only=True) as img:
            assert img.read(off, len(data)) == data
    assert path.stat().st_size <= size0 + (40 << 20)


mutation = st.lists(st.tuples(st.integers(0, 8191), st.binary(min_size=1, max_size=8)),
                    min_size=1, max_size=6)


@settings(max_examples=150)
@given(muts=mutation)
def test_fuzz_mutated_metadata(tmp_path: Path, muts: list[tuple[int, bytes]]) -> None:
    data = bytearray(seed_image(tmp_path))
    for off, b in muts:
        off %= len(data)
        data[off:off + len(b)] = b
    p = tmp_path / "fuzz.qcow2"
    p.write_bytes(bytes(data))
    exercise(p)


@settings(max_examples=60)
@given(header=st.binary(min_size=0, max_size=600))
def test_fuzz_random_header(tmp_path: Path, header: bytes) -> None:
    data = bytearray(seed_image(tmp_path))
    data[:len(header)] = header
    p = tmp_path / "h.qcow2"
    p.write_bytes(bytes(data))
    exercise(p)


slot_mutation = st.lists(
    st.tuples(st.integers(0, 1151),  # which u64 of the first 9 KiB
              st.integers(0, 20).map(lambda k: k * 512),  # a cluster-aligned offset
              st.sampled_from([0, 1 << 63, 1 << 62])),  # flags
    min_size=1, max_size=3)


@settings(max_examples=150)
@given(muts=slot_mutation)
def test_fuzz_pointers_into_metadata(tmp_path: Path, muts: list[tuple[int, int, int]]) -> None:
    """Table entries re-aimed at other clusters (the overlap bugs the corpus holds)."""
    import struct

    data = bytearray(seed_image(tmp_path))
    for slot, off, flags in muts:
        struct.pack_into(">Q", data, (slot % (len(data) // 8)) * 8, off | flags)
    p = tmp_path / "slot.qcow2"
    p.write_bytes(bytes(data))
    exercise(p)


@pytest.mark.parametrize("case", sorted(CORPUS.glob("*.qcow2")) if CORPUS.exists() else [],
                         ids=lambda p: p.name)
def test_corpus_regressions(tmp_path: Path, case: Path) -> None:
    p = tmp_path / case.name
    p.write_bytes(case.read_bytes())
    exercise(p)


def test_corpus_is_kept() -> None:
    assert CORPUS.is_dir() and any(CORPUS.glob("*.qcow2")), os.listdir(CORPUS.parent)
