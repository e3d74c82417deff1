/*
 * counter: a multiboot guest that counts forever, for the control API's tests
 * (tests/machine/test_vm_api.py): pause must stop the count, resume continue it with no
 * gap, and the ACPI power button end it.
 *
 * It enables the fixed-feature power button (PM1_EN.PWRBTN_EN, ACPI 4.8.3.1; pyhv's
 * PM1a event block is at 0x600, as the FADT says), then prints "count N\n" for
 * N = 1, 2, ... with a busy delay between lines. Before each line it polls PM1_STS: when
 * PWRBTN_STS is set it prints "power button\n" and powers off as an OSPM does, SLP_TYP =
 * 5 (the DSDT's \_S5) with SLP_EN into PM1a_CNT (0x604): pyhv then exits 0.
 */
#include "guest.h"
    .intel_syntax noprefix
    MULTIBOOT_HEADER

#define PM1_STS     0x600
#define PM1_EN      0x602
#define PM1_CNT     0x604
#define PWRBTN      0x100
#define DELAY       20000

    .text
    .code32
    .globl start
start:
    mov esp, offset stack_top
    mov dx, PM1_EN
    mov ax, PWRBTN
    out dx, ax
    xor ebx, ebx
next:
    mov dx, PM1_STS
    in ax, dx
    test ax, PWRBTN
    jnz power
    inc ebx
    mov esi, offset msg_count
    call puts
    mov eax, ebx
    call putdec
    mov al, '\n'
    call putc
    mov ecx, DELAY
1:  dec ecx
    jnz 1b
    jmp next
power:
    mov esi, offset msg_power
    call puts
    mov dx, PM1_CNT
    mov ax, (5 << 10) | (1 << 13)
    out dx, ax
    cli
    hlt

#include "serial32.inc"

    .section .rodata
msg_count: .asciz "count "
msg_power: .asciz "power button\n"

    .bss
    .align 16
    .skip 4096
stack_top:
