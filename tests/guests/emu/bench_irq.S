/*
 * emu benchmark guest: long mode, a 1 kHz harness timer (port 0x40), HLT until RDI
 * timer interrupts have been handled (each handler EOIs on port 0x20), then exit.
 */
    .intel_syntax noprefix
    .code64
    .text
    .globl start
start:
    mov r12, rdi
    lea rsp, [rip + stack_top]
    lea rax, [rip + timer]        /* IDT entry 0x20: interrupt gate, CS 0x08 */
    mov rdx, rax
    and rdx, 0xffff
    or rdx, 0x08 << 16
    mov rbx, 0x8e
    shl rbx, 40
    or rdx, rbx
    mov rbx, rax
    shr rbx, 16
    shl rbx, 48
    or rdx, rbx
    lea rdi, [rip + idt]
    mov [rdi + 0x20*16], rdx
    shr rax, 32
    mov [rdi + 0x20*16 + 8], rax
    lidt [rip + idtr]
    mov dx, 0x40
    mov ax, 1000
    out dx, ax
    sti
1:  hlt
    cmp [rip + ticks], r12
    jb 1b
    mov al, 0
    out 0xf4, al
    jmp .
timer:
    push rax
    inc qword ptr [rip + ticks]
    mov al, 0x20
    out 0x20, al
    pop rax
    iretq
    .balign 8
ticks: .quad 0
idtr:
    .word 4095
    .quad idt
    .balign 4096
idt: .fill 4096, 1, 0
    .fill 4096, 1, 0
stack_top:
