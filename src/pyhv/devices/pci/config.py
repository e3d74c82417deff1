"""One PCI function's 256-byte configuration space: bytes, write masks, capabilities.

Facts (PCI Local Bus Specification 3.0, 6.1 "Configuration Space Organization", type 0
header):

    0x00 vendor ID   0x02 device ID      0x04 command   0x06 status
    0x08 revision    0x09 class code (prog-if, subclass, base class)
    0x0c cache line  0x0d latency timer  0x0e header type  0x0f BIST
    0x10..0x27 BAR 0-5   0x2c subsystem vendor  0x2e subsystem ID  0x30 expansion ROM
    0x34 capabilities pointer   0x3c interrupt line   0x3d interrupt pin
    0x40..0xff device-specific: capabilities, each [ID, next, body...] (6.7)

Design: the space is a bytearray with two masks of the same size, after the way every
PCI model describes its registers: `wmask` (bits the guest may write) and `w1cmask`
(bits a guest write of 1 clears, the status register's error bits). A write of any
width at any offset is applied byte by byte through the masks, so byte, word and dword
accesses, aligned or not, all mean what they mean on hardware: each byte lane is its own
register byte. Read-only bytes (IDs, class, the capability chain) simply have a zero
wmask. Side effects (BAR moves, decoding on/off) are the function's business
(function.py): this class only stores.

Capabilities are appended from 0x40 on, 4-byte aligned, each linked from the previous
one (or from 0x34), and setting the first one sets status bit 4 ("capabilities list").

Invariants: the data is always exactly 256 bytes; the bytes of an access that fall
outside [0, 256) read as zero and are not written; a capability never overlaps another
or runs past 0xff.
"""

from __future__ import annotations

CONFIG_SIZE = 256

VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION = 0x08
CLASS_PROG = 0x09
CACHE_LINE = 0x0C
LATENCY = 0x0D
HEADER_TYPE = 0x0E
BAR0 = 0x10
SUBSYS_VENDOR = 0x2C
SUBSYS_ID = 0x2E
ROM_BAR = 0x30
CAP_PTR = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D
CAPS_START = 0x40

CMD_IO = 1 << 0
CMD_MEMORY = 1 << 1
CMD_MASTER = 1 << 2
CMD_PARITY = 1 << 6
CMD_SERR = 1 << 8
CMD_INTX_DISABLE = 1 << 10
STATUS_INTERRUPT = 1 << 3
STATUS_CAP_LIST = 1 << 4
# status bits a write of 1 clears: parity, signaled/received aborts, SERR, parity error
STATUS_W1C = 0xF900

CAP_ID_VENDOR = 0x09
CAP_ID_MSIX = 0x11


class ConfigSpace:
    """256 bytes of configuration space with write and write-1-to-clear masks."""

    def __init__(self) -> None:
        self.data = bytearray(CONFIG_SIZE)
        self.wmask = bytearray(CONFIG_SIZE)
        self.w1cmask = bytearray(CONFIG_SIZE)
        self._cap_next = CAPS_START
        self._last_cap: int | None = None

    # ------------------------------------------------------------------ guest accesses

    def read(self, offset: int, size: int) -> int:
        """`size` bytes from `offset`, little-endian; bytes past 0xff read as zero."""
        end = min(offset + size, CONFIG_SIZE)
        if offset < 0 or offset >= end:
            return 0
        return int.from_bytes(self.data[offset:end], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        """A guest write: each byte lane through wmask and w1cmask."""
        for i in range(size):
            at = offset + i
            if not 0 <= at < CONFIG_SIZE:
                continue
            byte = (value >> (8 * i)) & 0xFF
            wm, w1c = self.wmask[at], self.w1cmask[at]
            old = self.data[at]
            self.data[at] = ((old & ~wm) | (byte & wm)) & ~(byte & w1c) & 0xFF

    # ------------------------------------------------------------------ the model's side

    def get(self, offset: int, size: int) -> int:
        return int.from_bytes(self.data[offset:offset + size], "little")

    def set(self, offset: int, size: int, value: int, wmask: int | None = None) -> None:
        """Store a register's value (not through the masks), optionally its wmask."""
        self.data[offset:offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(
            size, "little")
        if wmask is not None:
            self.wmask[offset:offset + size] = wmask.to_bytes(size, "little")

    def set_w1c(self, offset: int, size: int, mask: int) -> None:
        self.w1cmask[offset:offset + size] = mask.to_bytes(size, "little")

    def add_capability(self, cap_id: int, body: bytes, wmask: bytes | None = None) -> int:
        """Append a capability: [cap_id, next] + body; returns its offset. `wmask`
        covers the body (the ID and next bytes are always read-only)."""
        length = 2 + len(body)
        at = self._cap_next
        if at + length > CONFIG_SIZE:
            raise ValueError("capabilities do not fit in 256 bytes of configuration space")
        self.data[at] = cap_id
        self.data[at + 1] = 0
        self.data[at + 2:at + length] = body
        if wmask is not None:
            if len(wmask) != len(body):
                raise ValueError("capability wmask and body differ in length")
            self.wmask[at + 2:at + length] = wmask
        if self._last_cap is None:
            self.data[CAP_PTR] = at
            self.set(STATUS, 2, self.get(STATUS, 2) | STATUS_CAP_LIST)
        else:
            self.data[self._last_cap + 1] = at
        self._last_cap = at
        self._cap_next = (at + length + 3) & ~3
        return at

    def capabilities(self) -> list[tuple[int, int]]:
        """(offset, ID) of each capability, walking the chain as a driver does (a chain
        that loops or leaves the space ends the walk)."""
        out: list[tuple[int, int]] = []
        if not self.get(STATUS, 2) & STATUS_CAP_LIST:
            return out
        at = self.data[CAP_PTR] & ~3
        seen: set[int] = set()
        while at >= CAPS_START and at not in seen and at < CONFIG_SIZE:
            seen.add(at)
            out.append((at, self.data[at]))
            at = self.data[at + 1] & ~3
        return out
