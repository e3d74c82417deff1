/*
 * emu test guest: 16-bit real mode, a flat image entered at 0000:7c00 (pyhv's flat
 * loader). INT 0x30 through the IVT ("I"), #DE through the IVT ("D", the handler skips
 * the 2-byte DIV), then the 8254 on IRQ 0 through the 8259 (vector 0x20) wakes HLT
 * twice ("T2"). Ends with "R" and debug-exit 0.
 */
#include "pc.inc"
    .intel_syntax noprefix
    .code16
    .text
    .globl start
start:
    cli
    xor ax, ax
    mov ds, ax
    mov word ptr [0x30*4], offset int30
    mov word ptr [0x30*4+2], 0
    mov word ptr [0], offset de_handler
    mov word ptr [2], 0
    mov word ptr [0x20*4], offset timer
    mov word ptr [0x20*4+2], 0
    int 0x30
    xor cx, cx
    xor dx, dx
    mov ax, 5
    div cx
    pic_init
    pit_1khz
    sti
1:  hlt
    cmp word ptr [ticks], 2
    jb 1b
    cli
    outc 'T'
    mov al, '0'
    add al, byte ptr [ticks]
    putc_al
    outc 'R'
    mov al, 0
    exit_al
2:  jmp 2b

int30:
    outc 'I'
    iret

de_handler:
    push bp
    mov bp, sp
    add word ptr [bp + 2], 2
    pop bp
    outc 'D'
    iret

timer:
    push ax
    inc word ptr cs:[ticks]
    eoi
    pop ax
    iret

ticks: .word 0
