/*
 * sensitive: a kernel that relies on the sensitive instructions x86 does not trap at
 * CPL 3 (Robin and Irvine, 2000). On a CPU where it really runs at CPL 0 (emu, kvm) it
 * prints what it set up; deprivileged under the trap engine the same instructions run
 * natively at CPL 3 and show the monitor's state or silently drop the change, and the
 * monitor never hears of it. Expected at CPL 0:
 *
 *   sensitive: own GDT and IDT loaded
 *   mov ax, cs: 0008 (RPL 0)
 *   sgdt: own GDT                       [trap, UMIP off: "monitor's GDT at <base>"]
 *   sidt: own IDT                       [trap, UMIP off: "monitor's IDT at <base>"]
 *   str: 0020                           (the TSS pyhv's loader gave it)
 *   smsw: 0031                          [trap, UMIP off: 0033, the monitor's CR0.MP]
 *   pushf after cli: IF=0 IOPL=0        [trap: IF=1, the real flag]
 *   popf restores IF=1, waiting for a timer tick with hlt
 *   woke on the timer
 *
 * and ends through debug-exit with 0x22 (status 69). Under the trap engine the last
 * POPF cannot set the virtual IF (POPF at CPL 3 ignores IF), so the HLT waits with
 * interrupts off forever: pyhv ends the run with status 0 ("halted with interrupts
 * off") right after the "waiting" line. With `--engine-opt umip=on` SGDT/SIDT/STR/SMSW
 * trap and the monitor emulates them, so those lines are right again; CS, PUSHF and
 * POPF stay wrong.
 */
#include "guest.h"
#include "kernel64.h"
    .intel_syntax noprefix
    .code64

    .text
    .globl start
start:
    lea rsp, [rip + stack_top]
    call kinit
    lea rsi, [rip + msg_hello]
    call puts

    /* CS's RPL: the CPL the code runs at */
    lea rsi, [rip + msg_cs]
    call puts
    xor eax, eax
    mov ax, cs
    call puthex16
    lea rsi, [rip + msg_rpl]
    call puts
    and eax, 3
    call putdec
    lea rsi, [rip + msg_close]
    call puts

    /* SGDT / SIDT: where the descriptor tables are */
    lea rsi, [rip + msg_sgdt]
    call puts
    sgdt [rip + dtr]
    lea rbx, [rip + kgdt]
    lea rsi, [rip + msg_own_gdt]
    lea rdi, [rip + msg_mon_gdt]
    call report_dtr
    lea rsi, [rip + msg_sidt]
    call puts
    sidt [rip + dtr]
    lea rbx, [rip + kidt]
    lea rsi, [rip + msg_own_idt]
    lea rdi, [rip + msg_mon_idt]
    call report_dtr

    /* STR and SMSW */
    lea rsi, [rip + msg_str]
    call puts
    xor eax, eax
    str ax
    call puthex16
    lea rsi, [rip + msg_smsw]
    call puts
    xor eax, eax
    smsw ax
    call puthex16
    mov al, '\n'
    call putc

    /* PUSHF shows IF and IOPL */
    cli
    lea rsi, [rip + msg_pushf]
    call puts
    pushfq
    pop rbx
    mov rax, rbx
    shr rax, 9
    and eax, 1
    call putdec
    lea rsi, [rip + msg_iopl]
    call puts
    mov rax, rbx
    shr rax, 12
    and eax, 3
    call putdec
    mov al, '\n'
    call putc

    /* PUSHF; CLI; POPF: the classic "save and restore the interrupt flag" */
    call pic_init
    call pit_init
    sti
    pushfq                        /* IF=1 saved */
    cli
    popfq                         /* restores IF=1 at CPL 0; ignored at CPL 3 */
    lea rsi, [rip + msg_popf]
    call puts
    hlt                           /* IF=1: the timer wakes it */
    cli
    mov al, 0xff
    out PIC1_DATA, al
    lea rsi, [rip + msg_woke]
    call puts
    DEBUG_EXIT_WITH(0x22)

/* report_dtr: dtr holds what SxDT stored; RBX = our table. Prints RSI's message if the
 * base is ours, else RDI's and the base. */
report_dtr:
    mov rax, [rip + dtr + 2]
    cmp rax, rbx
    jne 1f
    call puts
    ret
1:  mov rsi, rdi
    call puts
    call puthex
    mov al, '\n'
    call putc
    ret

#include "serial64.inc"
#include "kernel64.inc"

    .section .rodata
msg_hello:   .asciz "sensitive: own GDT and IDT loaded\n"
msg_cs:      .asciz "mov ax, cs: "
msg_rpl:     .asciz " (RPL "
msg_close:   .asciz ")\n"
msg_sgdt:    .asciz "sgdt: "
msg_own_gdt: .asciz "own GDT\n"
msg_mon_gdt: .asciz "monitor's GDT at "
msg_sidt:    .asciz "sidt: "
msg_own_idt: .asciz "own IDT\n"
msg_mon_idt: .asciz "monitor's IDT at "
msg_str:     .asciz "str: "
msg_smsw:    .asciz "\nsmsw: "
msg_pushf:   .asciz "pushf after cli: IF="
msg_iopl:    .asciz " IOPL="
msg_popf:    .asciz "popf restores IF=1, waiting for a timer tick with hlt\n"
msg_woke:    .asciz "woke on the timer\n"

    .data
    .align 16
dtr: .skip 16

    .bss
    .align 16
    .skip 8192
stack_top:
