/*
 * exitcode: a multiboot guest that ends through debug-exit with the number given on
 * its command line as "exit=N" (0 <= N <= 255), so pyhv's exit status is (N << 1) | 1.
 * It reads the command line the multiboot way: EAX = 0x2BADB002, EBX -> information
 * structure, flags bit 2 -> cmdline pointer at +16 (Multiboot Specification 0.6.96,
 * 3.3). Output:
 *
 *   cmdline: <the command line>
 *   exit=N                          then debug-exit with N
 * or
 *   no exit=N on the command line   then HLT with interrupts off (status 0)
 *   bad boot magic                  (EAX was wrong)  then debug-exit with 0x7f
 */
#include "guest.h"
    .intel_syntax noprefix
    MULTIBOOT_HEADER

    .text
    .code32
    .globl start
start:
    mov esp, offset stack_top
    cmp eax, MULTIBOOT_BOOT_MAGIC
    je 1f
    mov esi, offset msg_magic
    call puts
    DEBUG_EXIT_WITH(0x7f)
1:  mov esi, offset msg_cmdline
    call puts
    test dword ptr [ebx], MULTIBOOT_INFO_CMDLINE
    jz no_exit
    mov edi, [ebx + 16]           /* the command line */
    mov esi, edi
    call puts
    mov al, '\n'
    call putc

    /* find "exit=" at the start of a word */
find:
    cmp byte ptr [edi], 0
    je no_exit
    cmp dword ptr [edi], 0x74697865   /* "exit" */
    jne next
    cmp byte ptr [edi + 4], '='
    jne next
    mov edx, [ebx + 16]
    cmp edi, edx
    je number
    cmp byte ptr [edi - 1], ' '
    je number
next:
    inc edi
    jmp find

number:
    add edi, 5
    xor eax, eax
    xor ecx, ecx
2:  mov cl, [edi]
    sub cl, '0'
    cmp cl, 9
    ja 3f
    imul eax, eax, 10
    add eax, ecx
    inc edi
    jmp 2b
3:  mov esi, offset msg_exit
    call puts
    call putdec
    push eax
    mov al, '\n'
    call putc
    pop eax
    out DEBUG_EXIT, al
    cli
    hlt

no_exit:
    mov esi, offset msg_none
    call puts
    cli
4:  hlt
    jmp 4b

#include "serial32.inc"

    .section .rodata
msg_magic:   .asciz "bad boot magic\n"
msg_cmdline: .asciz "cmdline: "
msg_exit:    .asciz "exit="
msg_none:    .asciz "no exit=N on the command line\n"

    .bss
    .align 16
    .skip 4096
stack_top:
