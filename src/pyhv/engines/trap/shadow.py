"""Shadow page tables: the guest's own paging, made real for a guest at CPL 3.

Design: once the guest writes CR3 (or runs INVLPG), the real CR3 points at the shadow
PML4 in the monitor's hidden slot (monitor.py), and the real CPU translates through
shadow tables the monitor builds from the guest's tables (paging.py walks them):

    guest-virtual --(guest's tables: guest-physical, validated)--> shadow leaf
    shadow leaf = frame | P | U/S=1 | R/W (see below) | XD (guest XD with EFER.NXE)
    PML4 slot 511 = the monitor (supervisor-only), never a guest mapping

The shadow is a virtual TLB, filled lazily. It starts empty; a guest access that misses
raises a real #PF, which comes to `fault()`:

    walk the guest's tables for the address (with the access: read, write, fetch)
      the guest's tables do not allow it  -> GuestFault(#PF): the engine reflects it
                                             with the guest's error code, CR2 = address
      they do                             -> install the 4 KiB shadow entry, resume;
                                             the guest never sees the fault

Permissions: the guest "is" at CPL 0, so every access it makes is a supervisor access,
but the real CPU runs it at CPL 3: every shadow entry has U/S=1, including for the
guest's supervisor-only pages (ring compression: a guest kernel's U/S=0 pages protect
nothing from its own user mode, which this engine does not run anyway). R/W in the
shadow is the guest's combined R/W (or always, with the guest's CR0.WP=0), except:

  - dirty bit: a writable page whose guest D bit is clear is mapped read-only, so the
    first write faults, the walk sets D, and the entry becomes writable (D exact);
    the walk sets A in every entry it used when the entry is installed;
  - the guest's own page-table pages (every table a shadow entry was built from) are
    mapped read-only: a write to one faults, the engine emulates the store
    (emulate.py `pt_write`) through `written()`, which drops what it invalidates:
    the one shadow PTE for a write to a guest PT, everything (a full flush) for a write
    to a guest PML4, PDPT or PD. A page that becomes a table later is write-protected
    where the shadow already maps it.

MOV CR3 flushes the whole shadow (no per-CR3 caching); INVLPG drops the shadow page
table covering the address's 2 MiB (guest 2 MiB pages are shadowed as 4 KiB pieces;
with a 1 GiB guest page in the shadow, INVLPG flushes everything); changes to CR0.WP,
CR4 or EFER flush. The pool is bounded (SHADOW_POOL_PAGES, or `pages` for tests): when
fewer than three pages are free, everything is flushed (a hostile guest can make the
monitor refill, never grow).

A second root for guest user mode (engines/bt: `user_only`, its own PML4 and pool
further up the monitor's 2 MiB): only pages the guest's tables give CPL 3 (U/S=1 at
every level) are filled, with the guest's own XD and R/W (CR0.WP does not matter at
CPL 3), and a miss the guest's tables refuse is the guest's #PF with U=1. Two roots
over one set of guest tables stay coherent through `peer`: each write-protects the
table pages the other was built from and the translated code pages (`protected`, one
set shared by both), and a write pyhv emulates (`written`) or an unprotect drops
entries in both.

KVM underneath (KVM-PVM) shadows these tables once more, and it does not see stores the
monitor makes into them from the host. An entry that appears (not present -> present)
or gains permissions needs nothing: KVM re-walks on its own fault. An entry that is
removed or loses permissions does: `resync_needed` tells the engine to drop KVM's copy
(the monitor slot is deleted and re-added, which zaps KVM's shadow pages for it)
before the guest runs again.
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Callable

from pyhv.engines.trap.guestmem import GuestFault
from pyhv.engines.trap.monitor import (
    MON_GPA,
    SHADOW_PML4_OFF,
    SHADOW_POOL_OFF,
    SHADOW_POOL_PAGES,
)
from pyhv.engines.trap.paging import (
    ADDR,
    PF,
    PF_I,
    PF_P,
    PF_U,
    PF_W,
    RW,
    SHIFT,
    US,
    VA_MASK,
    XD,
    P,
    Walk,
    walk,
)
from pyhv.engines.trap.virtual import VirtualCpu
from pyhv.memory import GuestMemory

CR0_WP = 1 << 16
EFER_NXE = 1 << 11
MONITOR_SLOT = 511
STALE_LIMIT = 3


class Refused(Exception):
    """The guest asked for something the shadow cannot give it: end the run, clearly."""


class ShadowMmu:
    """The shadow tables of one vCPU, in the monitor's view (`area`: its 2 MiB)."""

    def __init__(self, mem: GuestMemory, area: memoryview, v: VirtualCpu, *,
                 pages: int = SHADOW_POOL_PAGES, force_xd: bool = False,
                 extra_slots: dict[int, int] | None = None,
                 on_code_write: Callable[[int, int], None] | None = None,
                 pml4_off: int = SHADOW_PML4_OFF, pool_off: int = SHADOW_POOL_OFF,
                 user_only: bool = False, peer: ShadowMmu | None = None) -> None:
        if not 3 <= pages <= SHADOW_POOL_PAGES:
            raise ValueError(f"shadow pool of {pages} pages")
        self.mem, self.area, self.v = mem, area, v
        self.pages = pages
        self.pml4_off, self.pool_off = pml4_off, pool_off
        self.user_only = user_only            # guest user mode's root: U/S enforced
        self.peer = peer                      # the other root over the same guest tables
        # the binary translator (engines/bt): guest pages never executable, its own
        # PML4 slot kept in every flush, translated code pages write-protected
        self.force_xd = force_xd
        self.extra_slots = dict(extra_slots or {})
        self.protected: set[int] = peer.protected if peer is not None else set()
        self.on_code_write = on_code_write
        self.free: list[int] = []
        self.tables: dict[tuple[int, int], int] = {}          # (level, VA prefix) -> off
        self.table_pages: dict[int, set[tuple[int, int]]] = {}  # guest table -> uses
        self.leaves: dict[int, set[int]] = {}                  # frame -> VPNs mapping it
        self.huge = False                                      # a 1 GiB page is shadowed
        self.resync_needed = False
        self.stale = (0, 0)                                    # (VPN, repeats)
        self.count: Counter[str] = Counter()
        self.peak = 0
        if peer is not None:
            peer.peer = self
        if pml4_off != SHADOW_PML4_OFF:     # the monitor's own slot, as in the first root
            self._put(pml4_off + 8 * MONITOR_SLOT,
                      self._get(SHADOW_PML4_OFF + 8 * MONITOR_SLOT))
        self.flush_all(None)

    # ------------------------------------------------------------------ entries

    def _get(self, off: int) -> int:
        return int(struct.unpack_from("<Q", self.area, off)[0])

    def _put(self, off: int, value: int) -> None:
        struct.pack_into("<Q", self.area, off, value)

    def _clear(self, off: int) -> None:
        if self._get(off) & P:
            self.resync_needed = True
        self._put(off, 0)

    def _alloc(self) -> int:
        off = self.free.pop()
        self.area[off:off + 0x1000] = bytes(0x1000)
        self.peak = max(self.peak, self.pages - len(self.free))
        return off

    # ------------------------------------------------------------------ the guest's state

    @property
    def nxe(self) -> bool:
        return bool(self.v.efer & EFER_NXE)

    @property
    def wp(self) -> bool:
        return bool(self.v.cr0 & CR0_WP)

    def walk(self, va: int, *, write: bool = False, fetch: bool = False) -> Walk:
        return walk(self.mem, self.v.cr3, va, write=write, fetch=fetch, nxe=self.nxe,
                    wp=self.wp)

    # ------------------------------------------------------------------ guestmem.Paging

    def translate(self, va: int, write: bool) -> int:
        return self.walk(va, write=write).gpa

    def written(self, gpa: int, size: int) -> None:
        if gpa & ~0xFFF in self.protected and self.on_code_write is not None:
            self.on_code_write(gpa & ~0xFFF, size)
        self._written(gpa, size)
        if self.peer is not None:
            self.peer._written(gpa, size)

    def _written(self, gpa: int, size: int) -> None:
        uses = self.table_pages.get(gpa & ~0xFFF)
        if not uses:
            return
        first, last = (gpa & 0xFFF) >> 3, ((gpa & 0xFFF) + size - 1) >> 3
        for level, prefix in list(uses):
            if level != 1:
                self.flush_all("page-table write")
                return
            off = self.tables.get((1, prefix))
            if off is not None:
                for i in range(first, min(last, 511) + 1):
                    self._clear(off + 8 * i)
                self.count["ptes dropped"] += 1

    # ------------------------------------------------------------------ faults

    def fault(self, va: int, error_code: int) -> bool:
        """A real #PF at `va`. True: the shadow now maps it, resume the guest. False: the
        access is a write the guest may make to one of its own page-table pages: the
        engine emulates it. Raises GuestFault (#PF for the guest) or Refused."""
        write, fetch = bool(error_code & PF_W), bool(error_code & PF_I)
        vn = va & VA_MASK
        if vn >> 39 == MONITOR_SLOT or vn >> 39 in self.extra_slots:
            self.walk(va, write=write, fetch=fetch)      # absent for the guest: its #PF
            raise Refused(f"the guest maps {va:#x} (PML4 slot {vn >> 39}), where the "
                          "monitor lives; its shadow cannot give the guest that slot")
        if self.user_only:
            w = walk(self.mem, self.v.cr3, va, write=write, fetch=fetch, nxe=self.nxe,
                     wp=True)
            if not w.user:
                raise GuestFault(PF, PF_P | PF_U | (error_code & (PF_W | PF_I)), cr2=va)
        else:
            w = self.walk(va, write=write, fetch=fetch)
        if w.size == 1 << 30:
            self.huge = True
        if len(self.free) < 3:
            self.flush_all("pool full")
        self._note_tables(w)
        frame = w.frame
        is_table = (frame in self.table_pages or frame in self.protected or
                    (self.peer is not None and frame in self.peer.table_pages))
        rw = (w.writable or not (self.wp or self.user_only)) and w.dirty and not is_table
        entry = frame | P | US | (RW if rw else 0) | (XD if w.nx or self.force_xd else 0)
        old = self._install(vn, entry)
        self.leaves.setdefault(frame, set()).add(vn >> 12)
        if write and is_table:
            return False
        if old == entry:
            # KVM's copy of the shadow is stale (it did not re-walk): drop it; if that
            # does not help either, stop rather than loop
            vpn, n = self.stale
            n = n + 1 if vpn == vn >> 12 else 1
            self.stale = (vn >> 12, n)
            if n >= STALE_LIMIT:
                why = (" (on KVM-PVM CPL 3 code never reaches PML4 slot 256 of the upper "
                       "half, 0xffff800000000000..0xffff807fffffffff: docs/pvm.md)"
                       if (va >> 39) & 0x1FFFF == 0x1FF00 else "")
                raise Refused(f"the shadow entry for {va:#x} ({entry:#x}) does not take "
                              f"effect{why}")
            self.resync_needed = True
            self.count["stale refills"] += 1
        else:
            self.stale = (0, 0)
        self.count["fills"] += 1
        return True

    def _note_tables(self, w: Walk) -> None:
        for level, table, prefix in w.tables:
            uses = self.table_pages.get(table)
            if uses is None:
                self.table_pages[table] = {(level, prefix)}
                for vpn in self.leaves.get(table, ()):
                    self._write_protect(vpn, table)
                if self.peer is not None:
                    for vpn in self.peer.leaves.get(table, ()):
                        self.peer._write_protect(vpn, table)
            else:
                uses.add((level, prefix))

    def _write_protect(self, vpn: int, frame: int) -> None:
        off = self.tables.get((1, vpn >> 9))
        if off is None:
            return
        off += 8 * (vpn & 511)
        e = self._get(off)
        if e & P and e & RW and e & ADDR == frame:
            self._put(off, e & ~RW)
            self.resync_needed = True
            self.count["write-protected"] += 1

    def _install(self, vn: int, entry: int) -> int:
        off = self.pml4_off
        for level in (4, 3, 2):
            slot = off + 8 * ((vn >> SHIFT[level]) & 511)
            e = self._get(slot)
            if e & P:
                off = (e & ADDR) - MON_GPA
            else:
                child = self._alloc()
                self._put(slot, (MON_GPA + child) | P | RW | US)
                self.tables[(level - 1, vn >> SHIFT[level])] = child
                off = child
        slot = off + 8 * ((vn >> 12) & 511)
        old = self._get(slot)
        if old & P and (old & ~entry & RW or entry & ~old & XD or (old ^ entry) & ADDR):
            self.resync_needed = True                # fewer rights, or another frame
        self._put(slot, entry)
        return old

    # ------------------------------------------------------------------ code pages

    def protect(self, frame: int) -> None:
        """Map guest page `frame` read-only from now on (translated code lives there)."""
        if frame in self.protected:
            return
        self.protected.add(frame)
        for sh in (self, self.peer):
            if sh is not None:
                for vpn in sh.leaves.get(frame, ()):
                    sh._write_protect(vpn, frame)

    def unprotect(self, frame: int) -> None:
        """Its translations are gone: drop its read-only leaves (refilled on demand)."""
        self.protected.discard(frame)
        for sh in (self, self.peer):
            if sh is None or frame in sh.table_pages:
                continue
            for vpn in sh.leaves.get(frame, ()):
                off = sh.tables.get((1, vpn >> 9))
                if off is not None and sh._get(off + 8 * (vpn & 511)) & ADDR == frame:
                    sh._clear(off + 8 * (vpn & 511))

    # ------------------------------------------------------------------ invalidation

    def invlpg(self, va: int) -> None:
        self.count["invlpg"] += 1
        if self.huge:
            self.flush_all("invlpg in a 1 GiB page")
            return
        vn = va & VA_MASK
        off = self.tables.pop((1, vn >> 21), None)
        pd = self.tables.get((2, vn >> 30))
        if off is None or pd is None:
            return
        self._clear(pd + 8 * ((vn >> 21) & 511))
        self.free.append(off)

    def flush_all(self, reason: str | None) -> None:
        """Empty the shadow (PML4 slots 0..510) and give every pool page back."""
        for i in range(MONITOR_SLOT):
            if i not in self.extra_slots:
                self._clear(self.pml4_off + 8 * i)
        for i, entry in self.extra_slots.items():
            self._put(self.pml4_off + 8 * i, entry)
        self.free = [self.pool_off + 0x1000 * n for n in range(self.pages)][::-1]
        self.tables.clear()
        self.table_pages.clear()
        self.leaves.clear()
        self.huge = False
        if reason is not None:
            self.count[f"flushes ({reason})"] += 1

    def in_use(self) -> int:
        return self.pages - len(self.free)

    def stats(self) -> dict[str, int]:
        out = {f"shadow {k}": n for k, n in sorted(self.count.items())}
        out["shadow flushes"] = sum(n for k, n in self.count.items() if k.startswith("flush"))
        out["shadow pages peak"] = self.peak
        return out
