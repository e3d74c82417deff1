/*
 * fwcfg: a multiboot guest that reads QEMU's fw_cfg through its traditional I/O
 * interface (selector 0x510, 16-bit write; data 0x511, byte reads, little-endian items)
 * and prints the items pyhv provides (pyhv/devices/fwcfg.py), with the memory the
 * multiboot information reports next to them, then ends through debug-exit with 0x11
 * (status 35):
 *
 *   signature: QEMU
 *   id: 00000001                  (bit 0: traditional interface; no DMA)
 *   cpus: 1
 *   ram: 0000000008000000         (bytes, the --mem size)
 *   mem_upper: 130048 KiB         (multiboot: KiB above 1 MiB)
 */
#include "guest.h"
    .intel_syntax noprefix
    MULTIBOOT_HEADER

#define FW_CFG_SELECTOR  0x510
#define FW_CFG_DATA      0x511
#define FW_CFG_SIGNATURE 0x0000
#define FW_CFG_ID        0x0001
#define FW_CFG_RAM_SIZE  0x0003
#define FW_CFG_NB_CPUS   0x0005

    .text
    .code32
    .globl start
start:
    mov esp, offset stack_top
    mov ebp, ebx                  /* the multiboot information */

    mov esi, offset msg_sig
    call puts
    mov ax, FW_CFG_SIGNATURE
    call select
    mov ecx, 4
1:  call getb
    call putc
    loop 1b

    mov esi, offset msg_id
    call puts
    mov ax, FW_CFG_ID
    call select
    call get32
    call puthex

    mov esi, offset msg_cpus
    call puts
    mov ax, FW_CFG_NB_CPUS
    call select
    call getb
    movzx edx, al
    call getb
    movzx eax, al
    shl eax, 8
    or eax, edx
    call putdec

    mov esi, offset msg_ram
    call puts
    mov ax, FW_CFG_RAM_SIZE
    call select
    call get32
    mov ebx, eax                  /* low half */
    call get32                    /* high half */
    call puthex
    mov eax, ebx
    call puthex

    mov esi, offset msg_upper
    call puts
    mov eax, [ebp + 8]            /* mem_upper, KiB */
    call putdec
    mov esi, offset msg_kib
    call puts
    DEBUG_EXIT_WITH(0x11)

/* select: AX = fw_cfg key */
select:
    push edx
    mov dx, FW_CFG_SELECTOR
    out dx, ax
    pop edx
    ret

/* getb: AL = next byte of the selected item */
getb:
    push edx
    mov dx, FW_CFG_DATA
    in al, dx
    pop edx
    ret

/* get32: EAX = next 4 bytes, little-endian */
get32:
    push ecx
    push edx
    xor edx, edx
    mov ecx, 4
1:  call getb
    ror edx, 8
    mov dl, al                    /* collects bytes low first, rotated into place */
    loop 1b
    ror edx, 8
    mov eax, edx
    pop edx
    pop ecx
    ret

#include "serial32.inc"

    .section .rodata
msg_sig:   .asciz "signature: "
msg_id:    .asciz "\nid: "
msg_cpus:  .asciz "\ncpus: "
msg_ram:   .asciz "\nram: "
msg_upper: .asciz "\nmem_upper: "
msg_kib:   .asciz " KiB\n"

    .bss
    .align 16
    .skip 4096
stack_top:
