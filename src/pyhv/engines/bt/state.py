"""The guest's registers at a call-out: the S page, seen through the `Held` interface.

Design: at a call-out, COMMON has spilled every general register and RFLAGS into the S
page (area.py) before its MMIO exit, and reloads them from there after pyhv is done. So
pyhv needs no KVM_GET_REGS/KVM_SET_REGS at all for a call-out: `SHeld` reads the
registers from S, the trap engine's emulator and reflection work on it exactly as on a
`Held` (context.py), and `commit()` writes them back to S. Its `rip` is a guest address
(the engine turns it into a TC address for S.RESUME); KVM's own registers are never
touched while the call-out's MMIO exit is pending.
"""

from __future__ import annotations

import struct
from typing import Any, cast

from pyhv.engines.bt import area as A
from pyhv.engines.trap.context import GPRS, Held
from pyhv.kvm import structs as ks


class SHeld(Held):
    """The guest's registers in S (a call-out), with `rip` the guest RIP."""

    def __init__(self, bt: A.BtArea, rip: int) -> None:   # noqa: D107 - no Held.__init__
        self.vcpu = cast(Any, None)
        self.parked = False
        self.bt = bt
        self._g = list(struct.unpack_from("<16Q", bt.view, A.S_OFF + A.S_GPRS))
        self._regs = None
        self._dirty = False
        self.rip = rip
        self.rsp = self._g[4]
        self.rflags = bt.s_get(A.S_RFLAGS)
        self._read = (self.rsp, self.rflags)

    def regs(self) -> ks.KvmRegs:
        r = ks.KvmRegs()
        for n, value in zip(GPRS, self._g, strict=True):
            setattr(r, n, value)
        r.rsp, r.rip, r.rflags = self.rsp, self.rip, self.rflags
        return r

    def gpr(self, index: int) -> int:
        return self.rsp if index == 4 else self._g[index]

    def set_gpr(self, index: int, value: int) -> None:
        value &= 0xFFFF_FFFF_FFFF_FFFF
        if index == 4:
            self.rsp = value
        else:
            self._g[index] = value
        self._dirty = True

    def commit(self) -> None:
        if not self._dirty and (self.rsp, self.rflags) == self._read:
            return                            # S already holds them
        self._g[4] = self.rsp
        struct.pack_into("<16Q", self.bt.view, A.S_OFF + A.S_GPRS, *self._g)
        self.bt.s_put(A.S_RFLAGS, self.rflags)
