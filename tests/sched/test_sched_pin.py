"""vCPU pinning through the runner's `on_vcpu_thread` hook: on kvm each vCPU's thread
is pinned to its own set; on emu (every vCPU on the run loop's thread) the thread gets
the union. The spin guest runs briefly under a --timeout; the pins are read back from
the kernel (sched_getaffinity of the recorded thread ids while the run is on)."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest

from pyhv.engines import engine_class
from pyhv.machine import Machine, MachineConfig
from pyhv.runner import Runner
from pyhv.sched import CpuSettings, Pinner

CPUS = sorted(os.sched_getaffinity(0))
pytestmark = pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("ld") is None,
                                reason="the spin guest needs gcc and ld")


@pytest.fixture(scope="module")
def spin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pyhv.schedguest import build_spin
    return build_spin(tmp_path_factory.mktemp("spin"), 100_000)


def run_pinned(spin: Path, engine: str, n: int, settings: CpuSettings) -> dict[int, set[int]]:
    """Run the guest with the pinner; returns {vCPU: the kernel's affinity of its thread}."""
    why = engine_class(engine).probe()
    if why is not None:
        pytest.skip(f"{engine}: {why}")
    seen: dict[int, set[int]] = {}
    pinner = Pinner(settings)

    def hook(vcpus: tuple[int, ...]) -> None:
        pinner.on_thread(vcpus)
        for i in vcpus:
            seen[i] = set(os.sched_getaffinity(threading.get_native_id()))

    before = os.sched_getaffinity(0)
    m = Machine(MachineConfig(kernel=spin, engine=engine, n_cpus=n, mem_size=16 << 20),
                lambda _b: None)
    try:
        r = Runner(m, timeout=0.5)
        r.on_vcpu_thread = hook
        result = r.run()
    finally:
        m.close()
        os.sched_setaffinity(0, before)      # the run loop's thread is this one
    assert result.reason == "timeout", result
    assert {i: cpus for i, (_tid, cpus) in pinner.pinned.items()} == \
        {i: frozenset(s) for i, s in seen.items()}
    return seen


@pytest.mark.parametrize("engine", ["kvm", "emu"])
def test_single_vcpu_thread_is_pinned(spin: Path, engine: str) -> None:
    cpu = CPUS[-1]
    assert run_pinned(spin, engine, 1, CpuSettings(pin=(frozenset({cpu}),))) == {0: {cpu}}


@pytest.mark.skipif(len(CPUS) < 2, reason="needs 2 CPUs")
def test_emu_smp_pins_the_one_thread_to_the_union(spin: Path) -> None:
    a, b = CPUS[0], CPUS[1]
    seen = run_pinned(spin, "emu", 2, CpuSettings(pin=(frozenset({a}), frozenset({b}))))
    assert seen == {0: {a, b}, 1: {a, b}}


@pytest.mark.skipif(len(CPUS) < 2, reason="needs 2 CPUs")
def test_kvm_smp_pins_each_vcpu_thread(spin: Path) -> None:
    a, b = CPUS[0], CPUS[1]
    seen = run_pinned(spin, "kvm", 2, CpuSettings(pin=(frozenset({b}), frozenset({a}))))
    assert seen == {0: {b}, 1: {a}}
