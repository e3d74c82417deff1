"""MSI-X for a PCI function (PCI Local Bus 3.0, 6.8.2; PCIe base spec 7.7.2): the
capability, the vector table and the pending-bit array in a memory BAR, and the messages,
which go to the local APICs over the APIC bus (SDM Vol. 3A, 10.11 "Message Signalled
Interrupts").

Capability (ID 0x11, 12 bytes): message control (table size N-1 in bits 10:0, function
mask bit 14, MSI-X enable bit 15; only bits 14-15 writable), table offset | BIR, PBA
offset | BIR. pyhv places the table at offset 0 and the PBA at PBA_OFFSET of the BAR it
is given (QEMU's virtio-pci uses a BAR of its own the same way).

Table entry (16 bytes): message address low (bits 1:0 read 0), address high, message
data, vector control (bit 0 mask; the other bits reserved: read 0, writes ignored).
Every entry starts masked. The PBA is read-only (writes ignored): bit v is set while
vector v has a message held back by its mask or the function mask, and the message is
sent, and the bit cleared, when both masks clear (the mask is read when the message
would be sent, as the spec allows). Accesses of 1-8 bytes within one entry (or one PBA
qword) are merged byte by byte; anything else in the BAR reads 0 and is ignored.

Message decoding (10.11.1): address bits 31:20 must be 0xFEE, else the write goes
nowhere (dropped and counted: pyhv has no other MSI target); destination ID bits 19:12
(x2APIC physical IDs up to 255 as in xAPIC, no extended destination), destination mode
bit 2 (1 = logical); data: vector bits 7:0, delivery mode bits 10:8 (fixed, lowest
priority, NMI; SMI, INIT, SIPI, ExtINT and the reserved modes are dropped), trigger mode
bit 15 (level messages are delivered as edge: there is no remote IRR for MSI). A vector
below 16 reaches the local APIC, which flags it in its ESR as hardware does.

Invariants: N is fixed at construction (1..2048); the state is the table bytes, the
pending bits and the two control bits, all bounded; `signal(v)` never raises for a
guest-chosen v (out of range: ignored and counted).
"""

from __future__ import annotations

from collections.abc import Callable

from pyhv.devices.apicbus import FIXED, LOWEST, NMI, Message
from pyhv.devices.pci import config as C
from pyhv.devices.state import Reader

ENTRY = 16
PBA_OFFSET = 0x800
CTRL_ENABLE = 1 << 15
CTRL_MASK = 1 << 14
MSI_ADDR_BASE = 0xFEE
MsiSink = Callable[[Message], object]


def decode(address: int, data: int) -> Message | None:
    """The APIC-bus message an MSI write carries, None if it goes nowhere."""
    if (address >> 20) & 0xFFF != MSI_ADDR_BASE or address >> 32:
        return None
    mode = (data >> 8) & 7
    if mode not in (FIXED, LOWEST, NMI):
        return None
    return Message(vector=data & 0xFF, mode=mode, logical=bool(address & (1 << 2)),
                   dest=(address >> 12) & 0xFF)


