/*
 * btirq: timer interrupts taken while the kernel computes, with no privileged
 * instruction in the loop. Under binary translation the loop runs as chained
 * translations that never call out, so an interrupt can only be taken when the timer
 * kicks the vCPU and it stands at the start of a translated guest instruction
 * (docs/bt.md, "Interrupts"). Expected at CPL 0:
 *
 *   btirq: computing with interrupts on
 *   ticks: 5, the loop ran
 *
 * then debug-exit with 0x28 (status 81).
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
    lea rsi, [rip + msg_start]
    call puts
    call pic_init
    call pit_init
    xor ecx, ecx
    sti
1:  inc rcx                        /* no call-out here: only chained translations */
    imul rax, rcx, 3
    call 3f                        /* and a RET: the inline lookup, where a kick often */
    cmp qword ptr [rip + ticks], 5 /* lands inside a rewritten sequence (deferred) */
    jb 1b
    cli
    mov al, 0xff
    out PIC1_DATA, al
    lea rsi, [rip + msg_ticks]
    call puts
    mov rax, [rip + ticks]
    call putdec
    lea rsi, [rip + msg_ran]
    call puts
    test rcx, rcx
    jz 2f
    DEBUG_EXIT_WITH(0x28)
2:  DEBUG_EXIT_WITH(0x29)
3:  ret

#include "serial64.inc"
#include "kernel64.inc"

    .section .rodata
msg_start: .asciz "btirq: computing with interrupts on\n"
msg_ticks: .asciz "ticks: "
msg_ran:   .asciz ", the loop ran\n"

    .bss
    .align 16
    .skip 8192
stack_top:
