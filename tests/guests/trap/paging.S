/*
 * paging: a kernel that builds its own 4-level page tables and uses them: what the
 * trap engine's shadow page tables (src/pyhv/engines/trap/shadow.py) must follow.
 *
 * Two address spaces, both with the first 1 GiB identity-mapped by 2 MiB pages
 * (supervisor-only, as a kernel maps itself), and a 4 KiB page table at HI, far from
 * anything identity-mapped: 0x0000400000000000 (PML4 slot 128) by default;
 * paging_high.S builds the same kernel with HI = 0xffff800000000000 (slot 256), the
 * upper half, which the trap engine cannot give a guest on KVM-PVM (docs/trap.md).
 *
 *   space A (pml4_a)   HI+0 -> page_a, HI+0x1000 -> page_a (alias), HI+0x2000 -> page_b,
 *                      HI+0x3000 -> page_b (for the A/D check)
 *   space B (pml4_b)   HI+0 -> page_b
 *
 * It then: writes through HI+0 and reads through the alias and through the identity
 * map; switches CR3 to B and back, reading HI+0 in each; reads, then writes, HI+0x3000
 * and prints the A and D bits the CPU set in that PTE; points HI+0's PTE at page_b,
 * INVLPG, reads it; clears the alias's PTE, INVLPG, reads it: #PF in its own handler
 * (error code and CR2 printed, resumes at R15); makes HI+0x2000 read-only, writes it
 * with CR0.WP=0 (allowed at CPL 0), sets CR0.WP and writes again: #PF.
 *
 *   paging: own tables built, mov cr3
 *   alias: 0000400000001000 reads 1111222233334444
 *   identity: 1111222233334444
 *   cr3 B: 0000400000000000 reads bbbbbbbbbbbbbbbb
 *   cr3 A: 0000400000000000 reads 1111222233334444
 *   pte after a read: A=1 D=0
 *   pte after a write: A=1 D=1
 *   invlpg: 0000400000000000 reads bbbbbbbbbbbbbbbb
 *   #PF err=0000 cr2=0000400000001000
 *   wp=0: write to a read-only page done
 *   #PF err=0003 cr2=0000400000002000
 *   paging: 2 page faults, done
 *
 * Then debug-exit with 0x26 (status 77).
 */
#include "guest.h"
#include "kernel64.h"
    .intel_syntax noprefix
    .code64

#ifndef HI
#define HI      0x0000400000000000
#endif
#define PML4_SLOT ((HI >> 39) & 511)
#define PTE_P   0x1
#define PTE_RW  0x2
#define PTE_A   0x20
#define PTE_D   0x40
#define PTE_PS  0x80
#define CR0_WP  0x10000

    .text
    .globl start
start:
    lea rsp, [rip + stack_top]
    call kinit
    lea rax, [rip + pf_handler]
    mov ecx, 14
    call set_gate

    /* identity: 512 x 2 MiB in pd_low, shared by both spaces */
    lea rdi, [rip + pd_low]
    mov eax, PTE_P | PTE_RW | PTE_PS
    mov ecx, 512
1:  mov [rdi], rax
    add rax, 0x200000
    add rdi, 8
    dec ecx
    jnz 1b
    lea rax, [rip + pd_low]
    or rax, PTE_P | PTE_RW
    mov [rip + pdpt_low], rax
    lea rax, [rip + pdpt_low]
    or rax, PTE_P | PTE_RW
    mov [rip + pml4_a], rax
    mov [rip + pml4_b], rax
    /* space A's high half */
    lea rax, [rip + pt_a]
    or rax, PTE_P | PTE_RW
    mov [rip + pd_a], rax
    lea rax, [rip + pd_a]
    or rax, PTE_P | PTE_RW
    mov [rip + pdpt_a], rax
    lea rax, [rip + pdpt_a]
    or rax, PTE_P | PTE_RW
    mov [rip + pml4_a + PML4_SLOT * 8], rax
    lea rax, [rip + page_a]
    or rax, PTE_P | PTE_RW
    mov [rip + pt_a], rax                 /* HI+0      -> page_a */
    mov [rip + pt_a + 8], rax             /* HI+0x1000 -> page_a */
    lea rax, [rip + page_b]
    or rax, PTE_P | PTE_RW
    mov [rip + pt_a + 16], rax            /* HI+0x2000 -> page_b */
    mov [rip + pt_a + 24], rax            /* HI+0x3000 -> page_b */
    /* space B's high half */
    mov [rip + pt_b], rax                 /* HI+0      -> page_b */
    lea rax, [rip + pt_b]
    or rax, PTE_P | PTE_RW
    mov [rip + pd_b], rax
    lea rax, [rip + pd_b]
    or rax, PTE_P | PTE_RW
    mov [rip + pdpt_b], rax
    lea rax, [rip + pdpt_b]
    or rax, PTE_P | PTE_RW
    mov [rip + pml4_b + PML4_SLOT * 8], rax
    mov rax, 0xbbbbbbbbbbbbbbbb
    mov [rip + page_b], rax

    lea rsi, [rip + msg_built]
    call puts
    lea rax, [rip + pml4_a]
    mov cr3, rax

    /* one page, two virtual addresses, and its identity address */
    mov rbx, HI
    mov rax, 0x1111222233334444
    mov [rbx], rax
    lea rsi, [rip + msg_alias]
    call puts
    lea rax, [rbx + 0x1000]
    call puthex
    lea rsi, [rip + msg_reads]
    call puts
    mov rax, [rbx + 0x1000]
    call puthex
    lea rsi, [rip + msg_identity]
    call puts
    mov rax, [rip + page_a]
    call puthex
    mov al, '\n'
    call putc

    /* two address spaces */
    lea rax, [rip + pml4_b]
    mov cr3, rax
    lea rsi, [rip + msg_cr3b]
    call puts
    mov rax, rbx
    call puthex
    lea rsi, [rip + msg_reads]
    call puts
    mov rax, [rbx]
    call puthex
    lea rax, [rip + pml4_a]
    mov cr3, rax
    lea rsi, [rip + msg_cr3a]
    call puts
    mov rax, rbx
    call puthex
    lea rsi, [rip + msg_reads]
    call puts
    mov rax, [rbx]
    call puthex
    mov al, '\n'
    call putc

    /* accessed and dirty bits, as the CPU sets them in our PTE */
    mov rax, [rbx + 0x3000]
    lea rsi, [rip + msg_ad_read]
    call puts
    call print_ad
    mov qword ptr [rbx + 0x3008], 1
    lea rsi, [rip + msg_ad_write]
    call puts
    call print_ad

    /* change an entry, invlpg */
    lea rax, [rip + page_b]
    or rax, PTE_P | PTE_RW
    mov [rip + pt_a], rax
    invlpg [rbx]
    lea rsi, [rip + msg_invlpg]
    call puts
    mov rax, rbx
    call puthex
    lea rsi, [rip + msg_reads]
    call puts
    mov rax, [rbx]
    call puthex
    mov al, '\n'
    call putc

    /* unmap the alias: a #PF in our own handler */
    mov qword ptr [rip + pt_a + 8], 0
    invlpg [rbx + 0x1000]
    lea r15, [rip + 1f]
    mov rax, [rbx + 0x1000]
1:
    /* a read-only page: writable at CPL 0 with CR0.WP=0, a #PF with WP=1 */
    lea rax, [rip + page_b]
    or rax, PTE_P
    mov [rip + pt_a + 16], rax
    invlpg [rbx + 0x2000]
    mov rax, cr0
    and eax, ~CR0_WP
    mov cr0, rax
    mov qword ptr [rbx + 0x2000], 2
    lea rsi, [rip + msg_wp0]
    call puts
    mov rax, cr0
    or eax, CR0_WP
    mov cr0, rax
    lea r15, [rip + 1f]
    mov qword ptr [rbx + 0x2000], 3
1:  lea rsi, [rip + msg_done]
    call puts
    mov rax, [rip + faults]
    call putdec
    lea rsi, [rip + msg_done2]
    call puts
    DEBUG_EXIT_WITH(0x26)

print_ad:                                 /* "A=x D=y\n" from pt_a[3] */
    push rax
    push rcx
    mov rcx, [rip + pt_a + 24]
    lea rsi, [rip + msg_a]
    call puts
    mov rax, rcx
    shr rax, 5
    and eax, 1
    add al, '0'
    call putc
    lea rsi, [rip + msg_d]
    call puts
    mov rax, rcx
    shr rax, 6
    and eax, 1
    add al, '0'
    call putc
    mov al, '\n'
    call putc
    pop rcx
    pop rax
    ret

#include "serial64.inc"
#include "kernel64.inc"

    .section .rodata
msg_built:    .asciz "paging: own tables built, mov cr3\n"
msg_alias:    .asciz "alias: "
msg_reads:    .asciz " reads "
msg_identity: .asciz "\nidentity: "
msg_cr3b:     .asciz "cr3 B: "
msg_cr3a:     .asciz "\ncr3 A: "
msg_ad_read:  .asciz "pte after a read: "
msg_ad_write: .asciz "pte after a write: "
msg_a:        .asciz "A="
msg_d:        .asciz " D="
msg_invlpg:   .asciz "invlpg: "
msg_wp0:      .asciz "wp=0: write to a read-only page done\n"
msg_done:     .asciz "paging: "
msg_done2:    .asciz " page faults, done\n"
    .bss
    .align 4096
pml4_a:   .skip 4096
pml4_b:   .skip 4096
pdpt_low: .skip 4096
pd_low:   .skip 4096
pdpt_a:   .skip 4096
pd_a:     .skip 4096
pt_a:     .skip 4096
pdpt_b:   .skip 4096
pd_b:     .skip 4096
pt_b:     .skip 4096
page_a:   .skip 4096
page_b:   .skip 4096
    .skip 8192
stack_top:
