/*
 * usermode.S: a kernel that goes to its own user mode (CPL 3) and back many times, by
 * every way x86-64 has (after one IRETQ that must fail: to an RPL 3 selector of its DPL 0
 * code, #GP): IRETQ and SYSRETQ down, INT n through a DPL 3 gate, SYSCALL,
 * exceptions (#GP from INT n through a DPL 0 gate, #UD, #PF on a supervisor page) and
 * timer interrupts taken in user mode, up. The bt engine runs the user code directly and
 * the kernel translated (docs/bt.md); the output must be emu's (a real CPU's).
 *
 * Set-up (as modes.S's usys): its own GDT (kernel code/data, user data/code64, a TSS
 * with RSP0), LTR, U/S on the mapping of its first 2 MiB (the rest stays supervisor),
 * EFER.SCE with STAR/LSTAR/SFMASK (IF masked), gates 0x2e (DPL 3: a system call),
 * 0x2c (DPL 3: back to the kernel for good), 0x2d (DPL 0), #GP, #UD, #PF handlers.
 *
 * Prints (the exact lines are in tests/bt/test_bt_user.py) and ends with status 83.
 */
#include "guest.h"
#include "kernel64.h"
    .intel_syntax noprefix
    .code64

#define ROUNDS 300
#define RSP0_FRAME (stack_top - 40)

    .text
    .globl start
start:
    lea rsp, [rip + stack_top]
    call kinit
    lea rsi, [rip + msg_start]
    call puts
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
    lea rax, [rip + sys_handler]
    mov ecx, 0x2e
    call set_gate
    lea rax, [rip + done_handler]
    mov ecx, 0x2c
    call set_gate
    lea rax, [rip + dpl0_handler]
    mov ecx, 0x2d
    call set_gate
    lea rax, [rip + gp_handler]
    mov ecx, 13
    call set_gate
    lea rax, [rip + ud_handler]
    mov ecx, 6
    call set_gate
    lea rax, [rip + pf_user]
    mov ecx, 14
    call set_gate
    or byte ptr [rip + kidt + 0x2e * 16 + 5], 0x60   /* DPL 3 */
    or byte ptr [rip + kidt + 0x2c * 16 + 5], 0x60
    mov ecx, 0xc0000080           /* EFER.SCE */
    rdmsr
    or eax, 1
    wrmsr
    mov ecx, 0xc0000081           /* STAR: SYSCALL CS 0x08, SYSRET base 0x10 */
    xor eax, eax
    mov edx, 0x00100008
    wrmsr
    mov ecx, 0xc0000082           /* LSTAR */
    lea rax, [rip + syscall_entry]
    mov rdx, rax
    shr rdx, 32
    wrmsr
    mov ecx, 0xc0000084           /* SFMASK: IF */
    mov eax, 0x200
    xor edx, edx
    wrmsr
    /* a bad way down first: IRETQ to CS 0x0b (RPL 3, but the kernel's DPL 0 code):
     * #GP(0x08) at the IRETQ, nothing popped */
    mov rax, rsp
    push 0x1b
    push rax
    push 0x202
    push 0x0b
    lea rax, [rip + user_main]
    push rax
    iretq
    add rsp, 40                   /* the gp_handler stepped over the IRETQ */
    call pic_init
    call pit_init
    push 0x1b                     /* SS: user data, RPL 3 */
    lea rax, [rip + ustack_top]
    push rax
    push 0x202                    /* RFLAGS: IF 1 (timer ticks in user mode) */
    push 0x23                     /* CS: user code, RPL 3 */
    lea rax, [rip + user_main]
    push rax
    iretq

/* ---------------------------------------------------------------- user mode */
user_main:
    mov ax, cs
    mov [rip + u_cs], ax
    mov ax, ss
    mov [rip + u_ss], ax
    pushfq
    pop qword ptr [rip + u_flags]
    mov r12, ROUNDS
1:  mov rax, r12
    int 0x2e                      /* the kernel adds RAX to sum */
    dec r12
    jnz 1b
    mov r12, ROUNDS
2:  mov rax, r12
    syscall                       /* the kernel XORs RAX into xsum */
3:  lea rdx, [rip + 3b]           /* RCX: the return address */
    cmp rcx, rdx
    jne 4f
    inc qword ptr [rip + rcx_ok]
4:  dec r12
    jnz 2b
    int 0x2d                      /* DPL 0 gate: #GP(0x2d * 8 + 2) */
    ud2                           /* #UD: the handler steps over it */
    lea r15, [rip + 5f]           /* #PF: a supervisor page, P=1 U=1 */
    mov rax, [0x40000000]
5:  mov rax, [rip + ticks]        /* timer interrupts taken in user mode */
    cmp rax, 3
    jb 5b
    int 0x2c

/* ---------------------------------------------------------------- kernel mode */
sys_handler:
    add [rip + sum], rax
    cmp qword ptr [rsp + 8], 0x23          /* CS */
    jne 1f
    cmp qword ptr [rsp + 32], 0x1b         /* SS */
    jne 1f
    lea rax, [rip + RSP0_FRAME]
    cmp rsp, rax                            /* on RSP0 */
    jne 1f
    mov ax, cs
    cmp ax, 0x08
    jne 1f
    inc qword ptr [rip + frames_ok]
1:  iretq

syscall_entry:
    xor [rip + xsum], rax
    pushfq
    pop rax
    test eax, 0x200                         /* SFMASK cleared IF */
    jnz 1f
    test r11d, 0x200                        /* R11: user RFLAGS with IF */
    jz 1f
    mov ax, cs
    cmp ax, 0x08
    jne 1f
    inc qword ptr [rip + sc_ok]
1:  sysretq

gp_handler:
    mov rax, [rsp]                          /* the error code */
    cmp qword ptr [rip + bad_iret_err], -1
    jne 1f
    mov [rip + bad_iret_err], rax           /* the first #GP: the bad IRETQ */
    jmp 2f
1:  mov [rip + gp_err], rax
2:
    add rsp, 8
    add qword ptr [rsp], 2                  /* a fault: RIP is the faulting (2-byte)
                                               IRETQ or INT 0x2d itself */
    iretq

ud_handler:
    mov rax, [rsp]
    mov [rip + ud_rip], rax
    add qword ptr [rsp], 2                  /* step over ud2 */
    iretq

pf_user:
    mov rax, [rsp]
    mov [rip + pf_err], rax
    mov rax, cr2
    mov [rip + pf_cr2], rax
    add rsp, 8
    mov [rsp], r15                          /* resume at the recovery label */
    iretq

dpl0_handler:                               /* never entered from user mode */
    lea rsi, [rip + msg_dpl0]
    call puts
    DEBUG_EXIT_WITH(0x7e)

done_handler:
    cli
    lea rsp, [rip + stack_top]
    lea rsi, [rip + msg_badiret]
    call puts
    mov rax, [rip + bad_iret_err]
    call puthex16
    lea rsi, [rip + msg_cs]
    call puts
    mov ax, [rip + u_cs]
    call puthex16
    lea rsi, [rip + msg_ss]
    call puts
    mov ax, [rip + u_ss]
    call puthex16
    lea rsi, [rip + msg_if]
    call puts
    mov rax, [rip + u_flags]
    shr eax, 9
    and eax, 1
    add al, '0'
    call putc
    lea rsi, [rip + msg_int]
    call puts
    mov rax, [rip + sum]
    call puthex
    lea rsi, [rip + msg_frames]
    call puts
    mov rax, [rip + frames_ok]
    call puthex16
    lea rsi, [rip + msg_sc]
    call puts
    mov rax, [rip + xsum]
    call puthex
    lea rsi, [rip + msg_scok]
    call puts
    mov rax, [rip + sc_ok]
    call puthex16
    lea rsi, [rip + msg_rcx]
    call puts
    mov rax, [rip + rcx_ok]
    call puthex16
    lea rsi, [rip + msg_gp]
    call puts
    mov rax, [rip + gp_err]
    call puthex16
    lea rsi, [rip + msg_ud]
    call puts
    lea rax, [rip + user_main]
    mov rdx, [rip + ud_rip]
    sub rdx, rax
    mov rax, rdx
    call puthex16
    lea rsi, [rip + msg_upf]
    call puts
    mov rax, [rip + pf_err]
    call puthex16
    lea rsi, [rip + msg_ucr2]
    call puts
    mov rax, [rip + pf_cr2]
    call puthex
    lea rsi, [rip + msg_end]
    call puts
    DEBUG_EXIT_WITH(0x29)

#include "serial64.inc"
#include "kernel64.inc"

    .section .rodata
msg_start:  .asciz "usermode: start\n"
msg_badiret: .asciz "iretq to cs 000b (dpl 0): #GP err="
msg_cs:     .asciz "\nuser cs="
msg_ss:     .asciz " ss="
msg_if:     .asciz " IF="
msg_int:    .asciz "\nint 0x2e x300: sum="
msg_frames: .asciz " frames ok="
msg_sc:     .asciz "\nsyscall x300: xor="
msg_scok:   .asciz " entries ok="
msg_rcx:    .asciz " rcx ok="
msg_gp:     .asciz "\nint 0x2d (DPL 0 gate): #GP err="
msg_ud:     .asciz "\nud2: #UD at user_main+"
msg_upf:     .asciz "\nsupervisor page: #PF err="
msg_ucr2:    .asciz " cr2="
msg_end:    .asciz "\nticks in user mode: 3\nusermode: done\n"
msg_dpl0:   .asciz "usermode: DPL 0 gate entered from user mode\n"
    .data
    .align 16
ugdt:
    .quad 0
    .quad 0x00af9b000000ffff      /* 0x08 kernel code64 */
    .quad 0x00cf93000000ffff      /* 0x10 kernel data */
    .quad 0x00cff3000000ffff      /* 0x18 user data, DPL 3 */
    .quad 0x00affb000000ffff      /* 0x20 user code64, DPL 3 */
ugdt_tss:
    .quad 0x0000890000000067      /* 0x28 64-bit TSS, limit 0x67, base filled in */
    .quad 0
ugdt_end:
ugdtr:
    .word ugdt_end - ugdt - 1
    .quad ugdt
    .align 16
tss: .skip 0x68
    .align 8
u_cs: .quad 0
u_ss: .quad 0
u_flags: .quad 0
sum: .quad 0
xsum: .quad 0
frames_ok: .quad 0
sc_ok: .quad 0
rcx_ok: .quad 0
gp_err: .quad 0
bad_iret_err: .quad -1
ud_rip: .quad 0
pf_err: .quad 0
pf_cr2: .quad 0
    .bss
    .align 16
    .skip 8192
stack_top:
    .skip 4096
ustack_top:
