/*
 * realmode: a flat binary, loaded at 0x7c00 and entered in 16-bit real mode with
 * CS:IP = 0:0x7c00 and DL = 0x80, as a BIOS enters a boot sector (pyhv/loader/flat.py).
 * It checks the entry state and real-mode segment arithmetic (linear = seg * 16 + off)
 * and prints what it found, then halts with interrupts off (pyhv exits 0).
 *
 *   Hello from real mode
 *   CS=0000 IP=7c00 DL=0080
 *   segments ok
 */
#include "guest.h"
    .intel_syntax noprefix
    .code16
    .text
    .globl start
start:
    cli
    mov bx, cs                    /* keep CS and DL before anything clobbers them */
    mov di, dx
    call 1f                       /* IP of label 1, as the CPU sees it */
1:  pop bp
    sub bp, offset 1b - start     /* = the entry IP */
    xor ax, ax
    mov ds, ax
    mov ss, ax
    mov sp, 0x7c00
    mov si, offset msg_hello
    call puts16
    mov si, offset msg_cs
    call puts16
    mov ax, bx
    call puthex16
    mov si, offset msg_ip
    call puts16
    mov ax, bp
    call puthex16
    mov si, offset msg_dl
    call puts16
    mov ax, di
    and ax, 0xff
    call puthex16
    mov al, '\n'
    call putc16

    /* The same byte seen through two segment:offset pairs: 0x1000:0x0234 and
     * 0x1023:0x0004 both name linear 0x10234. */
    mov ax, 0x1000
    mov es, ax
    mov byte ptr es:[0x0234], 0x5a
    mov ax, 0x1023
    mov fs, ax
    cmp byte ptr fs:[0x0004], 0x5a
    jne 2f
    mov si, offset msg_seg_ok
    jmp 3f
2:  mov si, offset msg_seg_bad
3:  call puts16
    cli
4:  hlt
    jmp 4b

#include "serial16.inc"

msg_hello:   .asciz "Hello from real mode\n"
msg_cs:      .asciz "CS="
msg_ip:      .asciz " IP="
msg_dl:      .asciz " DL="
msg_seg_ok:  .asciz "segments ok\n"
msg_seg_bad: .asciz "segments BAD\n"
