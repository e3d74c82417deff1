/*
 * badidt: bad input in the virtual IDT. The kernel loads its own GDT, then an IDT
 * whose bytes are all 0xaa: no entry is a gate (type 0xa with S=0 is not an interrupt or
 * trap gate). ud2 raises #UD; its gate is invalid (#GP), so is #GP's (#DF), so is
 * #DF's: a triple fault, status 4, on every engine.
 *
 *   badidt: loading an IDT of 0xaa bytes
 */
#include "guest.h"
#include "kernel64.h"
    .intel_syntax noprefix
    .code64
    .text
    .globl start
start:
    lea rsp, [rip + stack_top]
    call kinit
    lea rsi, [rip + msg]
    call puts
    lea rdi, [rip + junk]
    mov ecx, 4096
    mov al, 0xaa
    rep stosb
    lidt [rip + jidtr]
    ud2
    lea rsi, [rip + msg_bad]      /* never reached */
    call puts
    DEBUG_EXIT_WITH(0x7e)

#include "serial64.inc"
#include "kernel64.inc"

    .section .rodata
msg:     .asciz "badidt: loading an IDT of 0xaa bytes\n"
msg_bad: .asciz "badidt: ud2 returned\n"
    .data
    .align 16
jidtr:
    .word 0xfff
    .quad junk
    .bss
    .align 4096
junk: .skip 4096
    .skip 8192
stack_top:
