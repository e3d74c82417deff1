"""`pyhv run --net/--mac`: the guest's NIC, a virtio-net PCI function on a back end.

`make_nic(spec, mac)` returns a factory for MachineConfig.pci_devices: each machine
(a guest reset builds a new one) opens its own back end from the spec (for `--net user`
a new passt), starts it, and wraps it in VirtioNet on the virtio PCI transport; the
function's close() closes the back end (passt stopped, sockets and socket files
released). A back end that cannot start (a refused connection, a missing passt, no
permission for a tap) is a one-line error before the guest runs. The MAC is chosen once
per run, so a reset keeps the guest's address.
"""

from __future__ import annotations

from collections.abc import Callable

from pyhv.devices.deferred import DeferredCalls
from pyhv.devices.pci.function import PciFunction
from pyhv.memory import GuestMemory
from pyhv.net.spec import NetSpec

# The kernel command-line word that makes pyhv's /init configure eth0 by DHCP
# (pyhv.images: NET_PARAM) for back ends with a DHCP server.
DHCP_WORD = "pyhv.net=dhcp"


def wants_dhcp(spec: NetSpec) -> bool:
    return spec.kind == "user"


def make_nic(spec: NetSpec, mac: bytes
             ) -> Callable[[GuestMemory, DeferredCalls], PciFunction]:
    def make(memory: GuestMemory, deferred: DeferredCalls) -> PciFunction:
        from pyhv.devices.virtio.net import VirtioNet
        from pyhv.devices.virtio.transport import VirtioPciFunction
        backend = spec.open()
        assert backend is not None
        try:
            dev = VirtioNet(backend, mac)
            dev.start()
            return VirtioPciFunction(dev, memory, deferred)
        except BaseException:
            backend.close()
            raise
    return make
