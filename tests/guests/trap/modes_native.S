/*
 * modes_native: the compute loop of modes.S as a Linux user program, for the "native"
 * column of `pyhv bench modes`: `modes_native N` runs N x 1000 rounds of the same
 * { imul; add; xor; dec; jnz } and prints "modes: cpu <N> <result>" like the guest.
 * Only the compute loop can run natively in a process: CLI/STI, IN/OUT, page-table
 * stores and INVLPG, and a private IDT are privileged at CPL 3 (#GP).
 */
#include "loops.inc"
    .intel_syntax noprefix
    .text
    .globl main
main:
    push rbx
    push r12
    push r13
    mov rdi, [rsi + 8]            /* argv[1] */
    xor esi, esi
    mov edx, 10
    call strtoul@PLT
    mov r12, rax
    CPU_LOOP
    lea rdi, [rip + fmt]
    mov rsi, r12
    mov rdx, r13
    xor eax, eax
    call printf@PLT
    xor eax, eax
    pop r13
    pop r12
    pop rbx
    ret
    .section .rodata
fmt: .asciz "modes: cpu %lu %016lx\n"
    .section .note.GNU-stack,"",@progbits
