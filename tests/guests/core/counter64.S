/*
 * counter64: the counter in 64-bit long mode (ELF64: pyhv enters it in long mode on its
 * identity tables), for the cross-engine snapshot tests (tests/machine/
 * test_vmstate_engines.py): a guest every engine can run, emu, kvm and trap (trap runs
 * a 64-bit kernel deprivileged; its port I/O is trapped and emulated).
 *
 * It prints "count N\n" for N = 1, 2, ... with a busy delay between lines, forever.
 * The count lives in RBX and on the stack (putdec's pushes), so a restore that lost a
 * register or a page of RAM shows as a gap or a repeat in the output.
 */
#include "guest.h"
    .intel_syntax noprefix
    .code64
#define DELAY       2000

    .text
    .globl start
start:
    lea rsp, [rip + stack_top]
    xor ebx, ebx
next:
    inc rbx
    lea rsi, [rip + msg_count]
    call puts
    mov rax, rbx
    call putdec
    mov al, '\n'
    call putc
    mov ecx, DELAY
1:  dec ecx
    jnz 1b
    jmp next

#include "serial64.inc"

    .section .rodata
msg_count: .asciz "count "

    .bss
    .align 16
    .skip 4096
stack_top:
