/*
 * pi_start: the multiboot entry of the pi guest (pi.c holds the rest). It sets up a
 * stack, calls pi_main(), and ends through debug-exit with pi_main's return value.
 */
#include "guest.h"
    .intel_syntax noprefix
    MULTIBOOT_HEADER

    .text
    .code32
    .globl start
start:
    mov esp, offset stack_top
    cld
    call pi_main
    out DEBUG_EXIT, al
    cli
1:  hlt
    jmp 1b

    .bss
    .align 16
    .skip 16384
stack_top:
