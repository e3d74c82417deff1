/*
 * teach: a tiny 64-bit kernel for the trap-and-emulate engine (ELF64, entered in long
 * mode at CPL 0 by pyhv's loader). It does what a kernel does with the privileged
 * parts of the CPU, and every one of them traps when the kernel is deprivileged:
 *
 *   1. LGDT/LIDT its own tables, RETFQ into its own CS, MOV SS (kernel64.inc);
 *   2. reads CR0/CR3/CR4 and EFER (MOV CR, RDMSR) and writes CR3 back (recorded);
 *   3. provokes #UD (ud2) and #GP (a non-canonical load); its own handlers print them
 *      and resume after the faulting instruction (saved RIP rewritten, IRETQ);
 *   4. initialises the 8259 and the 8254 (OUT), counts TICKS timer interrupts with
 *      "sti; hlt" (HLT with IF=1 sleeps until IRQ 0), then CLI;
 *   5. a workload: the primes below 20000 and a 64-bit checksum of their squares;
 *   6. ends through debug-exit with 0x21 (status 67).
 *
 *   teach: own GDT and IDT loaded
 *   cr0=80000031 cr4=00000620 efer=00000500
 *   #UD handled, rip ok
 *   #GP err=0000 handled, rip ok
 *   timer: 10 ticks with sti;hlt
 *   primes below 20000: 2262
 *   checksum: 84fb8c8e473aabb0
 *   teach: done
 *
 * Any other exception: "unexpected exception" and status 251.
 *
 * One source, two kernels (pvops.h): built with -DPV, the interrupt flag, the sleep, the
 * timer and the console go through pyhv's hypercalls (docs/pv.md) and timer ticks
 * arrive at pv_callback; the output is the same (`pyhv run --engine pv`).
 */
#include "guest.h"
#include "kernel64.h"
#include "pvops.h"
    .intel_syntax noprefix
    .code64

#define TICKS 10
#define LIMIT 20000

    .text
    .globl start
start:
    lea rsp, [rip + stack_top]
    call kinit
    PV_INIT                       /* PV build: shared page and event callback */
    lea rsi, [rip + msg_hello]
    call puts

    /* control registers and EFER, as the guest sees them */
    lea rsi, [rip + msg_cr0]
    call puts
    mov rax, cr0
    call puthex32
    lea rsi, [rip + msg_cr4]
    call puts
    mov rax, cr4
    call puthex32
    lea rsi, [rip + msg_efer]
    call puts
    mov ecx, 0xc0000080
    rdmsr
    call puthex32
    mov al, '\n'
    call putc
    mov rax, cr3
    mov cr3, rax                  /* a TLB flush on a real CPU; recorded under trap */

    /* #UD and #GP, handled by the kernel's own handlers */
    lea rax, [rip + ud_handler]
    mov ecx, 6
    call set_gate
    lea rax, [rip + gp_handler]
    mov ecx, 13
    call set_gate
    lea r14, [rip + 1f]
    lea r15, [rip + 2f]
1:  ud2
2:  mov rax, 0x8000000000000000
    lea r14, [rip + 1f]
    lea r15, [rip + 2f]
1:  mov rbx, [rax]
2:
    /* the PIT through the PIC: TICKS interrupts, sleeping in between */
    call pic_init
    call pit_init
    mov byte ptr [rip + tick_once], 1   /* one tick per HLT, however late the host */
3:  PV_SAFE_HALT                  /* sti; hlt */
    PV_CLI
    cmp qword ptr [rip + ticks], TICKS
    jb 3b
    mov al, 0xff                  /* mask IRQ 0 again */
    out PIC1_DATA, al
    lea rsi, [rip + msg_timer]
    call puts
    mov rax, [rip + ticks]
    call putdec
    lea rsi, [rip + msg_ticks]
    call puts

    /* workload: trial division, checksum of p*p with a rotate */
    xor r8d, r8d                  /* count */
    xor r9d, r9d                  /* checksum */
    mov ebx, 2
4:  mov ecx, 2
5:  mov eax, ecx
    imul eax, ecx
    cmp eax, ebx
    ja 6f                         /* no divisor up to sqrt: prime */
    mov eax, ebx
    xor edx, edx
    div ecx
    test edx, edx
    jz 7f                         /* composite */
    inc ecx
    jmp 5b
6:  inc r8
    mov rax, rbx
    imul rax, rbx
    rol r9, 5
    xor r9, rax
7:  inc ebx
    cmp ebx, LIMIT
    jb 4b
    lea rsi, [rip + msg_primes]
    call puts
    mov rax, r8
    call putdec
    lea rsi, [rip + msg_sum]
    call puts
    mov rax, r9
    call puthex
    lea rsi, [rip + msg_done]
    call puts
    DEBUG_EXIT_WITH(0x21)

/* puthex32: EAX as 8 hex digits */
puthex32:
    push rax
    shr rax, 16
    call puthex16
    pop rax
    jmp puthex16

/* #UD: no error code. Check and skip the faulting instruction. */
ud_handler:
    push rsi
    lea rsi, [rip + msg_ud]
    call puts
    lea rsi, [rip + msg_rip_ok]
    cmp [rsp + 8], r14
    je 1f
    lea rsi, [rip + msg_rip_bad]
1:  call puts
    mov [rsp + 8], r15
    pop rsi
    iretq

/* #GP: error code on the stack. */
gp_handler:
    push rsi
    push rax
    lea rsi, [rip + msg_gp]
    call puts
    mov rax, [rsp + 16]
    call puthex16
    lea rsi, [rip + msg_handled]
    call puts
    lea rsi, [rip + msg_rip_ok]
    cmp [rsp + 24], r14
    je 1f
    lea rsi, [rip + msg_rip_bad]
1:  call puts
    mov [rsp + 24], r15
    pop rax
    pop rsi
    add rsp, 8
    iretq

#ifdef PV
#include "pvserial64.inc"
#else
#include "serial64.inc"
#endif
#include "kernel64.inc"

    .section .rodata
msg_hello:   .asciz "teach: own GDT and IDT loaded\n"
msg_cr0:     .asciz "cr0="
msg_cr4:     .asciz " cr4="
msg_efer:    .asciz " efer="
msg_ud:      .asciz "#UD handled"
msg_gp:      .asciz "#GP err="
msg_handled: .asciz " handled"
msg_rip_ok:  .asciz ", rip ok\n"
msg_rip_bad: .asciz ", rip BAD\n"
msg_timer:   .asciz "timer: "
msg_ticks:   .asciz " ticks with sti;hlt\n"
msg_primes:  .asciz "primes below 20000: "
msg_sum:     .asciz "\nchecksum: "
msg_done:    .asciz "\nteach: done\n"

    .bss
    .align 16
    .skip 8192
stack_top:
