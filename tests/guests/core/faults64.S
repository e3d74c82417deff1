/*
 * faults64: exceptions handled by the guest in 64-bit long mode (ELF64; pyhv's boot
 * GDT, identity paging of the first 4 GiB only). It installs an IDT whose #UD, #GP and
 * #PF gates lead to one handler that prints the vector, the error code, CR2 for #PF,
 * and whether the saved RIP is the faulting instruction (faults report the address of
 * the instruction, SDM Vol. 3A 6.5), then resumes after it by rewriting the saved RIP
 * and returning with IRETQ. Before each fault R14 = the faulting instruction and
 * R15 = where to resume.
 *
 *   #UD err=0000 rip ok                        ud2
 *   #GP err=0000 rip ok                        load through a non-canonical address
 *   #GP err=1230 rip ok                        mov ds, 0x1230 (beyond the GDT limit)
 *   #PF err=0000 cr2=0000000140000000 rip ok   read, not present (5 GiB is unmapped)
 *   #PF err=0002 cr2=0000000140000008 rip ok   write, not present
 *   #PF err=0000 cr2=0000000140000000 rip ok   instruction fetch (EFER.NXE is off)
 *   faults64: 6 faults handled
 *
 * Then debug-exit with 0x15 (status 43). Any other exception is reported by
 * unexpected64.inc (status 251).
 */
#include "guest.h"
    .intel_syntax noprefix
    .code64

#define UNMAPPED 0x140000000          /* above the 4 GiB identity map */

    .text
    .globl start
start:
    lea rsp, [rip + stack_top]

    /* IDT: 32 interrupt gates on the current CS; #UD, #GP, #PF get their stubs */
    xor ecx, ecx
1:  lea rax, [rip + unexpected_stubs]
    mov rdx, rcx
    shl rdx, 4
    add rax, rdx
    cmp ecx, 6
    jne 2f
    lea rax, [rip + ud_stub]
2:  cmp ecx, 13
    jne 2f
    lea rax, [rip + gp_stub]
2:  cmp ecx, 14
    jne 2f
    lea rax, [rip + pf_stub]
2:  call set_gate
    inc ecx
    cmp ecx, 32
    jb 1b
    lidt [rip + idtr]

    /* #UD */
    lea r14, [rip + 1f]
    lea r15, [rip + 2f]
1:  ud2
2:
    /* #GP(0): a non-canonical address */
    mov rax, 0x8000000000000000
    lea r14, [rip + 1f]
    lea r15, [rip + 2f]
1:  mov rbx, [rax]
2:
    /* #GP(0x1230): a selector beyond the GDT limit */
    mov ax, 0x1230
    lea r14, [rip + 1f]
    lea r15, [rip + 2f]
1:  mov ds, ax
2:
    /* #PF: read, write, then fetch from an address the page tables do not map */
    mov rax, UNMAPPED
    lea r14, [rip + 1f]
    lea r15, [rip + 2f]
1:  mov rbx, [rax]
2:  lea r14, [rip + 1f]
    lea r15, [rip + 2f]
1:  mov qword ptr [rax + 8], rbx
2:  mov r14, rax
    lea r15, [rip + 2f]
    jmp rax
2:
    lea rsi, [rip + msg_done]
    call puts
    mov rax, [rip + handled]
    call putdec
    lea rsi, [rip + msg_handled]
    call puts
    DEBUG_EXIT_WITH(0x15)

/* set_gate: IDT entry ECX -> handler RAX (64-bit interrupt gate, DPL 0, current CS) */
set_gate:
    push rbx
    push rdx
    lea rbx, [rip + idt]
    mov rdx, rcx
    shl rdx, 4
    add rbx, rdx
    mov word ptr [rbx], ax        /* offset 15:0 */
    mov dx, cs
    mov word ptr [rbx + 2], dx    /* selector */
    mov word ptr [rbx + 4], 0x8e00    /* IST 0, P=1, DPL=0, type 0xE */
    mov rdx, rax
    shr rdx, 16
    mov word ptr [rbx + 6], dx    /* offset 31:16 */
    shr rdx, 16
    mov dword ptr [rbx + 8], edx  /* offset 63:32 */
    mov dword ptr [rbx + 12], 0
    pop rdx
    pop rbx
    ret

/* ------------------------------------------------------------------ handlers */
ud_stub:
    push 0                        /* #UD pushes no error code: keep one frame layout */
    push 6
    jmp common
gp_stub:
    push 13
    jmp common
pf_stub:
    push 14
    jmp common

/* frame: [rsp] vector, +8 error code, +16 RIP, +24 CS, +32 RFLAGS, +40 RSP, +48 SS */
common:
    push rax
    push rsi
    /* now: +16 vector, +24 error code, +32 RIP */
    mov rax, [rsp + 16]
    lea rsi, [rip + name_ud]
    cmp rax, 6
    je 1f
    lea rsi, [rip + name_gp]
    cmp rax, 13
    je 1f
    lea rsi, [rip + name_pf]
1:  call puts
    lea rsi, [rip + msg_err]
    call puts
    mov rax, [rsp + 24]
    call puthex16
    cmp qword ptr [rsp + 16], 14
    jne 2f
    lea rsi, [rip + msg_cr2]
    call puts
    mov rax, cr2
    call puthex
2:  lea rsi, [rip + msg_rip_ok]
    cmp [rsp + 32], r14
    je 3f
    lea rsi, [rip + msg_rip_bad]
3:  call puts
    mov [rsp + 32], r15           /* resume after the faulting instruction */
    inc qword ptr [rip + handled]
    pop rsi
    pop rax
    add rsp, 16                   /* vector and error code */
    iretq

#include "unexpected64.inc"
#include "serial64.inc"

    .section .rodata
name_ud:        .asciz "#UD"
name_gp:        .asciz "#GP"
name_pf:        .asciz "#PF"
msg_err:        .asciz " err="
msg_cr2:        .asciz " cr2="
msg_rip_ok:     .asciz " rip ok\n"
msg_rip_bad:    .asciz " rip BAD\n"
msg_done:       .asciz "faults64: "
msg_handled:    .asciz " faults handled\n"

    .data
    .align 16
idtr:
    .word 32 * 16 - 1
    .quad idt
handled: .quad 0

    .bss
    .align 16
idt: .skip 32 * 16
    .align 16
    .skip 8192
stack_top:
