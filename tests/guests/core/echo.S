/*
 * echo: a multiboot guest that answers on its serial console, for the host daemon's
 * console tests (tests/host): it prints "echo ready\n", then polls COM1's LSR.DR and
 * sends back every byte it receives, lower-case letters turned upper-case (so the
 * answer is the guest's, never a terminal's local echo). Like counter.S it enables the
 * ACPI power button and powers off through S5 when PWRBTN_STS is set.
 */
#include "guest.h"
    .intel_syntax noprefix
    MULTIBOOT_HEADER

#define PM1_STS     0x600
#define PM1_EN      0x602
#define PM1_CNT     0x604
#define PWRBTN      0x100
#define LSR_DR      0x01

    .text
    .code32
    .globl start
start:
    mov esp, offset stack_top
    mov dx, PM1_EN
    mov ax, PWRBTN
    out dx, ax
    mov esi, offset msg_ready
    call puts
poll:
    mov dx, PM1_STS
    in ax, dx
    test ax, PWRBTN
    jnz power
    mov dx, COM1_LSR
    in al, dx
    test al, LSR_DR
    jz poll
    mov dx, COM1
    in al, dx
    cmp al, 'a'
    jb 1f
    cmp al, 'z'
    ja 1f
    sub al, 'a' - 'A'
1:  call putc
    jmp poll
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
msg_ready: .asciz "echo ready\n"
msg_power: .asciz "power button\n"

    .bss
    .align 16
    .skip 4096
stack_top:
