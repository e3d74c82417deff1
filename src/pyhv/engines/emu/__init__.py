"""The software CPU engine (`--engine emu`): guest code runs on unicorn (QEMU's TCG).

Use it where hardware virtualization is missing or too slow (on KVM-PVM hosts every CPL 0
instruction is emulated by KVM, ~2,500x slower: docs/host.md); it runs the same machines,
devices and loaders as the KVM engine, behind the same `Engine` interface.

Package map (each module states its design and invariants):

    layout.py   unicorn 2.1.4's CPUX86State offsets, verified at start-up (self_check)
    cpu.py      CpuState <-> unicorn, exactly (hidden segment parts, CPL, flags, FXSAVE)
    mmu.py      linear -> physical page walks for pyhv's own accesses
    deliver.py  exception / interrupt delivery: real, protected, long mode, #DF, triple
    syscall.py  SYSCALL / SYSENTER semantics (unicorn only calls a hook)
    vcpu.py     EmuVcpu: the run loop, hooks, virtual time, interrupt injection
    native/     block counting at block starts (unicorn's TB-start helper, interposed,
                or a block hook) and the paging-off TLB fill, in C, built with gcc

Requirements: the Python package `unicorn`, exactly version 2.1.4 (pinned in pyproject:
the CPU state layout is checked against it); gcc for the native code (optional).
Importing this package never fails: `EmuEngine.probe()` says why the engine cannot run.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from pyhv.engines.base import Engine, EngineVcpu
from pyhv.engines.emu._uc import IMPORT_ERROR, unicorn
from pyhv.errors import HostError
from pyhv.memory import PAGE_SHIFT, PAGE_SIZE, GuestMemory

if TYPE_CHECKING:
    from pyhv.arch.x86.cpuid import CpuModel

__all__ = ["EmuEngine"]


class EmuEngine(Engine):
    """Software CPU engine: one unicorn instance per vCPU, RAM shared zero-copy."""

    name = "emu"
    virtual_time = True

    def __init__(self, memory: GuestMemory, *, ns_per_block: int = 10, ns_per_io: int = 1000,
                 model: CpuModel | None = None) -> None:
        why = self.probe()
        if why is not None:
            raise HostError(why)
        super().__init__(memory)
        self.ns_per_block = ns_per_block
        self.ns_per_io = ns_per_io
        self.model = model
        self.vcpus: list[EngineVcpu] = []
        self._digests: dict[int, bytes] | None = None

    @classmethod
    def probe(cls) -> str | None:
        if IMPORT_ERROR is not None:
            return ("the emu engine needs the Python package 'unicorn' (pip install "
                    f"unicorn==2.1.4): {IMPORT_ERROR}")
        from pyhv.engines.emu import layout
        version = getattr(unicorn, "__version__", "?")
        if version != layout.UNICORN_VERSION:
            return (f"the emu engine needs unicorn=={layout.UNICORN_VERSION} (its CPU state "
                    f"layout is pinned); found {version}")
        try:
            layout.self_check()
        except HostError as e:
            return str(e)
        return None

    def create_vcpu(self, index: int) -> EngineVcpu:
        from pyhv.arch.x86.cpuid import DEFAULT_MODEL
        from pyhv.engines.emu.vcpu import EmuVcpu
        v = EmuVcpu(self, index, model=self.model or DEFAULT_MODEL,
                    ns_per_block=self.ns_per_block, ns_per_io=self.ns_per_io)
        self.vcpus.append(v)
        return v

    # ------------------------------------------------------------------ memory

    def invalidate(self, gpa: int, size: int) -> None:
        """RAM at [gpa, gpa+size) was written behind the CPU's back (device DMA, loader):
        drop translated code so no stale translation runs. Call between `run()`s.

        unicorn invalidates by virtual address only, so this flushes every vCPU's whole
        translation cache: correct, and cheap enough for the rare DMA into code pages.
        """
        del gpa, size
        for v in self.vcpus:
            uc = getattr(v, "uc", None)
            if uc is not None:
                uc.ctl_flush_tb()

    def enable_dirty_tracking(self, enable: bool = True) -> None:
        """Software dirty log: remember a digest of every RAM page (guest + device writes).

        unicorn has no dirty log and a per-store hook would slow every guest store, so
        `dirty_pages()` compares page digests (BLAKE2b, 128 bits) with the last call.
        """
        self._digests = self._digest_all() if enable else None

    def dirty_pages(self) -> set[int]:
        if self._digests is None:
            raise HostError("dirty tracking is not enabled on this emu engine")
        new = self._digest_all()
        old = self._digests
        self._digests = new
        return {pfn for pfn, d in new.items() if old.get(pfn) != d}

    def _digest_all(self) -> dict[int, bytes]:
        out: dict[int, bytes] = {}
        for r in self.memory.regions:
            view = r.view
            base = r.gpa >> PAGE_SHIFT
            for i in range(r.size >> PAGE_SHIFT):
                page = view[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]
                out[base + i] = hashlib.blake2b(page, digest_size=16).digest()
        return out

    def close(self) -> None:
        for v in self.vcpus:
            v.close()
        self.vcpus = []
