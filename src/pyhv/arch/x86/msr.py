"""Model-specific register numbers pyhv knows by name (Intel SDM Vol. 4, AMD APM Vol. 2).

`STATE_MSRS` is the set an engine saves in `CpuState.msrs`: the MSRs a 64-bit kernel
programs and expects back after a snapshot or migration.
"""

from __future__ import annotations

TSC = 0x10
APIC_BASE = 0x1B
MTRRCAP = 0xFE
SYSENTER_CS = 0x174
SYSENTER_ESP = 0x175
SYSENTER_EIP = 0x176
MCG_CAP = 0x179
MCG_STATUS = 0x17A
MISC_ENABLE = 0x1A0
PAT = 0x277
MTRR_DEF_TYPE = 0x2FF
EFER = 0xC0000080
STAR = 0xC0000081
LSTAR = 0xC0000082
CSTAR = 0xC0000083
SFMASK = 0xC0000084
FS_BASE = 0xC0000100
GS_BASE = 0xC0000101
KERNEL_GS_BASE = 0xC0000102
TSC_AUX = 0xC0000103

# Saved in CpuState.msrs by every engine (FS/GS base live in the segment registers).
STATE_MSRS = (SYSENTER_CS, SYSENTER_ESP, SYSENTER_EIP, STAR, LSTAR, CSTAR, SFMASK,
              KERNEL_GS_BASE, TSC_AUX, PAT, TSC)

NAMES = {v: k for k, v in globals().items() if k.isupper() and isinstance(v, int)}
