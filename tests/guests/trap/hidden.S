/*
 * hidden: the monitor's memory is not part of the guest. The trap engine keeps its
 * tables, stubs and stack at 0xffffff8000000000 (the top 512 GiB of the address space,
 * supervisor-only). To the guest that range is simply not mapped, as in pyhv's boot
 * page tables (the first 4 GiB): reading, writing or jumping there is a #PF with the
 * error code of a not-present page and CR2 = the address, on every engine. The
 * kernel's #PF handler prints both and resumes after the access (R15).
 *
 *   hidden: touching 0xffffff8000000000
 *   #PF err=0000 cr2=ffffff8000000000      read
 *   #PF err=0002 cr2=ffffff8000000008      write
 *   #PF err=0000 cr2=ffffff8000000000      jump (instruction fetch, EFER.NXE off)
 *   #PF err=0002 cr2=ffffff8000030000      write to the monitor's stack top page
 *   hidden: 4 page faults, monitor intact
 *
 * Then debug-exit with 0x23 (status 71).
 */
#include "guest.h"
#include "kernel64.h"
    .intel_syntax noprefix
    .code64

#define MONITOR 0xffffff8000000000

    .text
    .globl start
start:
    lea rsp, [rip + stack_top]
    call kinit
    lea rax, [rip + pf_handler]
    mov ecx, 14
    call set_gate
    lea rsi, [rip + msg]
    call puts
    mov rax, MONITOR
    lea r15, [rip + 1f]
    mov rbx, [rax]
1:  lea r15, [rip + 1f]
    mov qword ptr [rax + 8], rbx
1:  lea r15, [rip + 1f]
    jmp rax
1:  mov rax, MONITOR + 0x30000
    lea r15, [rip + 1f]
    mov qword ptr [rax], 0
1:  lea rsi, [rip + msg_done]
    call puts
    mov rax, [rip + faults]
    call putdec
    lea rsi, [rip + msg_intact]
    call puts
    DEBUG_EXIT_WITH(0x23)

#include "serial64.inc"
#include "kernel64.inc"

    .section .rodata
msg:        .asciz "hidden: touching 0xffffff8000000000\n"
msg_done:   .asciz "hidden: "
msg_intact: .asciz " page faults, monitor intact\n"
    .bss
    .align 16
    .skip 8192
stack_top:
