"""Engines: the ways pyhv runs guest code, behind one interface (`base.Engine`).

Engines are imported lazily by name so that a missing dependency of one (unicorn for
`emu`) never breaks another (`kvm`).
"""

from __future__ import annotations

import importlib

from pyhv.engines.base import Engine
from pyhv.errors import HostError

ENGINES: dict[str, str] = {
    "kvm": "pyhv.engines.kvm:KvmEngine",
    "emu": "pyhv.engines.emu:EmuEngine",
    "trap": "pyhv.engines.trap:TrapEngine",
    "bt": "pyhv.engines.bt:BtEngine",
    "pv": "pyhv.engines.pv:PvEngine",
}


def engine_class(name: str) -> type[Engine]:
    """The Engine subclass called `name`; HostError if unknown or not importable."""
    try:
        target = ENGINES[name]
    except KeyError:
        raise HostError(f"unknown engine {name!r} (choose from {', '.join(ENGINES)})") from None
    module_name, _, cls_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise HostError(f"engine {name!r} cannot be loaded: {e}") from None
    cls: type[Engine] = getattr(module, cls_name)
    return cls
