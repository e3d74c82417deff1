/*
 * pio32: the port-I/O exit loop at CPL 0 in 32-bit protected mode (multiboot v1).
 * Writes AL to port 0x80 (no device in pyhv; QEMU's ignore-everything ioport80)
 * COUNT times, then ends through isa-debug-exit (0xf4) with 0: status 1 in pyhv and QEMU.
 * Under KVM-PVM all CPL 0 code runs in KVM's instruction emulator, so the loop's own
 * instructions are emulated too (see user64.S for the native CPL 3 variant).
 * Build: gcc -m32 -c -DCOUNT=N pio32.S; ld -m elf_i386 -T bench.ld
 */
#ifndef COUNT
#define COUNT 10000
#endif
    .intel_syntax noprefix
    .section .multiboot, "a"
    .align 4
    .long 0x1BADB002, 0, -0x1BADB002

    .text
    .code32
    .globl start
start:
    mov ecx, COUNT
    xor eax, eax
1:  out 0x80, al
    dec ecx
    jnz 1b
    xor eax, eax
    out 0xf4, al
    cli
2:  hlt
    jmp 2b
