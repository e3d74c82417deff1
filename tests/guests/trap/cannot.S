/*
 * cannot: an instruction the trap monitor does not emulate. String port output
 * (`rep outsb`) is privileged like OUT, but the trap engine only emulates the single
 * transfers; at CPL 0 (emu, kvm) the line below reaches the serial port, under trap
 * pyhv ends the run: "cannot emulate rep outsb ... (instruction bytes: f3 6e ...)",
 * status 4.
 *
 *   cannot: before
 *   printed with rep outsb
 *   cannot: after
 *
 * then debug-exit with 0x24 (status 73).
 */
#include "guest.h"
    .intel_syntax noprefix
    .code64
    .text
    .globl start
start:
    lea rsp, [rip + stack_top]
    lea rsi, [rip + msg_before]
    call puts
    lea rsi, [rip + line]
    mov ecx, line_end - line
    mov dx, COM1
    rep outsb
    lea rsi, [rip + msg_after]
    call puts
    DEBUG_EXIT_WITH(0x24)

#include "serial64.inc"

    .section .rodata
msg_before: .asciz "cannot: before\n"
msg_after:  .asciz "cannot: after\n"
line:       .ascii "printed with rep outsb\n"
line_end:
    .bss
    .align 16
    .skip 4096
stack_top:
