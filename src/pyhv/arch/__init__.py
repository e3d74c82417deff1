"""Architecture data: address map, descriptors, paging, CPU state. x86-64 only for now."""
