/*
 * long64: an ELF64 image that pyhv enters directly in 64-bit long mode (loader/elf64.py:
 * identity paging of the first 4 GiB with 2 MiB pages, the boot GDT's 64-bit code
 * segment, interrupts off, RDI = a multiboot-format information structure).
 * It prints what it finds, then ends through debug-exit with 0x20 (status 65):
 *
 *   Hello from long mode
 *   CS=0010 CR0.PG=1 CR4.PAE=1 EFER.LMA=1
 *   64-bit: 0000123456789000
 *   write at 4 MiB: ok
 *   cmdline: <the --append string>
 */
#include "guest.h"
    .intel_syntax noprefix
    .code64
    .text
    .globl start
start:
    mov r12, rdi                  /* the boot information structure */
    lea rsp, [rip + stack_top]
    lea rsi, [rip + msg_hello]
    call puts
    lea rsi, [rip + msg_cs]
    call puts
    mov ax, cs
    call puthex16
    lea rsi, [rip + msg_pg]
    call puts
    mov rax, cr0
    shr rax, 31                   /* CR0.PG */
    and eax, 1
    call putdec
    lea rsi, [rip + msg_pae]
    call puts
    mov rax, cr4
    shr rax, 5                    /* CR4.PAE */
    and eax, 1
    call putdec
    lea rsi, [rip + msg_lma]
    call puts
    mov ecx, 0xc0000080           /* IA32_EFER */
    rdmsr
    shr eax, 10                   /* EFER.LMA */
    and eax, 1
    call putdec
    mov al, '\n'
    call putc

    /* 64-bit arithmetic: a product that needs more than 32 bits */
    lea rsi, [rip + msg_64]
    call puts
    mov rax, 0x123456789
    mov rbx, 0x1000
    imul rax, rbx
    call puthex
    mov al, '\n'
    call putc

    /* A 64-bit store and load through the identity map, in the second 2 MiB page
     * (the image itself lies in the first). */
    lea rsi, [rip + msg_hi]
    call puts
    mov rbx, 0x00000000003ff000
    mov rax, 0x0123456789abcdef
    mov [rbx], rax
    cmp [rbx], rax
    jne 1f
    lea rsi, [rip + msg_ok]
    jmp 2f
1:  lea rsi, [rip + msg_bad]
2:  call puts

    /* The command line, from the information structure (multiboot layout). */
    lea rsi, [rip + msg_cmdline]
    call puts
    test dword ptr [r12], MULTIBOOT_INFO_CMDLINE
    jz 3f
    mov esi, dword ptr [r12 + 16]
    call puts
3:  mov al, '\n'
    call putc
    DEBUG_EXIT_WITH(0x20)

#include "serial64.inc"

    .section .rodata
msg_hello:   .asciz "Hello from long mode\n"
msg_cs:      .asciz "CS="
msg_pg:      .asciz " CR0.PG="
msg_pae:     .asciz " CR4.PAE="
msg_lma:     .asciz " EFER.LMA="
msg_64:      .asciz "64-bit: "
msg_hi:      .asciz "write at 4 MiB: "
msg_ok:      .asciz "ok\n"
msg_bad:     .asciz "BAD\n"
msg_cmdline: .asciz "cmdline: "

    .bss
    .align 16
    .skip 4096
stack_top:
