/*
 * smp_start: the assembly half of the smp guest (smp.c holds the rest): the multiboot
 * entry, the guest's own GDT, the AP start-up trampoline and the interrupt stubs.
 *
 * BSP: loads the GDT (code 0x08, data 0x10, flat 32-bit), reloads the segments, calls
 * smp_main() and ends through debug-exit with its return value (smp_main powers the
 * machine off through ACPI before that, so the debug-exit is only reached on failure).
 *
 * AP trampoline (ap_tramp .. ap_tramp_end, copied by smp.c to TRAMP = 0x8000, started by
 * SIPI vector 0x08, so in real mode at 0800:0000): loads the GDT through a GDTR copy
 * inside the trampoline (addressed relative to DS = 0x0800), sets CR0.PE and far-jumps
 * (66 ea: 32-bit offset) to ap_pm32. ap_pm32 takes an index with `lock xadd` on
 * ap_next, sets its stack ap_stacks + (index + 1) * 4 KiB and calls ap_main(index + 1).
 *
 * Interrupt stubs: isr_N pushes N and all registers and calls isr_dispatch(N), then
 * IRETs (32-bit interrupt gates, built by smp.c).
 */
#include "guest.h"
    .intel_syntax noprefix
    MULTIBOOT_HEADER

#define TRAMP 0x8000

    .text
    .code32
    .globl start
start:
    mov esp, offset stack_top
    lgdt [gdtr]
    ljmp 0x08, offset 1f
1:  mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov fs, ax
    mov gs, ax
    mov ss, ax
    cld
    push ebx                         /* the multiboot info: smp_main(info) */
    call smp_main
    out DEBUG_EXIT, al
    cli
2:  hlt
    jmp 2b

/* ---- the AP trampoline, position-independent in real mode (DS = CS = 0x0800) ---- */
    .globl ap_tramp, ap_tramp_end
    .code16
ap_tramp:
    cli
    mov ax, cs
    mov ds, ax
    lgdt [tramp_gdtr - ap_tramp]
    mov eax, cr0
    or eax, 1
    mov cr0, eax
    .byte 0x66, 0xea                 /* ljmp 0x08:ap_pm32 with a 32-bit offset */
    .long ap_pm32
    .word 0x08
    .align 8
tramp_gdtr:
    .word gdt_end - gdt - 1
    .long gdt
ap_tramp_end:

    .code32
ap_pm32:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov fs, ax
    mov gs, ax
    mov ss, ax
    mov eax, 1
    lock xadd [ap_next], eax         /* this AP's index, 0.. */
    mov esp, eax
    inc esp
    shl esp, 12
    add esp, offset ap_stacks
    inc eax
    push eax
    cld
    call ap_main
3:  cli
    hlt
    jmp 3b

/* ---- interrupt stubs ---- */
    .macro ISR vec
    .globl isr_\vec
isr_\vec:
    pushad
    push \vec
    call isr_dispatch
    add esp, 4
    popad
    iretd
    .endm

    ISR 0x02
    ISR 0x40
    ISR 0x41
    ISR 0x42
    ISR 0x43
    ISR 0x50
    ISR 0x60
    ISR 0x61
    ISR 0xff
    .globl isr_fault
isr_fault:
    push 0x7d
    call fault
1:  cli
    hlt
    jmp 1b

    .data
    .align 8
gdt:
    .quad 0
    .quad 0x00cf9a000000ffff         /* 0x08: code, flat 32-bit */
    .quad 0x00cf92000000ffff         /* 0x10: data, flat 32-bit */
gdt_end:
gdtr:
    .word gdt_end - gdt - 1
    .long gdt
    .globl ap_next
ap_next:
    .long 0

    .bss
    .align 4096
    .globl ap_stacks
ap_stacks:
    .skip 4096 * 16
    .skip 16384
stack_top:
