"""Fixtures for the Linux tests: guest memory, temporary files, and Debian's real kernel
image (fetched once per session into the user's pyhv cache)."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from linuxfakes import new_memory

from pyhv import debian, images
from pyhv.errors import HostError
from pyhv.memory import GuestMemory


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = new_memory()
    yield m
    m.close()


@pytest.fixture(scope="session")
def debian_image() -> images.LinuxImage:
    """Debian's cloud kernel + the busybox initramfs, fetched into the user's cache once
    (about 5 s with a Debian mirror; a no-op when already current)."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("needs Debian's apt-get and dpkg-deb to fetch the guest kernel")
    try:
        return images.fetch_linux(quiet=True)
    except HostError as e:
        pytest.skip(f"cannot fetch Debian's kernel here: {e}")


@pytest.fixture(scope="session")
def debian_disk(debian_image: images.LinuxImage) -> debian.DebianDisk:
    """The Debian root disk of `pyhv guest fetch debian` for that kernel: the cached one,
    else built now (mmdebstrap: about 40 s and 100 MB from a fast mirror, once per cache;
    CI builds it like the kernel image, so the Debian tests run there too)."""
    found = [d for d in debian.cached_disks() if d.linux == debian_image]
    if found:
        return found[0]
    if shutil.which("mmdebstrap") is None:
        pytest.skip("needs mmdebstrap to build the Debian disk")
    try:
        return debian.fetch_debian(quiet=True, linux=debian_image)
    except HostError as e:
        pytest.skip(f"cannot build the Debian disk here: {e}")


@pytest.fixture(scope="session")
def debian_kernel(debian_image: images.LinuxImage) -> bytes:
    return debian_image.kernel_path.read_bytes()


@pytest.fixture
def write(tmp_path: Path) -> Callable[[str, bytes], Path]:
    """write(name, bytes) -> Path in a temporary directory."""
    def _write(name: str, data: bytes) -> Path:
        p = tmp_path / name
        p.write_bytes(data)
        return p
    return _write
