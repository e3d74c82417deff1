/*
 * emu test guest: 16-bit real mode, linked at 0 and loaded at 0x10000 (CS=0x1000).
 * INT 0x30 through the IVT ("I"), #DE through the IVT ("D", the handler skips the
 * 2-byte DIV), then the harness timer on IRQ 0 (vector 0x20) wakes HLT twice ("T2").
 * Ends with "R" and exit code 0 on port 0xF4.
 */
    .intel_syntax noprefix
    .code16
    .text
    .globl start
start:
    cli
    xor ax, ax
    mov ds, ax
    mov word ptr [0x30*4], offset int30
    mov word ptr [0x30*4+2], 0x1000
    mov word ptr [0], offset de_handler
    mov word ptr [2], 0x1000
    mov word ptr [0x20*4], offset timer
    mov word ptr [0x20*4+2], 0x1000
    mov ax, 0x1000
    mov ds, ax
    int 0x30
    xor cx, cx
    xor dx, dx
    mov ax, 5
    div cx
    mov dx, 0x40
    mov ax, 1000
    out dx, ax
    sti
1:  hlt
    cmp word ptr [ticks], 2
    jb 1b
    cli
    mov al, 'T'
    out 0xe9, al
    mov al, '0'
    add al, byte ptr [ticks]
    out 0xe9, al
    mov al, 'R'
    out 0xe9, al
    mov al, 0
    out 0xf4, al
2:  jmp 2b

int30:
    mov al, 'I'
    out 0xe9, al
    iret

de_handler:
    push bp
    mov bp, sp
    add word ptr [bp + 2], 2
    pop bp
    mov al, 'D'
    out 0xe9, al
    iret

timer:
    push ax
    inc word ptr cs:[ticks]
    mov al, 0x20
    out 0x20, al
    pop ax
    iret

ticks: .word 0
