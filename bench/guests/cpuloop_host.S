/*
 * cpuloop_host: the host-side twin of user64.S -DCPU: runs cpuloop.inc natively as a
 * static Linux x86-64 program (no libc) with ITERS iterations and prints the same line,
 * "cpuloop iters=<hex> cycles=<hex> sum=<hex>\n", on stdout.
 * Build: gcc -nostdlib -static -DITERS=N cpuloop_host.S -o cpuloop_host
 */
    .intel_syntax noprefix
    .text
    .globl _start
_start:
    mov rdi, ITERS
    call cpuloop
    mov r12, rax
    mov r13, rdx
    lea rdi, [rip + buf]
    lea rsi, [rip + msg_iters]
    call cat
    mov rax, ITERS
    call hex
    lea rsi, [rip + msg_cycles]
    call cat
    mov rax, r12
    call hex
    lea rsi, [rip + msg_sum]
    call cat
    mov rax, r13
    call hex
    mov byte ptr [rdi], '\n'
    inc rdi
    lea rsi, [rip + buf]
    mov rdx, rdi
    sub rdx, rsi
    mov edi, 1
    mov eax, 1                    /* write(1, buf, len) */
    syscall
    xor edi, edi
    mov eax, 60                   /* exit(0) */
    syscall

#include "cpuloop.inc"

cat:                              /* copy the string at RSI to RDI, advance RDI */
1:  mov al, [rsi]
    test al, al
    jz 2f
    mov [rdi], al
    inc rsi
    inc rdi
    jmp 1b
2:  ret
hex:                              /* RAX as 16 hex digits at RDI, advance RDI */
    mov rdx, rax
    mov ecx, 16
1:  rol rdx, 4
    mov al, dl
    and al, 0xf
    add al, '0'
    cmp al, '9'
    jbe 2f
    add al, 'a' - '0' - 10
2:  mov [rdi], al
    inc rdi
    dec ecx
    jnz 1b
    ret

    .section .rodata
msg_iters:  .asciz "cpuloop iters="
msg_cycles: .asciz " cycles="
msg_sum:    .asciz " sum="
    .bss
buf: .skip 128
    .section .note.GNU-stack, "", @progbits
