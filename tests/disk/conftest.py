"""Fixtures for the disk tests: QEMU's tools as the reference (pyelftools-style)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyhv.disk.qcow2.fileio import ImageFile

HAVE_QEMU = shutil.which("qemu-img") is not None and shutil.which("qemu-io") is not None


class Qemu:
    """qemu-img / qemu-io, run on files under a test's tmp_path."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self._n = 0

    def run(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(args, capture_output=True, text=True, timeout=120)
        if ok and r.returncode != 0:
            raise AssertionError(f"{' '.join(args)} -> {r.returncode}\n{r.stdout}\n{r.stderr}")
        return r

    def img(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("qemu-img", *args, ok=ok)

    def io(self, path: str | Path, *cmds: str, fmt: str = "qcow2") -> None:
        args = ["qemu-io", "-f", fmt]
        for c in cmds:
            args += ["-c", c]
        r = self.run(*args, str(path))
        assert "error" not in r.stdout.lower() and "failed" not in r.stdout.lower(), r.stdout

    def check(self, path: str | Path, *, leaks_ok: bool = False) -> None:
        """qemu-img check: no corruption (and no leaks unless allowed)."""
        r = self.img("check", str(path), ok=False)
        allowed = (0, 3) if leaks_ok else (0,)
        assert r.returncode in allowed, f"qemu-img check {path}: {r.returncode}\n{r.stdout}" \
                                        f"\n{r.stderr}"

    def raw(self, path: str | Path) -> bytes:
        """The disk's content as qemu-img convert -O raw sees it."""
        self._n += 1
        out = self.tmp / f"_qemu_raw_{self._n}.raw"
        self.img("convert", "-O", "raw", str(path), str(out))
        data = out.read_bytes()
        out.unlink()
        return data


@pytest.fixture
def qemu(tmp_path: Path) -> Qemu:
    if not HAVE_QEMU:
        pytest.skip("qemu-img/qemu-io not installed")
    return Qemu(tmp_path)


@pytest.fixture
def no_faults() -> Iterator[None]:
    yield
    ImageFile.fault_hook = None


def pyhv_view(path: str | Path) -> bytes:
    from pyhv.disk.open import open_image

    dev = open_image(str(path))
    try:
        return dev.read(0, dev.size)
    finally:
        dev.close()


@pytest.fixture
def view() -> object:
    return pyhv_view


def file_digest(path: str | Path) -> bytes:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).digest()


@pytest.fixture
def digest() -> object:
    return file_digest

