"""Which engines run here (imported by the popek tests; a unique name, not `conftest`)."""

from __future__ import annotations

import pytest

from pyhv.popek.probe import engine_available

KVM_WHY = engine_available("kvm")
EMU_WHY = engine_available("emu")

needs_kvm = pytest.mark.skipif(KVM_WHY is not None,
                               reason=f"needs a usable /dev/kvm: {KVM_WHY}")
needs_emu = pytest.mark.skipif(EMU_WHY is not None,
                               reason=f"needs the emu engine (unicorn): {EMU_WHY}")
