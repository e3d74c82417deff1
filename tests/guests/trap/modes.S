/*
 * modes: the guest kernel of `pyhv bench modes` (src/pyhv/benchmodes.py), one source
 * built two ways through pvops.h: native (trap, bt, kvm, emu) and PV (-DPV, for
 * `--engine pv`). Its command line (multiboot info, RDI) chooses a loop and N:
 *
 *   "priv N"   N x { cli; sti; in al, 0x61; out 0x80, al }. PV build: cli/sti are
 *              pvops.h's stores to the shared page's VIF; IN/OUT stay (they trap)
 *   "pt N"     N x 32 page-table updates: the PD entries 0..31 of the loader's 1..2 GiB
 *              page directory, each remapped to a 2 MiB page (PA 0 or 2 MiB, alternating
 *              every iteration). Native build: a store to the entry and INVLPG of its
 *              address, 32 times. PV build: the 32 (entry, value) pairs written to a
 *              list and one batched MMU_UPDATE hypercall (docs/pv.md)
 *   "sys N"    N x { int 0x2f } to a handler that is one IRETQ: the kernel calls
 *              itself (what every engine but kvm runs; see docs/modes.md)
 *   "usys N"   N x { int 0x2e } from guest user mode (CPL 3) to a DPL 3 gate whose
 *              handler is one IRETQ: a real user/kernel system call round trip. The
 *              kernel loads its own GDT (user code/data, a TSS with RSP0), LTR, sets
 *              U/S on the mapping of its first 2 MiB and IRETQs to CPL 3; the user code
 *              returns to the kernel with int 0x2d
 *   "cpu N"    N x 1000 rounds of { imul; add; xor; dec; jnz }, bench.S's compute loop
 *
 * It prints "modes: <loop> <N> <result>" and ends through debug-exit with 0x25
 * (status 75). Anything else on the command line: "modes: bad command line", 0x7e.
 */
#include "guest.h"
#include "kernel64.h"
#include "pvops.h"
#include "loops.inc"
    .intel_syntax noprefix
    .code64

#define ALIAS 0x40000000          /* 1 GiB: PD 1 of the loader's identity tables */
#define BATCH 32

    .text
    .globl start
start:
    lea rsp, [rip + stack_top]
    mov r14, rdi
    call kinit
    PV_INIT
    test dword ptr [r14], MULTIBOOT_INFO_CMDLINE
    jz bad
    mov esi, dword ptr [r14 + 16]
    COUNT_ARG
    mov esi, dword ptr [r14 + 16]
    mov bx, [rsi]                 /* the loop's first two letters */
    cmp bx, 0x7270                /* "pr" */
    je priv
    cmp bx, 0x7470                /* "pt" */
    je pt
    cmp bl, 'c'
    je cpu
    cmp bx, 0x7375                /* "us" */
    je usys
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

/* pt: RBX = the PD of 1..2 GiB (CR3 -> PML4[0] -> PDPT[1], as pvmmu.S) */
pt:
    mov rax, cr3
    and rax, ~0xfff
    mov rax, [rax]
    and rax, ~0xfff
    mov rax, [rax + 8]
    and rax, ~0xfff
    mov rbx, rax
    mov r8, r12                   /* iterations left */
    xor r13d, r13d                /* PTEs written */
    test r8, r8
    jz 9f
1:  mov rax, r8
    and eax, 1
    shl rax, 21
    or rax, 0x83                  /* P, RW, PS: 2 MiB page at 0 or 2 MiB */
    xor ecx, ecx
#ifdef PV
    lea rdi, [rip + batch]
2:  lea rdx, [rbx + rcx * 8]
    mov [rdi], rdx                /* the entry's guest-physical address */
    mov [rdi + 8], rax            /* its new value */
    add rdi, 16
    inc ecx
    cmp ecx, BATCH
    jb 2b
    lea rdi, [rip + batch]
    mov qword ptr [rip + pv_shared + SH_ARG0], rdi
    mov qword ptr [rip + pv_shared + SH_ARG1], BATCH
    HYPERCALL(HC_MMU_UPDATE)
    add r13, [rip + pv_shared + SH_RET]
#else
    mov rdi, ALIAS
2:  mov [rbx + rcx * 8], rax
    invlpg [rdi]
    add rdi, 0x200000
    inc ecx
    cmp ecx, BATCH
    jb 2b
    add r13, BATCH
#endif
    dec r8
    jnz 1b
9:  lea rsi, [rip + msg_pt]
    jmp report

sys:
    lea rax, [rip + sys_handler]
    mov ecx, 0x2f
    call set_gate
    SYS_LOOP
    lea rsi, [rip + msg_sys]
    jmp report
sys_handler:
    iretq

usys:
    lgdt [rip + ugdtr]
    lea rax, [rip + tss]          /* the TSS descriptor's base */
    lea rdx, [rip + ugdt_tss]
    mov [rdx + 2], ax
    shr rax, 16
    mov [rdx + 4], al
    mov [rdx + 7], ah
    shr rax, 16
    mov [rdx + 8], eax
    lea rax, [rip + stack_top]
    mov [rip + tss + 4], rax      /* RSP0 */
    mov ax, 0x28
    ltr ax
    user_low_2mib
    lea rax, [rip + usys_handler]
    mov ecx, 0x2e
    call set_gate
    lea rax, [rip + usys_done]
    mov ecx, 0x2d
    call set_gate
    or byte ptr [rip + kidt + 0x2e * 16 + 5], 0x60   /* DPL 3 */
    or byte ptr [rip + kidt + 0x2d * 16 + 5], 0x60
    push 0x1b                     /* SS: user data, RPL 3 */
    lea rax, [rip + ustack_top]
    push rax
    push 0x2                      /* RFLAGS: IF 0 */
    push 0x23                     /* CS: user code, RPL 3 */
    lea rax, [rip + uloop]
    push rax
    iretq
uloop:
    mov rcx, r12
    test rcx, rcx
    jz 2f
1:  int 0x2e
    dec rcx
    jnz 1b
2:  int 0x2d
usys_handler:
    iretq
usys_done:
    lea rsp, [rip + stack_top]
    xor r13d, r13d
    lea rsi, [rip + msg_usys]
    jmp report

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

#ifdef PV
#include "pvserial64.inc"
#else
#include "serial64.inc"
#endif
#include "kernel64.inc"

    .section .rodata
msg_priv: .asciz "modes: priv "
msg_pt:   .asciz "modes: pt "
msg_cpu:  .asciz "modes: cpu "
msg_sys:  .asciz "modes: sys "
msg_usys: .asciz "modes: usys "
msg_bad:  .asciz "modes: bad command line\n"
    .data
    .align 16
batch: .skip 16 * BATCH
    .align 16
ugdt:
    .quad 0
    .quad 0x00af9a000000ffff      /* 0x08 kernel code64 */
    .quad 0x00cf92000000ffff      /* 0x10 kernel data */
    .quad 0x00cff2000000ffff      /* 0x18 user data, DPL 3 */
    .quad 0x00affa000000ffff      /* 0x20 user code64, DPL 3 */
ugdt_tss:
    .quad 0x0000890000000067      /* 0x28 64-bit TSS, limit 0x67, base filled in */
    .quad 0
ugdt_end:
ugdtr:
    .word ugdt_end - ugdt - 1
    .quad ugdt
    .align 16
tss: .skip 0x68
    .bss
    .align 16
    .skip 8192
stack_top:
    .skip 4096
ustack_top:
