/*
 * pvmmu: the PV ABI's page-table and error paths (docs/pv.md), for `--engine pv` only
 * (built with -DPV: tests/trap/trapbuild.py, name "pvmmu-pv"). It remaps two 2 MiB
 * pages of the loader's tables with one batched MMU_UPDATE, reads its own data through
 * the new mapping, then makes bad requests, each refused with the ABI's error code:
 *
 *   pvmmu: 2 entries updated in one hypercall
 *   alias reads 5eed5eed5eed5eed
 *   entry outside RAM: ffea               (-EINVAL)
 *   list not mapped: fff2                 (-EFAULT)
 *   console write of 5000 bytes: ffea     (-EINVAL)
 *   hypercall 99: ffda                    (-ENOSYS)
 *
 * then debug-exit with 0x2a (status 85).
 */
#ifndef PV
#error pvmmu is a PV kernel: build it with -DPV
#endif
#include "guest.h"
#include "kernel64.h"
#include "pvops.h"
    .intel_syntax noprefix
    .code64

#define ALIAS 0x40000000          /* 1 GiB: PD 1 of the loader's identity tables */

    .text
    .globl start
start:
    lea rsp, [rip + stack_top]
    call kinit
    PV_INIT
    /* the loader's tables: CR3 -> PML4[0] -> PDPT[1] -> the PD of 1..2 GiB */
    mov rax, cr3
    and rax, ~0xfff
    mov rax, [rax]
    and rax, ~0xfff
    mov rax, [rax + 8]
    and rax, ~0xfff
    lea rcx, [rip + batch]
    mov [rcx], rax                /* PD[0]: VA 1 GiB -> PA 0 (2 MiB page) */
    mov qword ptr [rcx + 8], 0x83
    add rax, 8
    mov [rcx + 16], rax           /* PD[1]: VA 1 GiB + 2 MiB -> PA 0 as well */
    mov qword ptr [rcx + 24], 0x83
    mov qword ptr [rip + pv_shared + SH_ARG0], rcx
    mov qword ptr [rip + pv_shared + SH_ARG1], 2
    HYPERCALL(HC_MMU_UPDATE)
    mov rbx, [rip + pv_shared + SH_RET]   /* before puts' own hypercall overwrites it */
    lea rsi, [rip + msg_start]
    call puts
    mov rax, rbx
    call putdec
    lea rsi, [rip + msg_entries]
    call puts
    lea rbx, [rip + magic]
    mov rax, [rbx + ALIAS + 0x200000]
    call puthex
    mov al, '\n'
    call putc

    /* an entry outside guest RAM */
    lea rcx, [rip + batch]
    mov eax, 0xf0000000
    mov [rcx], rax
    mov qword ptr [rip + pv_shared + SH_ARG0], rcx
    mov qword ptr [rip + pv_shared + SH_ARG1], 1
    HYPERCALL(HC_MMU_UPDATE)
    lea rsi, [rip + msg_outside]
    call report
    /* a list the kernel cannot read */
    mov rax, 0xffffff8000000000
    mov qword ptr [rip + pv_shared + SH_ARG0], rax
    mov qword ptr [rip + pv_shared + SH_ARG1], 1
    HYPERCALL(HC_MMU_UPDATE)
    lea rsi, [rip + msg_unmapped]
    call report
    /* too long a console write */
    lea rax, [rip + magic]
    mov qword ptr [rip + pv_shared + SH_ARG0], rax
    mov qword ptr [rip + pv_shared + SH_ARG1], 5000
    HYPERCALL(HC_CONSOLE_WRITE)
    lea rsi, [rip + msg_long]
    call report
    /* no such hypercall */
    HYPERCALL(99)
    lea rsi, [rip + msg_nosys]
    call report
    DEBUG_EXIT_WITH(0x2a)

/* report: RSI's message, then RET's low 16 bits */
report:
    mov rax, [rip + pv_shared + SH_RET]
    push rax
    call puts
    pop rax
    call puthex16
    mov al, '\n'
    jmp putc

#include "pvserial64.inc"
#include "kernel64.inc"

    .section .rodata
msg_start:    .asciz "pvmmu: "
msg_entries:  .asciz " entries updated in one hypercall\nalias reads "
msg_outside:  .asciz "entry outside RAM: "
msg_unmapped: .asciz "list not mapped: "
msg_long:     .asciz "console write of 5000 bytes: "
msg_nosys:    .asciz "hypercall 99: "

    .data
    .align 16
magic: .quad 0x5eed5eed5eed5eed
batch: .skip 64

    .bss
    .align 16
    .skip 8192
stack_top:
