/*
 * bench: the guest kernel of bench/trap_bench.py. Its command line (multiboot info,
 * RDI) chooses a loop and its iteration count:
 *
 *   "priv N"   N x { cli; sti; in al, 0x61; out 0x80, al }: four privileged
 *              instructions, each a trap under the trap engine
 *   "flags N"  N x { cli; pushfq; sti; popfq }: the interrupt-flag half of a critical
 *              section, no device (two traps under trap, none under bt)
 *   "sys N"    N x { int 0x2f } to a handler that is one IRETQ: a kernel-mode system
 *              call round trip (two traps under trap, none under bt)
 *   "cpu N"    N x 1000 rounds of { imul; add; xor; dec; jnz }: no privileged
 *              instruction at all (native at CPL 3 under trap, emulated at CPL 0 by
 *              KVM-PVM under kvm, software under emu)
 *
 * It prints "bench: <loop> <N> <result>" and ends through debug-exit with 0x25
 * (status 75). Anything else on the command line: "bench: bad command line", 0x7e.
 */
#include "guest.h"
#include "pvops.h"
#include "loops.inc"
    .intel_syntax noprefix
    .code64
    .text
    .globl start
start:
    lea rsp, [rip + stack_top]
    test dword ptr [rdi], MULTIBOOT_INFO_CMDLINE
    jz bad
    mov esi, dword ptr [rdi + 16]
    mov bl, [rsi]                 /* 'p' or 'c' */
    COUNT_ARG
    cmp bl, 'p'
    je priv
    cmp bl, 'c'
    je cpu
    cmp bl, 'f'
    je flags
    cmp bl, 's'
    je sys
bad:
    lea rsi, [rip + msg_bad]
    call puts
    DEBUG_EXIT_WITH(0x7e)

priv:
    PRIV_LOOP
    lea rsi, [rip + msg_priv]
    jmp report

/* flags: the sensitive, non-I/O half of a kernel's critical sections */
flags:
    mov rcx, r12
    test rcx, rcx
    jz 2f
1:  cli
    pushfq
    sti
    popfq
    dec rcx
    jnz 1b
2:  xor r13d, r13d
    lea rsi, [rip + msg_flags]
    jmp report

/* sys: a kernel-mode system call round trip, INT n through its own IDT and IRETQ back
 * (the trap and bt engines run no guest user mode: the kernel calls itself) */
sys:
    call kinit
    lea rax, [rip + sys_handler]
    mov ecx, 0x2f
    call set_gate
    SYS_LOOP
    lea rsi, [rip + msg_sys]
    jmp report
sys_handler:
    iretq

cpu:
    CPU_LOOP
lea rsi, [rip + msg_cpu]

report:
    call puts
    mov rax, r12
    call putdec
    mov al, ' '
    call putc
    mov rax, r13
    call puthex
    mov al, '\n'
    call putc
    DEBUG_EXIT_WITH(0x25)

#include "serial64.inc"
#include "kernel64.inc"

    .section .rodata
msg_priv: .asciz "bench: priv "
msg_cpu:  .asciz "bench: cpu "
msg_flags: .asciz "bench: flags "
msg_sys:  .asciz "bench: sys "
msg_bad:  .asciz "bench: bad command line\n"
    .bss
    .align 16
    .skip 4096
stack_top:
