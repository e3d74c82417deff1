/*
 * emu test guest: the boot path a loader-less kernel takes, all done by the guest.
 * A flat image entered in real mode at 0000:7c00 -> "R"; loads a GDT and sets CR0.PE,
 * far-jumps to 32-bit code -> "P"; builds identity page tables (2 MiB pages), sets
 * CR4.PAE, CR3, EFER.LME, CR0.PG, far-jumps to 64-bit code -> "L"; then exits.
 */
#include "pc.inc"
    .intel_syntax noprefix
    .text
    .globl start
    .code16
start:
    cli
    xor ax, ax
    mov ds, ax
    outc 'R'
    lgdt [gdtr]
    mov eax, cr0
    or eax, 1
    mov cr0, eax
    .byte 0x66, 0xea              /* ljmpl 0x08:pm32 */
    .long pm32
    .word 0x08

    .code32
pm32:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov esp, 0x80000
    outc 'P'
    /* page tables at 0x20000: PML4 -> PDPT -> PD (4 x 2 MiB) */
    mov edi, 0x20000
    mov ecx, 3 * 4096 / 4
    xor eax, eax
    rep stosd
    mov dword ptr [0x20000], 0x21000 | 3
    mov dword ptr [0x21000], 0x22000 | 3
    mov dword ptr [0x22000], 0x000000 | 0x83
    mov dword ptr [0x22008], 0x200000 | 0x83
    mov eax, cr4
    or eax, 1 << 5
    mov cr4, eax
    mov eax, 0x20000
    mov cr3, eax
    mov ecx, 0xc0000080
    rdmsr
    or eax, 1 << 8
    wrmsr
    mov eax, cr0
    or eax, 1 << 31
    mov cr0, eax
    ljmp 0x18, offset lm64

    .code64
lm64:
    mov ax, 0x10
    mov ds, ax
    outc 'L'
    mov rax, 0x123456789
    shr rax, 32
    add al, '0'
    putc_al
    mov al, 0
    exit_al
    jmp .

    .balign 8
gdt:
    .quad 0
    .quad 0x00cf9a000000ffff      /* 0x08 code 32 */
    .quad 0x00cf92000000ffff      /* 0x10 data */
    .quad 0x00af9a000000ffff      /* 0x18 code 64 */
gdt_end:
gdtr:
    .word gdt_end - gdt - 1
    .long gdt
