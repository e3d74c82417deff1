/*
 * paging_high: paging.S with its test mappings in the upper half of the address space,
 * at HI = 0xffff800000000000 (PML4 slot 256), where 64-bit kernels map themselves.
 * Same output as paging.S with 0000400000000000 read as ffff800000000000. Right on emu
 * and kvm; on the trap engine under KVM-PVM the real CPU never lets CPL 3 code reach the
 * upper half (PVM keeps it for the host kernel), so the shadow entry cannot take effect
 * and the run ends with "cannot emulate" (docs/trap.md).
 */
#define HI 0xffff800000000000
#include "paging.S"
