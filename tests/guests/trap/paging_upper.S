/*
 * paging_upper: paging.S with its test mappings in the upper half at
 * HI = 0xffff888000000000 (PML4 slot 273, where Linux puts its direct map). Same output
 * as paging.S with 0000400000000000 read as ffff888000000000, on every engine: KVM-PVM
 * keeps only PML4 slot 256 of the upper half from CPL 3 code (tools/pvm_probe.py,
 * docs/pvm.md), so unlike paging_high (slot 256) this one runs on trap and bt too.
 */
#define HI 0xffff888000000000
#include "paging.S"
