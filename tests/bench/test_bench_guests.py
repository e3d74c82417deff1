"""The benchmark guests of bench/emu_bench.py print what the benchmark parses, on pyhv's
emu engine and on QEMU's TCG (where installed), with the bench's own build and parsers.

The figures themselves are not tested (benchmarks are noisy and not assertions); the
guests' results are: the sieve's prime count, one timing line per round, the timer
guest's tick count and its rate line. Then `--quick` runs of every benchmark script
(slow: minutes).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import emu_bench  # noqa: E402

from pyhv.engines.emu import EmuEngine  # noqa: E402

TOOLS = [t for t in ("gcc", "ld") if shutil.which(t) is None]
pytestmark = pytest.mark.skipif(bool(TOOLS) or EmuEngine.probe() is not None,
                                reason=f"missing {TOOLS} or the emu engine")
PEERS = ["pyhv"] + (["qemu"] if shutil.which("qemu-system-x86_64") else [])


def argv(peer: str, img: Path) -> list[str]:
    return emu_bench.pyhv_cmd(img) if peer == "pyhv" else emu_bench.qemu_cmd(img)


@pytest.mark.parametrize("peer", PEERS)
def test_sieve_guest_times_each_round_and_counts_the_primes(tmp_path: Path, peer: str
                                                            ) -> None:
    img = emu_bench.build_guest("sieve.S", {"ROUNDS": 2}, tmp_path)
    p = emu_bench.run(argv(peer, img), peer)
    rounds = emu_bench.rounds_of(p.out, 2, peer)     # raises unless "primes 00014069"
    assert all(r > 0 for r in rounds) and p.out.startswith("sieve: 2 rounds\n")


def test_sieve_host_program_matches(tmp_path: Path) -> None:
    exe = emu_bench.build_host_sieve(2, tmp_path)
    p = emu_bench.run([str(exe)], "native", want=0)
    assert len(emu_bench.rounds_of(p.out, 2, "native")) == 2


@pytest.mark.parametrize("peer", PEERS)
def test_timer_guest_counts_its_ticks(tmp_path: Path, peer: str) -> None:
    img = emu_bench.build_guest("timer.S", {"TICKS": 5}, tmp_path)
    m = emu_bench.TICKS.search(emu_bench.run(argv(peer, img), peer).out)
    assert m and int(m.group(1), 16) == 5 and int(m.group(2), 16) > 0


@pytest.mark.slow
@pytest.mark.parametrize("peer", PEERS)
def test_timer_guest_rate_in_guest_time(tmp_path: Path, peer: str) -> None:
    img = emu_bench.build_guest("timer.S", {"RATE": 1}, tmp_path)
    m = emu_bench.RATE.search(emu_bench.run(argv(peer, img), peer).out)
    assert m and 1900 <= int(m.group(1), 16) <= 2100     # 2 s of the guest's RTC at 1 kHz


@pytest.mark.slow
@pytest.mark.parametrize("script", ["emu_bench.py", "boot_bench.py", "exit_bench.py",
                                    "trap_bench.py", "virtio_bench.py", "net_bench.py",
                                    "smp_bench.py", "migration_bench.py"])
def test_bench_script_runs(script: str) -> None:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    p = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--quick"],
                       capture_output=True, text=True, timeout=1800, cwd=ROOT,
                       stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "reproduce:" in p.stdout and "Traceback" not in p.stderr, p.stdout + p.stderr
    assert re.search(r"\d\.\d+x", p.stdout.split("reproduce:", 1)[1]), p.stdout  # ratios


@pytest.mark.parametrize("base_len", [1000, 1001, 1002, 1003])
def test_virtio_bench_initrd_appends_diskio_at_an_aligned_offset(tmp_path: Path,
                                                                 base_len: int) -> None:
    """Linux takes an archive after a compressed one only at a 4-byte aligned offset
    (zeros between are skipped): the bench's diskio must start on one whatever the
    length of pyhv's cached initramfs, or the guest runs `sh: /bin/diskio: not found`
    and the phases time nothing (as they did with the v5 image, 1,177,039 bytes)."""
    import virtio_bench

    base = tmp_path / "base.cpio.gz"
    base.write_bytes(b"\x1f\x8b" + bytes([0xAA]) * (base_len - 2))
    data = virtio_bench.build_initrd(base, tmp_path).read_bytes()
    start = data.index(b"070701", base_len)
    assert start % 4 == 0 and not any(data[base_len:start])
    assert b"bin/diskio\0" in data[start:start + 300]


def test_virtio_bench_phase_that_fails_is_not_timed() -> None:
    import virtio_bench

    seen = {k: float(i) for i, k in enumerate([*virtio_bench.PHASES, "end"])}
    assert virtio_bench.figures(seen, 8, 200) is not None
    assert virtio_bench.figures({**seen, "failed": 1.5}, 8, 200) is None
    assert "|| echo PH failed" in virtio_bench.script(8, 200)
