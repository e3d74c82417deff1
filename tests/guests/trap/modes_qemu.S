/*
 * modes_qemu: modes.S (native build) behind a 32-bit multiboot start-up shim, so that
 * QEMU's -kernel (which loads multiboot ELF32 only, never a long-mode ELF64) can run the
 * same loops. The shim does what pyhv's loader does for an ELF64 kernel: identity page
 * tables for the low 4 GiB (2 MiB pages: PML4[0] -> PDPT[0..3] -> four PDs, so modes.S's
 * pt loop finds the 1..2 GiB directory at CR3 -> PML4[0] -> PDPT[1] as under pyhv),
 * PAE, EFER.LME, paging, a 64-bit code segment, and RDI = the multiboot info; it also
 * masks the 8259s and drops the kernel's path that QEMU puts before the -append text. Linked
 * as ELF64 with this entry, then converted with `objcopy -O elf32-i386`.
 */
#include "guest.h"
    .intel_syntax noprefix
    MULTIBOOT_HEADER
    .text
    .code32
    .globl qemu_start
qemu_start:
    mov esi, ebx                  /* multiboot info */
    mov al, 0xff                  /* mask both 8259s: QEMU's BIOS left the PIT's IRQ 0 */
    out 0x21, al                  /* on at vector 8, which the loops' STI would take */
    out 0xa1, al                  /* (pyhv's loader hands over a quiet machine) */
    test dword ptr [esi], MULTIBOOT_INFO_CMDLINE
    jz 4f
    mov edx, [esi + 16]           /* QEMU's command line is "<kernel path> <append>": */
3:  mov al, [edx]                 /* drop the path (no spaces in it) */
    test al, al
    jz 4f
    inc edx
    cmp al, ' '
    jne 3b
    mov [esi + 16], edx
4:
    lea edi, [shim_tables]
    mov ecx, 6 * 4096 / 4
    xor eax, eax
    rep stosd
    lea edi, [shim_tables]
    lea eax, [edi + 0x1000 + 3]
    mov [edi], eax                /* PML4[0] -> PDPT */
    xor ecx, ecx
1:  mov eax, ecx                  /* PDPT[i] -> PD i */
    shl eax, 12
    lea eax, [edi + eax + 0x2000 + 3]
    mov [edi + 0x1000 + ecx * 8], eax
    inc ecx
    cmp ecx, 4
    jb 1b
    xor ecx, ecx                  /* PD entries 0..2047: 2 MiB pages, identity */
2:  mov eax, ecx
    shl eax, 21
    or eax, 0x83
    mov [edi + 0x2000 + ecx * 8], eax
    inc ecx
    cmp ecx, 2048
    jb 2b
    mov cr3, edi
    mov eax, cr4
    or eax, 1 << 5                /* PAE */
    mov cr4, eax
    mov ecx, 0xc0000080
    rdmsr
    or eax, 1 << 8                /* EFER.LME */
    wrmsr
    mov eax, cr0
    or eax, (1 << 31) | 1         /* PG, PE */
    mov cr0, eax
    lgdt [shim_gdtr]
    ljmp 0x08, offset shim64
    .code64
shim64:
    mov edi, esi
    jmp start

    .align 8
shim_gdt:
    .quad 0
    .quad 0x00af9a000000ffff      /* 0x08: 64-bit code */
shim_gdtr:
    .word 15
    .long shim_gdt

    .bss
    .align 4096
shim_tables: .skip 6 * 4096

#include "modes.S"
