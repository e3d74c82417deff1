/*
 * hello: the smallest multiboot v1 guest. Entered in 32-bit flat protected mode
 * (EAX = 0x2BADB002), it prints "Hello from pyhv" on COM1 and ends through the
 * debug-exit port with 0 (pyhv exits with status 1).
 */
#include "guest.h"
    .intel_syntax noprefix
    MULTIBOOT_HEADER

    .text
    .code32
    .globl start
start:
    mov esp, offset stack_top
    mov esi, offset msg
    call puts
    DEBUG_EXIT_WITH(0)

#include "serial32.inc"

    .section .rodata
msg: .asciz "Hello from pyhv\n"

    .bss
    .align 16
    .skip 4096
stack_top:
