"""pyhv: a hypervisor written in Python.

The package is layered (see README, "Architecture"):

    kvm, memory          know nothing else of pyhv
    loader, devices      know memory (and arch/x86 data helpers)
    engines              run guest code behind one interface; know no device
    machine, vcpu        compose memory + engine + devices; the run loop
    disk                 block images (raw, qcow2); stand-alone
    cli                  the `pyhv` command on top of everything
"""

__version__ = "0.1.0"
