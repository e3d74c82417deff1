"""The stream header (the HELLO record): who sends, and the machine it sends.

Design: the header is a JSON object

    {"magic": "pyhv-migration", "stream": STREAM_VERSION, "pyhv": "0.1.0",
     "engine": "kvm", "cpu": "<CPU model the guest sees>",
     "machine": {"cpus": n, "mem_size": n, "ram": [[gpa, size], ...], "devices": [...]}}

`describe(machine)` builds it from a machine; `check(ours, theirs)` is the destination's
decision: the magic must match, the stream version must be one this pyhv reads, the pyhv
version's major.minor must match (records of another release may differ), the engine
and CPU model must be the same (a guest keeps the CPUID it booted with: moving it to
another CPU model or engine would change what it already read), and the machine shape
(vCPUs, RAM layout, device set) must be equal. It returns None or one line saying what
differs; the destination sends that line back and runs nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pyhv import __version__
from pyhv.vmstate import stateful_devices

if TYPE_CHECKING:
    from pyhv.machine import Machine

MAGIC = "pyhv-migration"
STREAM_VERSION = 1


def cpu_model(engine: str) -> str:
    """The CPU the guest sees: unicorn's for emu; the host's (its CPUID) otherwise."""
    if engine == "emu":
        return "unicorn (emu)"
    from pyhv.host import probe_host
    return probe_host().cpu_model or "unknown"


def describe(machine: Machine) -> dict[str, Any]:
    assert machine.memory is not None
    return {
        "magic": MAGIC, "stream": STREAM_VERSION, "pyhv": __version__,
        "engine": machine.engine_name, "cpu": cpu_model(machine.engine_name),
        "machine": {"cpus": len(machine.vcpus), "mem_size": machine.memory.size,
                    "ram": [[r.gpa, r.size] for r in machine.memory.regions],
                    "devices": [name for name, _ in stateful_devices(machine)]},
    }


def _release(version: object) -> str:
    return ".".join(str(version).split(".")[:2])


def check(ours: dict[str, Any], theirs: dict[str, Any]) -> str | None:
    """None when a stream with header `theirs` can run here, else why not (one line)."""
    if theirs.get("magic") != MAGIC:
        return "not a pyhv migration stream (bad magic)"
    stream = theirs.get("stream")
    if not isinstance(stream, int) or not 1 <= stream <= STREAM_VERSION:
        return (f"stream version {stream!r}: this pyhv ({__version__}) reads versions 1 to "
                f"{STREAM_VERSION}")
    if _release(theirs.get("pyhv")) != _release(ours["pyhv"]):
        return (f"the source runs pyhv {theirs.get('pyhv')!r}, this host pyhv "
                f"{ours['pyhv']}: migrate between the same release")
    if theirs.get("engine") != ours["engine"]:
        return (f"the source runs the guest on engine {theirs.get('engine')!r}, this "
                f"destination on {ours['engine']!r} (start it with --engine "
                f"{theirs.get('engine')})")
    if theirs.get("cpu") != ours["cpu"]:
        return (f"the source's CPU model {theirs.get('cpu')!r} differs from this host's "
                f"{ours['cpu']!r}: the guest would see another CPU")
    mine, other = ours["machine"], theirs.get("machine")
    if not isinstance(other, dict):
        return "the header has no machine description"
    for key, what in (("cpus", "vCPUs"), ("mem_size", "bytes of RAM"),
                      ("ram", "RAM layout"), ("devices", "device set")):
        if other.get(key) != mine[key]:
            return (f"the source machine's {what} ({other.get(key)!r}) differ from this "
                    f"one's ({mine[key]!r}): start the destination with the source's "
                    "options")
    return None