class Msix:
    """N MSI-X vectors of one function: table and PBA (a BAR's bus device) and the
    capability in its configuration space."""

    def __init__(self, config: C.ConfigSpace, vectors: int, bar: int,
                 sink: MsiSink | None = None) -> None:
        if not 1 <= vectors <= 2048 or vectors * ENTRY > PBA_OFFSET:
            raise ValueError(f"{vectors} MSI-X vectors do not fit")
        self.config = config
        self.n = vectors
        self.sink = sink
        self.table = bytearray(vectors * ENTRY)
        for v in range(vectors):
            self.table[v * ENTRY + 12] = 1            # masked
        self.pending = 0
        self.sent = 0
        self.dropped = 0
        self.ignored = 0
        ctrl = (vectors - 1).to_bytes(2, "little")
        body = ctrl + (0 | bar).to_bytes(4, "little") + (PBA_OFFSET | bar).to_bytes(4, "little")
        self.cap = config.add_capability(C.CAP_ID_MSIX, body,
                                         wmask=bytes([0, 0xC0]) + bytes(8))

    # ------------------------------------------------------------------ control

    def _control(self) -> int:
        return self.config.get(self.cap + 2, 2)

    @property
    def enabled(self) -> bool:
        return bool(self._control() & CTRL_ENABLE)

    @property
    def function_masked(self) -> bool:
        return bool(self._control() & CTRL_MASK)

    def reset(self) -> None:
        """Function reset: disabled, every entry masked and cleared, nothing pending."""
        self.config.set(self.cap + 2, 2, self.n - 1)
        self.table[:] = bytes(len(self.table))
        for v in range(self.n):
            self.table[v * ENTRY + 12] = 1
        self.pending = 0

    def save_state(self) -> dict[str, object]:
        """The vector table and the pending bits (the control bits live in the
        function's configuration space, saved with it)."""
        return {"table": bytes(self.table).hex(), "pending": self.pending}

    def read_state(self, r: Reader) -> tuple[bytes, int]:
        """Check a record of `save_state` (the caller's Reader checks for extra keys)."""
        table = r.hex("table", length=len(self.table))
        for v in range(self.n):
            ent = table[v * ENTRY:(v + 1) * ENTRY]
            if ent[0] & 3 or int.from_bytes(ent[12:16], "little") & ~1:
                raise r.fail("table", f"entry {v} has reserved bits set")
        pending = r.int("pending", 0, (1 << self.n) - 1)
        r.done()
        return table, pending

    def take_state(self, fields: tuple[bytes, int]) -> None:
        self.table[:], self.pending = fields

    def control_written(self) -> None:
        """After a configuration write that may have changed enable / function mask."""
        self._flush()

    # ------------------------------------------------------------------ messages

    def _entry(self, v: int) -> tuple[int, int, bool]:
        e = self.table[v * ENTRY:(v + 1) * ENTRY]
        address = int.from_bytes(e[0:8], "little")
        data = int.from_bytes(e[8:12], "little")
        return address, data, bool(e[12] & 1)

    def signal(self, v: int) -> bool:
        """Vector v fires (MSI-X enabled): send it, or hold it in the PBA while masked.
        False if v does not exist (the caller's NO_VECTOR or a guest's bad number)."""
        if not 0 <= v < self.n:
            self.ignored += 1
            return False
        if self.function_masked or self._entry(v)[2]:
            self.pending |= 1 << v
            return True
        self._send(v)
        return True

    def _send(self, v: int) -> None:
        address, data, _ = self._entry(v)
        msg = decode(address, data)
        if msg is None or self.sink is None:
            self.dropped += 1
            return
        self.sent += 1
        self.sink(msg)

    def _flush(self) -> None:
        if not self.pending or not self.enabled or self.function_masked:
            return
        for v in range(self.n):
            if self.pending >> v & 1 and not self._entry(v)[2]:
                self.pending &= ~(1 << v)
                self._send(v)

    # ------------------------------------------------------------------ the BAR

    def read(self, offset: int, size: int) -> int:
        if offset >= 0 and offset + size <= len(self.table) and \
                offset // ENTRY == (offset + size - 1) // ENTRY:
            return int.from_bytes(self.table[offset:offset + size], "little")
        pba = offset - PBA_OFFSET
        if pba >= 0 and pba + size <= ((self.n + 63) // 64) * 8 and \
                pba // 8 == (pba + size - 1) // 8:
            return (self.pending >> (8 * pba)) & ((1 << (8 * size)) - 1)
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if not (offset >= 0 and offset + size <= len(self.table)
                and offset // ENTRY == (offset + size - 1) // ENTRY):
            return                                    # the PBA and the rest: read-only
        v = offset // ENTRY
        buf = bytearray(self.table[v * ENTRY:(v + 1) * ENTRY])
        at = offset - v * ENTRY
        buf[at:at + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        buf[0] &= 0xFC                                # address bits 1:0 read 0
        buf[12:16] = bytes([buf[12] & 1, 0, 0, 0])    # vector control: mask bit only
        self.table[v * ENTRY:(v + 1) * ENTRY] = buf
        if not buf[12] & 1:
            self._flush()
