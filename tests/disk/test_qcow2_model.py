"""Model-based tests: random operation sequences against an in-memory model of the disk
(and of each snapshot), then pyhv's own check, then (when installed) qemu-img's.

These run without QEMU, so a host without qemu-utils still exercises every path."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest

from pyhv.disk.qcow2 import Qcow2Image, check, create
from pyhv.disk.qcow2.refcount import decode_counts, encode_counts
from pyhv.errors import ImageError


@pytest.mark.parametrize("order", range(7))
def test_refcount_width_roundtrip(order: int) -> None:
    bits = 1 << order
    rng = random.Random(order)
    vals = [rng.randrange(0, 1 << bits) for _ in range(512)]
    raw = encode_counts(vals, order)
    assert len(raw) == 512 * bits // 8
    assert decode_counts(raw, order) == vals
    if bits == 16:  # big-endian, as qcow2.txt specifies
        assert encode_counts([0x1234], 4) == b"\x12\x34"
    if bits == 1:  # least significant bit first
        assert encode_counts([1, 0, 0, 0, 0, 0, 0, 0], 0) == b"\x01"


LAYOUTS = [(512, 3, 16), (4096, 3, 8), (4096, 2, 16), (65536, 3, 16), (16384, 3, 64)]


def _open(p: Path, backing: bool) -> Qcow2Image:
    if not backing:
        return Qcow2Image(str(p))
    from pyhv.disk.open import open_image

    dev = open_image(str(p), read_only=False)
    assert isinstance(dev, Qcow2Image)
    return dev


@pytest.mark.parametrize(("cs", "version", "bits"), LAYOUTS)
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("backing", [False, True], ids=["alone", "backed"])
def test_random_operations_against_model(tmp_path: Path, cs: int, version: int, bits: int,
                                         seed: int, backing: bool) -> None:
    rng = random.Random(seed * 1000 + cs + bits)
    p = tmp_path / "m.qcow2"
    size = 1 << 20
    model = bytearray(size)
    if backing:
        base = tmp_path / "base.qcow2"
        create(str(base), size - 4096, cluster_size=4096)  # smaller than the top
        with Qcow2Image(str(base)) as b:
            pattern = bytes(range(256)) * ((size - 4096) // 256)
            b.write(0, pattern)
        model[:len(pattern)] = pattern
    create(str(p), size, cluster_size=cs, version=version, refcount_bits=bits,
           backing_file="base.qcow2" if backing else None)
    snaps: dict[str, bytes] = {}
    img = _open(p, backing)
    try:
        for step in range(60):
            r = rng.random()
            if r < 0.55:
                n = rng.choice([1, 100, cs, cs + 3, 5 * cs, 70000])
                n = min(n, len(model))
                off = rng.randrange(0, len(model) - n + 1)
                data = bytes([rng.randrange(1, 256)]) * n
                img.write(off, data)
                model[off:off + n] = data
            elif r < 0.62:
                off = rng.randrange(0, len(model))
                n = rng.randrange(0, len(model) - off + 1)
                img.discard(off, n)  # whole clusters inside read as zeros afterwards
                first, last = -(-off // cs) * cs, (off + n) // cs * cs
                if off + n == len(model):
                    last = len(model)
                if last > first and not (backing and version == 2):  # v2: no zero flag
                    model[first:last] = bytes(last - first)
            elif r < 0.72 and bits > 1:
                name = f"s{step}"
                img.snapshot_create(name)
                snaps[name] = bytes(model)
            elif r < 0.8 and snaps:
                name = rng.choice(sorted(snaps))
                img.snapshot_apply(name)
                model = bytearray(snaps[name])
            elif r < 0.86 and snaps:
                name = rng.choice(sorted(snaps))
                img.snapshot_delete(name)
                del snaps[name]
            elif r < 0.9:
                new = len(model) + rng.choice([512, cs, 300 << 10])
                if version == 2 and snaps:  # as qemu-img: v2 snapshots lack a size
                    with pytest.raises(ImageError, match="v2 image which has snapshots"):
                        img.resize(new)
                elif version == 2 and backing and len(model) < size - 4096:
                    # v2 has no zero clusters to hide the longer backing file (qemu-img)
                    with pytest.raises(ImageError, match="cannot zero the grown area"):
                        img.resize(new)
                else:
                    img.resize(new)
                    model += bytes(new - len(model))
            elif r < 0.93 and (not snaps or version == 3) and len(model) > 2 * cs:
                # v3 keeps each snapshot's own size; a backing file's data past the new
                # end must not come back when the image grows again (zeros, as qemu-img)
                new = max(512, len(model) - rng.choice([512, cs, 300 << 10]))
                img.resize(new, shrink=True)
                del model[new:]
            else:
                img.close()
                img = _open(p, backing)  # everything survives a reopen
            assert img.size == len(model), step
            assert img.read(0, img.size) == model, step
        res = check(img)
        assert (res.corruptions, res.leaks) == (0, 0), res.messages[:5]
        assert sorted(s.name for s in img.snapshots) == sorted(snaps)
    finally:
        img.close()
    if shutil.which("qemu-img"):
        import subprocess

        r2 = subprocess.run(["qemu-img", "check", str(p)], capture_output=True, text=True)
        assert r2.returncode == 0, r2.stdout + r2.stderr
