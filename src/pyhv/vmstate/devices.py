"""Which devices of a machine have state records, under which stable names.

Design: the names are the machine's, not the devices': one record per device instance,

    pic  pit  port61  rtc  serial  i8042  acpi-pm  fwcfg  debug-exit  boot-timer
    ioapic  lapic.N (one per vCPU)  pci-host  pci.SLOT (each PCI function but the
    host bridge, by slot)

in that order (the order `apply` loads them: interrupt controllers' records do not
depend on the others, and nothing drives an IRQ line while loading). A machine whose
PCI functions include one without a complete record of its own (COMPLETE_PCI lists the
classes that have one: the virtio transport) is refused by `check_savable` rather than
saved without it.

Invariants: the same configuration always gives the same names in the same order;
every stateful device of a PC machine is in the list (a bare board, `devices=False`,
has none).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pyhv.devices.pci.host import HostBridge
from pyhv.devices.pit8254 import SystemControlPortB
from pyhv.devices.state import Stateful
from pyhv.devices.virtio.transport import VirtioPciFunction
from pyhv.errors import StateError

if TYPE_CHECKING:
    from pyhv.machine import Machine

# PCI function classes whose records are complete (their class says so by being here)
COMPLETE_PCI: tuple[type, ...] = (VirtioPciFunction,)


def stateful_devices(machine: Machine) -> list[tuple[str, Stateful]]:
    """(name, device) for every device with a record, in load order."""
    try:
        d = machine.devices
    except AttributeError:
        return []
    out: list[tuple[str, Stateful]] = [
        ("pic", d.pic), ("pit", d.pit), ("port61", _port61(machine)), ("rtc", d.rtc),
        ("serial", d.serial), ("i8042", d.i8042), ("acpi-pm", d.acpi_pm),
        ("fwcfg", d.fwcfg), ("debug-exit", d.debug_exit), ("boot-timer", d.boot_timer),
        ("ioapic", d.ioapic)]
    out += [(f"lapic.{i}", lapic) for i, lapic in enumerate(machine.lapics)]
    out.append(("pci-host", d.pci))
    for slot, fn in sorted(d.pci.slots.items()):
        if not isinstance(fn, HostBridge):
            out.append((f"pci.{slot}", fn))
    return out


def check_savable(machine: Machine) -> None:
    """StateError when a device of this machine has no complete record yet."""
    try:
        slots = machine.devices.pci.slots
    except AttributeError:
        return
    for slot, fn in sorted(slots.items()):
        if not isinstance(fn, (HostBridge, *COMPLETE_PCI)):
            raise StateError(f"PCI slot {slot} ({fn.name}): pyhv cannot save this "
                             f"device's state yet")


def _port61(machine: Machine) -> Stateful:
    for dev in machine.devices.all:
        if isinstance(dev, SystemControlPortB):
            return dev
    raise StateError("the machine has no port 0x61 device")
