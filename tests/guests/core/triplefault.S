/*
 * triplefault: a multiboot guest that loads an empty IDT (limit 0) and then raises an
 * exception. With no gate for it the CPU raises #GP, then #DF, and a fault while
 * delivering #DF is a triple fault: the CPU shuts down (SDM Vol. 3A 6.15, "Interrupt
 * 8 -- Double Fault Exception"). pyhv must end the run with status 4 and a report.
 * The command line picks the first exception:
 *
 *   ud2     (default)  #UD
 *   int3               #BP from the INT3 instruction
 *   gp                 #GP from loading DS with a selector beyond the GDT
 *
 * Output: "faulting with <name>\n", then nothing (a line after it means the fault
 * did not happen).
 */
#include "guest.h"
    .intel_syntax noprefix
    MULTIBOOT_HEADER

    .text
    .code32
    .globl start
start:
    mov esp, offset stack_top
    xor edi, edi                  /* command line, or none */
    test dword ptr [ebx], MULTIBOOT_INFO_CMDLINE
    jz 1f
    mov edi, [ebx + 16]
1:  lidt [idtr]
    mov esi, offset msg_faulting
    call puts
    test edi, edi
    jz do_ud2
    cmp dword ptr [edi], 0x33746e69   /* "int3" */
    je do_int3
    cmp word ptr [edi], 0x7067        /* "gp" */
    je do_gp

do_ud2:
    mov esi, offset name_ud2
    call puts
    ud2
    jmp survived
do_int3:
    mov esi, offset name_int3
    call puts
    int3
    jmp survived
do_gp:
    mov esi, offset name_gp
    call puts
    mov ax, 0x1230
    mov ds, ax
survived:
    mov esi, offset msg_survived
    call puts
    DEBUG_EXIT_WITH(0x7e)

#include "serial32.inc"

    .section .rodata
    .align 4
idtr:
    .word 0                       /* limit 0: not even vector 0 fits */
    .long 0
msg_faulting: .asciz "faulting with "
name_ud2:     .asciz "ud2\n"
name_int3:    .asciz "int3\n"
name_gp:      .asciz "gp\n"
msg_survived: .asciz "survived the fault?\n"

    .bss
    .align 16
    .skip 4096
stack_top:
