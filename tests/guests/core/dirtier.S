/*
 * dirtier: a multiboot guest that dirties RAM fast and counts, for the live-migration
 * tests (tests/machine/test_migration_converge.py): auto-converge must slow it, the count
 * must go on with no gap across the move.
 *
 * Forever: write one dword into each of the 256 pages of a 1 MiB .bss buffer (the
 * sweep number, so every sweep changes every page), with a short busy delay between two
 * pages, then print "count N\n" (N = 1, 2, ... the sweeps done), as the counter guest.
 */
#include "guest.h"
    .intel_syntax noprefix
    MULTIBOOT_HEADER

#define PAGES   256
#define DELAY   200

    .text
    .code32
    .globl start
start:
    mov esp, offset stack_top
    xor ebx, ebx
sweep:
    inc ebx
    mov edi, offset buffer
    mov edx, PAGES
1:  mov [edi], ebx
    add edi, 4096
    mov ecx, DELAY
2:  dec ecx
    jnz 2b
    dec edx
    jnz 1b
    mov esi, offset msg_count
    call puts
    mov eax, ebx
    call putdec
    mov al, '\n'
    call putc
    jmp sweep

#include "serial32.inc"

    .section .rodata
msg_count: .asciz "count "

    .bss
    .align 4096
buffer:
    .skip PAGES * 4096
    .skip 4096
stack_top:
