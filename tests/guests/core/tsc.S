/*
 * tsc: a multiboot guest that prints its TSC forever, for the snapshot tests of the
 * TSC (tests/machine/test_vmstate_tsc.py): after a restore the values must go on
 * rising from where they were, neither going back nor leaping.
 *
 * It first writes IA32_TSC = 1 << 48 (so the TSC has an offset from the engine's
 * own count, which a restore must keep). Each line is "tsc HHHHHHHHLLLLLLLL\n" (RDTSC's EDX:EAX in hex), with a busy delay
 * between lines.
 */
#include "guest.h"
    .intel_syntax noprefix
    MULTIBOOT_HEADER

#define DELAY       20000

    .text
    .code32
    .globl start
start:
    mov esp, offset stack_top
    mov ecx, 0x10               /* IA32_TSC = 1 << 48: an offset the state must carry */
    mov edx, 0x10000
    xor eax, eax
    wrmsr
next:
    rdtsc
    mov ebx, eax
    mov edi, edx
    mov esi, offset msg_tsc
    call puts
    mov eax, edi
    call puthex
    mov eax, ebx
    call puthex
    mov al, '\n'
    call putc
    mov ecx, DELAY
1:  dec ecx
    jnz 1b
    jmp next

#include "serial32.inc"

    .section .rodata
msg_tsc: .asciz "tsc "

    .bss
    .align 16
    .skip 4096
stack_top:
