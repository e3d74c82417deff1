/*
 * btedge: what a binary translator must get right that trap-and-emulate never sees,
 * checked against the same kernel at real CPL 0 (emu). Each line is what a CPU at
 * CPL 0 gives:
 *
 *   btedge: start
 *   call pushes its guest address: yes        (return addresses are guest addresses)
 *   indirect: 42 43 44                        (call reg, call [mem], jmp [mem] + ret)
 *   smc: 1 7                                  (code patched after it ran: retranslated)
 *   smc same block: 05                        (a store rewriting the next instruction)
 *   #UD at +0                                 (an undecodable byte: 0x06 in 64-bit mode)
 *   mid: 00000000                             (a call into the middle of an instruction)
 *   lar cs: 00a09b00 lsl ds: ffffffff         (LAR/LSL on its own DPL 0 descriptors)
 *   verr cs: 1 verw ds: 1 verw cs: 0 lar 0: 0
 *   mov ax, ss: 0010
 *   iopl: 3 then 0                            (POPF sets IOPL at CPL 0)
 *   blocks: 1500                              (1500 blocks: overflows a small TC)
 *   #PF err=0000 cr2=00007f8000181000         (a jump to where bt keeps its TC: unmapped)
 *   #PF err=0002 cr2=00007f8000181000         (a store there)
 *   int 0x2f: rip ok cs=0008 frame IF=1 handler IF=0 after IF=1   (INT n, IRETQ)
 *   #PF err=0002 cr2=ffffff8000000000         (SGDT to an unmapped page...)
 *   r11 after the fault: 1234                 (...with the guest's registers)
 *   btedge: done
 *
 * then debug-exit with 0x27 (status 79). (Not for kvm on KVM-PVM: LAR at CPL 0 is one of
 * the instructions its emulator refuses, docs/host.md.)
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
    lea rax, [rip + ud_handler]
    mov ecx, 6
    call set_gate
    lea rsi, [rip + msg_start]
    call puts

    /* return addresses are guest addresses */
    lea rsi, [rip + msg_call]
    call puts
    call 1f
1:  pop rax
    lea rbx, [rip + 1b]
    lea rsi, [rip + msg_yes]
    cmp rax, rbx
    je 2f
    lea rsi, [rip + msg_no]
2:  call puts

    /* indirect branches: call reg, call [mem], jmp [mem] to a function that returns */
    lea rsi, [rip + msg_indirect]
    call puts
    lea rax, [rip + f42]
    call rax
    call putdec
    mov al, ' '
    call putc
    call [rip + fptr43]
    call putdec
    mov al, ' '
    call putc
    call jumper
    call putdec
    mov al, '\n'
    call putc

    /* self-modifying code: smc_target has run (and been translated) before the patch */
    lea rsi, [rip + msg_smc]
    call puts
    call smc_target
    call putdec
    mov al, ' '
    call putc
    mov dword ptr [rip + smc_imm], 7
    call smc_target
    call putdec
    mov al, '\n'
    call putc

    /* a store rewriting the very next instruction, in the same block */
    lea rsi, [rip + msg_smc2]
    call puts
    mov byte ptr [rip + 3f + 1], 0x05
3:  mov al, 0x01
    call puthex8
    mov al, '\n'
    call putc

    /* an undecodable byte: #UD at its address */
    lea r14, [rip + 4f]
    lea r15, [rip + 5f]
4:  .byte 0x06                    /* push es: invalid in 64-bit mode */
5:
    /* into the middle of an instruction: b8 31 c0 c3 00 is mov eax, imm32; from +1 it
     * is xor eax, eax; ret */
    lea rsi, [rip + msg_mid]
    call puts
    mov eax, 5
    call mid + 1
    call puthex32
    mov al, '\n'
    call putc

    /* LAR/LSL/VERR/VERW on the kernel's own descriptors */
    lea rsi, [rip + msg_lar]
    call puts
    mov ecx, KERNEL_CS
    lar eax, ecx
    call puthex32
    lea rsi, [rip + msg_lsl]
    call puts
    mov ecx, KERNEL_DS
    lsl eax, ecx
    call puthex32
    lea rsi, [rip + msg_verr]
    call puts
    mov cx, KERNEL_CS
    verr cx
    setz al
    movzx eax, al
    call putdec
    lea rsi, [rip + msg_verw]
    call puts
    mov cx, KERNEL_DS
    verw cx
    setz al
    movzx eax, al
    call putdec
    lea rsi, [rip + msg_verwcs]
    call puts
    mov cx, KERNEL_CS
    verw cx
    setz al
    movzx eax, al
    call putdec
    lea rsi, [rip + msg_lar0]
    call puts
    xor ecx, ecx
    mov eax, 1
    lar eax, ecx
    setz al
    movzx eax, al
    call putdec
    mov al, '\n'
    call putc

    /* MOV from SS */
    lea rsi, [rip + msg_ss]
    call puts
    xor eax, eax
    mov ax, ss
    call puthex16
    mov al, '\n'
    call putc

    /* POPF sets IOPL at CPL 0 */
    lea rsi, [rip + msg_iopl]
    call puts
    pushfq
    or qword ptr [rsp], 0x3000
    popfq
    pushfq
    pop rax
    shr rax, 12
    and eax, 3
    call putdec
    lea rsi, [rip + msg_then]
    call puts
    pushfq
    and qword ptr [rsp], ~0x3000
    popfq
    pushfq
    pop rax
    shr rax, 12
    and eax, 3
    call putdec
    mov al, '\n'
    call putc

    /* many blocks: each jmp ends one */
    lea rsi, [rip + msg_blocks]
    call puts
    xor ebx, ebx
    .rept 1500
    inc rbx
    jmp 6f
6:
    .endr
    mov rax, rbx
    call putdec
    mov al, '\n'
    call putc

    /* the translator's area (PML4 slot 255) is not the guest's: not present */
    lea rax, [rip + pf_handler]
    mov ecx, 14
    call set_gate
    mov rax, 0x7f8000181000
    lea r15, [rip + 7f]
    jmp rax
7:  lea r15, [rip + 8f]
    mov qword ptr [rax], 0
8:
    /* INT n through its own IDT, IRETQ back: the frame a CPU at CPL 0 pushes */
    lea rax, [rip + int_handler]
    mov ecx, 0x2f
    call set_gate
    lea rsi, [rip + msg_int]
    call puts
    lea r14, [rip + 9f]
    sti
    int 0x2f
9:  pushfq
    pop rax
    cli
    shr rax, 9
    and eax, 1
    call putdec
    mov al, '\n'
    call putc

    /* a fault inside a rewritten instruction: the guest's registers, its RIP */
    mov rax, 0xffffff8000000000
    mov r11, 0x1234
    lea r15, [rip + 10f]
    sgdt [rax]
10: lea rsi, [rip + msg_r11]
    call puts
    mov rax, r11
    call puthex16
    mov al, '\n'
    call putc

    lea rsi, [rip + msg_done]
    call puts
    DEBUG_EXIT_WITH(0x27)

f42:
    mov eax, 42
    ret
f43:
    mov eax, 43
    ret
f44:
    mov eax, 44
    ret
jumper:
    jmp [rip + fptr44]            /* tail call: f44's ret returns to jumper's caller */

smc_target:
    .byte 0xb8                    /* mov eax, imm32 */
smc_imm:
    .long 1
    ret

mid:
    .byte 0xb8, 0x31, 0xc0, 0xc3, 0x00

/* puthex32: EAX as 8 hex digits; puthex8: AL as 2 */
puthex32:
    push rax
    shr rax, 16
    call puthex16
    pop rax
    jmp puthex16
puthex8:
    push rax
    push rcx
    push rdx
    mov rdx, rax
    shl rdx, 56
    mov ecx, 2
1:  rol rdx, 4
    mov al, dl
    and al, 0x0f
    add al, '0'
    cmp al, '9'
    jbe 2f
    add al, 'a' - '9' - 1
2:  call putc
    loop 1b
    pop rdx
    pop rcx
    pop rax
    ret

/* INT 0x2f: checks the frame's RIP against R14, prints CS, the frame's IF, its own IF */
int_handler:
    push rsi
    push rax
    lea rsi, [rip + msg_ripok]
    cmp [rsp + 16], r14
    je 1f
    lea rsi, [rip + msg_ripbad]
1:  call puts
    mov rax, [rsp + 24]
    call puthex16
    lea rsi, [rip + msg_fif]
    call puts
    mov rax, [rsp + 32]
    shr rax, 9
    and eax, 1
    call putdec
    lea rsi, [rip + msg_hif]
    call puts
    pushfq
    pop rax
    shr rax, 9
    and eax, 1
    call putdec
    lea rsi, [rip + msg_after]
    call puts
    pop rax
    pop rsi
    iretq

/* #UD: prints the offset of the faulting RIP from R14, resumes at R15 */
ud_handler:
    push rsi
    push rax
    lea rsi, [rip + msg_ud]
    call puts
    mov rax, [rsp + 16]
    sub rax, r14
    call putdec
    mov al, '\n'
    call putc
    mov [rsp + 16], r15
    pop rax
    pop rsi
    iretq

#include "serial64.inc"
#include "kernel64.inc"

    .section .rodata
msg_start:    .asciz "btedge: start\n"
msg_call:     .asciz "call pushes its guest address: "
msg_yes:      .asciz "yes\n"
msg_no:       .asciz "no\n"
msg_indirect: .asciz "indirect: "
msg_smc:      .asciz "smc: "
msg_smc2:     .asciz "smc same block: "
msg_ud:       .asciz "#UD at +"
msg_mid:      .asciz "mid: "
msg_lar:      .asciz "lar cs: "
msg_lsl:      .asciz " lsl ds: "
msg_verr:     .asciz "\nverr cs: "
msg_verw:     .asciz " verw ds: "
msg_verwcs:   .asciz " verw cs: "
msg_lar0:     .asciz " lar 0: "
msg_ss:       .asciz "mov ax, ss: "
msg_iopl:     .asciz "iopl: "
msg_then:     .asciz " then "
msg_blocks:   .asciz "blocks: "
msg_done:     .asciz "btedge: done\n"
msg_int:      .asciz "int 0x2f: "
msg_ripok:    .asciz "rip ok cs="
msg_ripbad:   .asciz "rip BAD cs="
msg_fif:      .asciz " frame IF="
msg_hif:      .asciz " handler IF="
msg_after:    .asciz " after IF="
msg_r11:      .asciz "r11 after the fault: "
    .align 8
fptr43: .quad f43
fptr44: .quad f44

    .bss
    .align 16
    .skip 8192
stack_top:
