"""The shared exits (pyhv.exits) are exactly the ones every run loop routes; an engine's
own exits stay inside the engine (KVM's interrupt-window exit lives in pyhv.kvm.vcpu and
never leaves the KVM engine's vCPU)."""

from __future__ import annotations

from pyhv import exits
from pyhv.engines import base

ROUTED = {"IoIn", "IoOut", "MmioRead", "MmioWrite", "Halt", "Shutdown", "Interrupted",
          "InternalError"}


def test_the_shared_exits_are_the_ones_the_run_loop_routes() -> None:
    shared = {name for name, obj in vars(exits).items()
              if isinstance(obj, type) and issubclass(obj, exits.Exit) and obj is not exits.Exit}
    assert shared == ROUTED
    assert set(base.__all__) >= ROUTED
