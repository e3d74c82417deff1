/*
 * badgdt: bad input in the virtual GDT. The kernel loads a GDT whose entries are all
 * zero (LGDT takes any base and limit), then reloads CS from it with RETFQ: the CPU
 * checks the descriptor at that moment, finds a null (system, type 0) descriptor and
 * raises #GP(0x08); the IDT is still the loader's empty one (limit 0), so #GP cannot be
 * delivered (#DF), nor can #DF: a triple fault, which pyhv reports with status 4. The
 * trap engine must reach the same end by checking the guest's descriptors itself.
 *
 *   badgdt: loading a GDT of zeros
 */
#include "guest.h"
    .intel_syntax noprefix
    .code64
    .text
    .globl start
start:
    lea rsp, [rip + stack_top]
    lea rsi, [rip + msg]
    call puts
    lgdt [rip + zgdtr]
    lea rax, [rip + 1f]
    push 0x08
    push rax
    retfq
1:  lea rsi, [rip + msg_bad]      /* never reached */
    call puts
    DEBUG_EXIT_WITH(0x7e)

#include "serial64.inc"

    .section .rodata
msg:     .asciz "badgdt: loading a GDT of zeros\n"
msg_bad: .asciz "badgdt: RETFQ through a null descriptor worked\n"
    .data
    .align 16
zgdtr:
    .word 0x1f
    .quad zgdt
    .bss
    .align 16
zgdt: .skip 32
    .skip 4096
stack_top:
