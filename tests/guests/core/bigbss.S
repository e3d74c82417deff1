/*
 * bigbss: a multiboot guest whose image needs 16 MiB of memory above its 1 MiB load
 * address (a zero-filled .bss), for the loader's "does not fit in --mem" check. When it
 * does fit, it checks that the end of its .bss reads as zero, prints "bigbss: ok\n" and
 * ends through debug-exit with 2 (status 5).
 */
#include "guest.h"
    .intel_syntax noprefix
    MULTIBOOT_HEADER

    .text
    .code32
    .globl start
start:
    mov esp, offset stack_top
    mov esi, offset msg_ok
    cmp dword ptr [big_end - 4], 0
    je 1f
    mov esi, offset msg_bad
1:  call puts
    DEBUG_EXIT_WITH(2)

#include "serial32.inc"

    .section .rodata
msg_ok:  .asciz "bigbss: ok\n"
msg_bad: .asciz "bigbss: .bss not zero\n"

    .bss
    .align 16
    .skip 4096
stack_top:
    .skip 16 << 20
big_end:
