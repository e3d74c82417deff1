/*
 * stuck: a multiboot guest that never ends by itself, for `pyhv run --timeout`.
 * It prints "stuck: <mode>\n" and then, by command line:
 *
 *   spin   (default)  loops forever with interrupts off (always busy)
 *   idle              "sti; hlt" forever with every interrupt source quiet: the vCPU
 *                     sleeps, and only the timeout can end the run
 */
#include "guest.h"
    .intel_syntax noprefix
    MULTIBOOT_HEADER

    .text
    .code32
    .globl start
start:
    mov esp, offset stack_top
    xor edi, edi
    test dword ptr [ebx], MULTIBOOT_INFO_CMDLINE
    jz spin
    mov edi, [ebx + 16]
    cmp dword ptr [edi], 0x656c6469   /* "idle" */
    je idle
spin:
    mov esi, offset msg_spin
    call puts
1:  jmp 1b
idle:
    mov esi, offset msg_idle
    call puts
2:  sti
    hlt
    jmp 2b

#include "serial32.inc"

    .section .rodata
msg_spin: .asciz "stuck: spin\n"
msg_idle: .asciz "stuck: idle\n"

    .bss
    .align 16
    .skip 4096
stack_top:
