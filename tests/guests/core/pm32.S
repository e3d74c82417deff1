/*
 * pm32: a flat binary entered in real mode at 0:0x7c00 that switches to 32-bit
 * protected mode by itself: its own GDT (flat code 0x08, flat data 0x10), CR0.PE, a far
 * jump to reload CS. In protected mode it checks that it really runs 32-bit code with
 * 4 GiB segments (a write through a data segment above 1 MiB, which real mode cannot
 * reach without help), prints, and ends through debug-exit with 0x10 (status 33).
 *
 *   real mode: switching
 *   Hello from protected mode
 *   CR0=00000011 CS=0008 wrote 0x00200000 ok
 */
#include "guest.h"
    .intel_syntax noprefix
    .code16
    .text
    .globl start
start:
    cli
    xor ax, ax
    mov ds, ax
    mov ss, ax
    mov sp, 0x7c00
    mov si, offset msg_rm
    call puts16
    lgdt [gdtr]
    mov eax, cr0
    or eax, 1                     /* CR0.PE */
    mov cr0, eax
    jmp 0x08:pm_entry             /* loads CS from the new GDT: 32-bit code from here */

#include "serial16.inc"

    .code32
pm_entry:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov esp, 0x7c00
    mov esi, offset msg_pm
    call puts
    mov esi, offset msg_cr0
    call puts
    mov eax, cr0
    and eax, 0x7fffffff           /* PE (bit 0) and ET (bit 4) are what must show */
    and eax, 0x11
    call puthex
    mov esi, offset msg_cs
    call puts
    xor eax, eax
    mov ax, cs
    call puthex16_32
    mov dword ptr [0x200000], 0xc0ffee32
    cmp dword ptr [0x200000], 0xc0ffee32
    jne 1f
    mov esi, offset msg_hi_ok
    jmp 2f
1:  mov esi, offset msg_hi_bad
2:  call puts
    DEBUG_EXIT_WITH(0x10)

/* AX as 4 hex digits, in 32-bit code */
puthex16_32:
    push eax
    push ecx
    push edx
    mov edx, eax
    shl edx, 16
    mov ecx, 4
1:  rol edx, 4
    mov al, dl
    and al, 0x0f
    add al, '0'
    cmp al, '9'
    jbe 2f
    add al, 'a' - '9' - 1
2:  call putc
    loop 1b
    pop edx
    pop ecx
    pop eax
    ret

#include "serial32.inc"

    .align 8
gdt:
    .quad 0                       /* 0x00 null */
    .quad 0x00cf9a000000ffff      /* 0x08 code: base 0, limit 4 GiB, 32-bit, DPL 0 */
    .quad 0x00cf92000000ffff      /* 0x10 data: base 0, limit 4 GiB, writable */
gdt_end:
gdtr:
    .word gdt_end - gdt - 1
    .long gdt

msg_rm:     .asciz "real mode: switching\n"
msg_pm:     .asciz "Hello from protected mode\n"
msg_cr0:    .asciz "CR0="
msg_cs:     .asciz " CS="
msg_hi_ok:  .asciz " wrote 0x00200000 ok\n"
msg_hi_bad: .asciz " write above 1 MiB BAD\n"
