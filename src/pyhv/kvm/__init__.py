"""The KVM binding: the only code in pyhv that issues /dev/kvm ioctls.

`Kvm` (system handle) -> `Vm` (memory slots, dirty log) -> `Vcpu` (KVM_RUN with
typed exits from `pyhv.exits`, registers, MSRs, CPUID). It imports nothing from pyhv
except `errors` and the pure-data `exits`.
"""

from pyhv.kvm.system import Kvm
from pyhv.kvm.vcpu import Vcpu
from pyhv.kvm.vm import Vm

__all__ = ["Kvm", "Vcpu", "Vm"]
