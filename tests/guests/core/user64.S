/*
 * user64: user mode (CPL 3) and the two ways back to CPL 0, in 64-bit long mode (ELF64).
 * The guest sets up its own machine: page tables with U/S set (the first 1 GiB,
 * 2 MiB pages), a GDT with kernel and user segments laid out for SYSCALL/SYSRET, a
 * 64-bit TSS whose RSP0 is a separate kernel stack, an IDT with a DPL 3 gate for
 * int 0x80, and the SYSCALL MSRs (EFER.SCE, STAR, LSTAR, SFMASK). Then:
 *
 *   1. IRETQ to a DPL 3 code segment (CPL 3, IF=0);
 *   2. user code sums 1..1000 and SYSCALLs with RAX=1, RDI=the sum: the kernel checks
 *      it runs at CPL 0 with RCX = the user return address, prints, SYSRETQs;
 *   3. user code executes int 0x80: the gate is taken from CPL 3, so the CPU switches
 *      to TSS.RSP0; the handler checks the saved CS (RPL 3) and its stack, IRETQs;
 *   4. user code SYSCALLs with RAX=60: the kernel prints and ends through debug-exit
 *      with 0x17 (status 47).
 *
 *   user64: entering CPL 3 with iretq
 *   syscall 1 from CPL 3: sum=500500, CS=0008, rcx ok
 *   int 0x80 from CPL 3 on the TSS.RSP0 stack
 *   syscall 60 from CPL 3: exit
 *
 * GDT (STAR[47:32] = 0x08: SYSCALL loads CS 0x08, SS 0x10; STAR[63:48] = 0x10: SYSRETQ
 * loads SS 0x18|3, CS 0x20|3; SDM Vol. 3A 5.8.8):
 *   0x08 kernel code 64   0x10 kernel data   0x18 user data   0x20 user code 64
 *   0x28 TSS (16 bytes)
 * Any exception is reported by unexpected64.inc (status 251).
 */
#include "guest.h"
    .intel_syntax noprefix
    .code64

#define KERNEL_CS   0x08
#define KERNEL_DS   0x10
#define USER_DS     (0x18 | 3)
#define USER_CS     (0x20 | 3)
#define TSS_SEL     0x28
#define MSR_EFER    0xc0000080
#define MSR_STAR    0xc0000081
#define MSR_LSTAR   0xc0000082
#define MSR_SFMASK  0xc0000084

    .text
    .globl start
start:
    lea rsp, [rip + kstack_top]

    /* page tables: PML4[0] -> PDPT[0] -> PD of 512 2 MiB pages, all P|RW|US */
    lea rdi, [rip + pd]
    mov eax, 0x87                 /* P | RW | US | PS */
    xor ecx, ecx
1:  mov [rdi + rcx*8], rax
    add rax, 0x200000
    inc ecx
    cmp ecx, 512
    jb 1b
    lea rax, [rip + pd]
    or rax, 0x7
    mov [rip + pdpt], rax
    lea rax, [rip + pdpt]
    or rax, 0x7
    mov [rip + pml4], rax
    lea rax, [rip + pml4]
    mov cr3, rax

    /* TSS descriptor: base = tss, limit 0x67, type 9 (available 64-bit TSS), present */
    lea rax, [rip + tss]
    mov rbx, rax
    and rbx, 0xffffff
    shl rbx, 16                   /* base 23:0 -> bits 39:16 */
    mov rcx, rax
    shr rcx, 24
    and rcx, 0xff
    shl rcx, 56                   /* base 31:24 -> bits 63:56 */
    or rbx, rcx
    mov rcx, 0x0000890000000067
    or rbx, rcx
    mov [rip + gdt_tss], rbx
    shr rax, 32
    mov [rip + gdt_tss + 8], rax
    lgdt [rip + gdtr]
    lea rax, [rip + 1f]           /* reload CS with a far return */
    push KERNEL_CS
    push rax
    retfq
1:  mov ax, KERNEL_DS
    mov ds, ax
    mov es, ax
    mov ss, ax
    lea rax, [rip + kstack0_top]
    mov [rip + tss + 4], rax      /* TSS.RSP0 */
    mov word ptr [rip + tss + 0x66], 0x68   /* I/O bitmap base past the limit: none */
    mov ax, TSS_SEL
    ltr ax

    /* IDT: vectors 0-31 unexpected (DPL 0), 0x80 the system call gate (DPL 3) */
    xor ecx, ecx
2:  lea rax, [rip + unexpected_stubs]
    mov rdx, rcx
    shl rdx, 4
    add rax, rdx
    mov edx, 0x8e00               /* P=1, DPL=0, 64-bit interrupt gate */
    call set_gate
    inc ecx
    cmp ecx, 32
    jb 2b
    mov ecx, 0x80
    lea rax, [rip + int80]
    mov edx, 0xee00               /* P=1, DPL=3, 64-bit interrupt gate */
    call set_gate
    lidt [rip + idtr]

    /* SYSCALL: EFER.SCE, STAR, LSTAR, SFMASK (clear IF, TF, DF on entry) */
    mov ecx, MSR_EFER
    rdmsr
    or eax, 1
    wrmsr
    mov ecx, MSR_STAR
    xor eax, eax
    mov edx, (0x10 << 16) | KERNEL_CS
    wrmsr
    mov ecx, MSR_LSTAR
    lea rax, [rip + syscall_entry]
    mov rdx, rax
    shr rdx, 32
    wrmsr
    mov ecx, MSR_SFMASK
    mov eax, 0x700
    xor edx, edx
    wrmsr

    lea rsi, [rip + msg_enter]
    call puts
    lea rax, [rip + ustack_top]
    push USER_DS                  /* SS */
    push rax                      /* RSP */
    push 0x2                      /* RFLAGS: IF=0, IOPL=0 */
    push USER_CS                  /* CS */
    lea rax, [rip + user_entry]
    push rax                      /* RIP */
    iretq

/* set_gate: IDT entry ECX -> handler RAX, attributes DX (P, DPL, type), CS 0x08 */
set_gate:
    push rbx
    push rdi
    lea rbx, [rip + idt]
    mov rdi, rcx
    shl rdi, 4
    add rbx, rdi
    mov word ptr [rbx], ax
    mov word ptr [rbx + 2], KERNEL_CS
    mov word ptr [rbx + 4], dx
    mov rdi, rax
    shr rdi, 16
    mov word ptr [rbx + 6], di
    shr rdi, 16
    mov dword ptr [rbx + 8], edi
    mov dword ptr [rbx + 12], 0
    pop rdi
    pop rbx
    ret

/* ------------------------------------------------------------------ CPL 3 */
user_entry:
    xor edi, edi
    mov ecx, 1000
1:  add rdi, rcx
    loop 1b
    mov eax, 1
    lea r15, [rip + 2f]           /* where SYSCALL must say it came from */
    syscall
2:  mov eax, 2
    int 0x80
    mov eax, 60
    syscall
    ud2                           /* not reached: syscall 60 does not return */

/* ------------------------------------------------------------------ CPL 0 */
/* SYSCALL: RCX = user RIP, R11 = user RFLAGS, RSP still the user's */
syscall_entry:
    mov [rip + user_rsp], rsp
    lea rsp, [rip + kstack_top]
    push rcx
    push r11
    cmp eax, 60
    je sys_exit
    lea rsi, [rip + msg_sys1]
    call puts
    mov rax, rdi
    call putdec
    lea rsi, [rip + msg_cs]
    call puts
    mov ax, cs
    call puthex16
    lea rsi, [rip + msg_rcx_ok]
    cmp [rsp + 8], r15
    je 1f
    lea rsi, [rip + msg_rcx_bad]
1:  call puts
    pop r11
    pop rcx
    mov rsp, [rip + user_rsp]
    sysretq

sys_exit:
    lea rsi, [rip + msg_sys60]
    call puts
    DEBUG_EXIT_WITH(0x17)

/* int 0x80 through the DPL 3 gate: [rsp] RIP, +8 CS, +16 RFLAGS, +24 RSP, +32 SS */
int80:
    push rax
    push rsi
    lea rsi, [rip + msg_int80]
    call puts
    mov rax, [rsp + 16 + 8]
    and eax, 3
    call putdec
    lea rsi, [rip + msg_int80_stack]
    lea rax, [rip + kstack0]
    cmp rsp, rax
    jb 1f
    lea rax, [rip + kstack0_top]
    cmp rsp, rax
    jb 2f
1:  lea rsi, [rip + msg_int80_bad]
2:  call puts
    pop rsi
    pop rax
    iretq

#include "unexpected64.inc"
#include "serial64.inc"

    .section .rodata
msg_enter:       .asciz "user64: entering CPL 3 with iretq\n"
msg_sys1:        .asciz "syscall 1 from CPL 3: sum="
msg_cs:          .asciz ", CS="
msg_rcx_ok:      .asciz ", rcx ok\n"
msg_rcx_bad:     .asciz ", rcx BAD\n"
msg_sys60:       .asciz "syscall 60 from CPL 3: exit\n"
msg_int80:       .asciz "int 0x80 from CPL "
msg_int80_stack: .asciz " on the TSS.RSP0 stack\n"
msg_int80_bad:   .asciz " on the WRONG stack\n"

    .data
    .align 16
gdt:
    .quad 0                       /* 0x00 null */
    .quad 0x00af9a000000ffff      /* 0x08 kernel code: L=1, DPL 0 */
    .quad 0x00cf92000000ffff      /* 0x10 kernel data */
    .quad 0x00cff2000000ffff      /* 0x18 user data: DPL 3 */
    .quad 0x00affa000000ffff      /* 0x20 user code: L=1, DPL 3 */
gdt_tss:
    .quad 0, 0                    /* 0x28 TSS, filled at start */
gdt_end:
    .align 16
gdtr:
    .word gdt_end - gdt - 1
    .quad gdt
    .align 16
idtr:
    .word 0x81 * 16 - 1
    .quad idt
user_rsp: .quad 0

    .bss
    .align 4096
pml4: .skip 4096
pdpt: .skip 4096
pd:   .skip 4096
idt:  .skip 0x81 * 16
    .align 16
tss:  .skip 0x68
    .align 16
kstack: .skip 8192
kstack_top:
kstack0: .skip 8192
kstack0_top:
ustack: .skip 8192
ustack_top:
