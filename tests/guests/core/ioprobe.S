/*
 * ioprobe: a multiboot guest that touches an I/O port no device claims (0x2f0). pyhv
 * reads unclaimed ports as all ones and ignores writes, so it prints
 *
 *   port 0x2f0 reads 000000ff
 *   port 0x2f0 written
 *
 * and ends through debug-exit with 1 (status 3); under `--strict-io` the read itself
 * ends the run (status 4) and nothing after the first line's label is printed.
 */
#include "guest.h"
    .intel_syntax noprefix
    MULTIBOOT_HEADER

#define UNCLAIMED_PORT 0x2f0

    .text
    .code32
    .globl start
start:
    mov esp, offset stack_top
    mov esi, offset msg_read
    call puts
    mov dx, UNCLAIMED_PORT
    in al, dx
    movzx eax, al
    call puthex
    mov esi, offset msg_written
    mov al, 0x5a
    out dx, al
    call puts
    DEBUG_EXIT_WITH(1)

#include "serial32.inc"

    .section .rodata
msg_read:    .asciz "port 0x2f0 reads "
msg_written: .asciz "\nport 0x2f0 written\n"

    .bss
    .align 16
    .skip 4096
stack_top:
