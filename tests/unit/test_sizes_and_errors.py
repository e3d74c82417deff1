"""Human sizes (pyhv.units) and the error hierarchy (pyhv.errors)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from pyhv.errors import ConfigError, GuestMemoryError, HostError, ImageError, PyhvError
from pyhv.units import format_size, parse_size

K, M, G, T = 1 << 10, 1 << 20, 1 << 30, 1 << 40


@pytest.mark.parametrize("text,value", [
    ("4096", 4096), ("0", 0), ("512K", 512 * K), ("512k", 512 * K), ("128M", 128 * M),
    ("128m", 128 * M), ("1G", G), ("2g", 2 * G), ("1T", T), ("1P", 1 << 50), ("1E", 1 << 60),
    ("128MiB", 128 * M), ("128MB", 128 * M), ("128mb", 128 * M), ("1GiB", G),
    ("512B", 512), (" 64M ", 64 * M), ("64 M", 64 * M), ("1.5G", 3 * G // 2),
    ("0.5K", 512), ("2.25M", 2 * M + M // 4),
])
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


def test_default_unit_applies_only_to_plain_numbers() -> None:
    assert parse_size("128", default_unit="M") == 128 * M    # QEMU's -m 128
    assert parse_size("128K", default_unit="M") == 128 * K
    assert parse_size("1.5", default_unit="g") == 3 * G // 2


@pytest.mark.parametrize("text", [
    "", " ", "M", "12Q", "-1", "-128M", "1e3", "0x1000", "1.5.5M", "128 MiB extra", "1,5M",
    "abc", "1KK", ".5M", "5.M", "nan", "inf", "1_000",
])
def test_malformed_sizes_are_config_errors(text: str) -> None:
    with pytest.raises(ConfigError, match="malformed size"):
        parse_size(text)


@pytest.mark.parametrize("text", ["1.5", "0.1K", "1.0001K", "3.3"])
def test_fractional_bytes_are_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="whole number of bytes"):
        parse_size(text)


@pytest.mark.parametrize("text", [
    "1.0000000000000001K",       # 1024.0000000000001 bytes: float rounding hid it
    "9007199254740993.5",        # 2**53 + 1.5
])
def test_fractions_are_exact_not_float_rounded(text: str) -> None:
    with pytest.raises(ConfigError, match="whole number of bytes"):
        parse_size(text)


def test_large_values_are_exact() -> None:
    assert parse_size("9007199254740993.0") == 2**53 + 1
    assert parse_size("9007199254740993") == 2**53 + 1
    assert parse_size("1024E") == 1 << 70   # parsed; whether it fits the host is the caller's


@given(st.integers(0, 1 << 20), st.sampled_from(["", "K", "M", "G", "T"]),
       st.sampled_from(["", "B", "iB", "b"]))
def test_property_integer_sizes(n: int, unit: str, suffix: str) -> None:
    if not unit and suffix == "iB":
        return
    mult = {"": 1, "K": K, "M": M, "G": G, "T": T}[unit]
    assert parse_size(f"{n}{unit}{suffix}") == n * mult
    assert parse_size(f"{n}{unit.lower()}{suffix}") == n * mult


@pytest.mark.parametrize("n,text", [
    (0, "0 B"), (512, "512 B"), (999, "999 B"), (1000, "0.977 KiB"), (K, "1 KiB"),
    (64 * M, "64 MiB"), (3 * G // 2, "1.5 GiB"), (T, "1 TiB"), (1 << 60, "1 EiB"),
    (1000 * K, "0.977 MiB"), (1023488, "1e+03 KiB"),  # qemu-img's own %0.3g band
    (1152921504606846912, "1 EiB"),  # once printed "1024 PiB" (found by hypothesis)
    ((1 << 64) - 1, "16 EiB"),
])
def test_format_size(n: int, text: str) -> None:
    assert format_size(n) == text


@given(st.integers(0, (1 << 64) - 1))
@example(1152921504606846912)  # printed "1024 PiB" before the unit rolled over at 1000
@example((1 << 60) - 1)
@example(1023488)
def test_property_format_size_is_within_rounding_of_the_value(n: int) -> None:
    text = format_size(n)
    number, unit = text.split()
    scale = {"B": 1, "KiB": K, "MiB": M, "GiB": G, "TiB": T, "PiB": 1 << 50, "EiB": 1 << 60}
    approx = float(number) * scale[unit]
    assert abs(approx - n) <= 0.005 * max(n, 1) + 1
    # the integer part stays below 1000 (qemu-img's rule), apart from %0.3g rounding it up
    assert float(number) <= 1000 and (unit == "B" or float(number) >= 0.976)


@pytest.mark.qemu
@pytest.mark.parametrize("n", [512, 1000 * 512, 1999 * 512, 2000 * 512, 2047 * 512,
                               M, 3 * G // 2, 999 * G + 512, 1000 * G, T, 5 * T + 512])
def test_format_size_matches_qemu_img_info(tmp_path: Path, n: int) -> None:
    """qemu-img info prints a raw file's virtual size with the same function."""
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img is not installed (make setup installs qemu-utils)")
    f = tmp_path / "r.raw"
    with open(f, "wb") as fh:
        fh.truncate(n)  # sparse
    out = subprocess.run(["qemu-img", "info", "-f", "raw", str(f)], capture_output=True,
                         text=True, check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("virtual size:"))
    assert line == f"virtual size: {format_size(n)} ({n} bytes)"


# ---------------------------------------------------------------------- errors


def test_every_user_facing_error_is_a_pyhv_error_with_a_status() -> None:
    for cls in (ConfigError, ImageError, HostError, GuestMemoryError):
        assert issubclass(cls, PyhvError)
    assert PyhvError.exit_status == 2
    assert ConfigError("x").exit_status == 2


def test_guest_memory_error_names_address_and_size() -> None:
    e = GuestMemoryError(0xFEE00000, 4)
    assert (e.gpa, e.size) == (0xFEE00000, 4)
    assert str(e) == "guest access at 0xfee00000 (+4) outside guest RAM"
    assert "\n" not in str(e)
    assert str(GuestMemoryError(-1, 1, "is negative")).endswith("is negative")
