/*
 * sieve: the CPU-bound guest of bench/emu_bench.py, timing its own rounds.
 *
 * A multiboot v1 kernel (32-bit protected mode, paging off) that runs ROUNDS rounds of a
 * sieve of Eratosthenes over 1 MiB at 2 MiB and prints, on COM1 (what `pyhv run` and
 * `qemu -serial stdio` show):
 *
 *   sieve: ROUNDS rounds
 *   round 0000000000a1b2c3          one line per round: TSC cycles of that round (hex)
 *   ...
 *   primes 00014069                 primes below 2^20 (82025), checked by the bench
 *
 * then ends through isa-debug-exit (port 0xf4) with 0: exit status 1 on pyhv and QEMU.
 * Each round is timed with RDTSC around the sieve alone (printing is outside): pyhv's
 * emu engine (unicorn) and QEMU's TCG both return the host's TSC, so the same binary
 * measures host cycles per round on both, with start-up, loading and the first round's
 * translation visible separately.
 *
 * -DHOST builds a static Linux i386 program with the same sieve code at the same
 * addresses (link with -Ttext 0x100000 -Tbss 0x200000): CPL 3 under the host's paging,
 * write(2)/exit(2) instead of the ports, the native reference.
 *
 * Registers in a round: EBX, EAX, ECX, EDX, EDI (sieve), EBP rounds left; the round's
 * start TSC is kept on the stack.
 */
#ifndef ROUNDS
#define ROUNDS 10
#endif
#define COM1 0x3f8
    .intel_syntax noprefix
    .code32
#ifndef HOST
    .section .multiboot, "a"
    .align 4
    .long 0x1BADB002, 0, -0x1BADB002
#endif
    .text
    .globl start
start:
#ifndef HOST
    mov esp, 0x80000
#endif
    lea esi, msg_head
    call puts
    mov eax, ROUNDS
    call putdec
    lea esi, msg_rounds
    call puts
    mov ebp, ROUNDS
round:
    rdtsc
    push edx
    push eax
    /* clear the sieve */
    mov edi, 0x200000
    mov ecx, (1 << 20) / 4
    xor eax, eax
    rep stosd
    /* mark composites */
    mov ebx, 2
outer:
    mov eax, ebx
    imul eax, ebx
    cmp eax, 1 << 20
    jae count
    cmp byte ptr [0x200000 + ebx], 0
    jne next
1:  mov byte ptr [0x200000 + eax], 1
    add eax, ebx
    cmp eax, 1 << 20
    jb 1b
next:
    inc ebx
    jmp outer
count:
    xor edx, edx
    mov ecx, 2
2:  cmp byte ptr [0x200000 + ecx], 0
    jne 3f
    inc edx
3:  inc ecx
    cmp ecx, 1 << 20
    jb 2b
    mov ebx, edx                  /* the count */
    rdtsc
    pop ecx
    sub eax, ecx
    pop ecx
    sbb edx, ecx
    push ebx
    push eax
    push edx
    lea esi, msg_round
    call puts
    pop eax
    call puthex                   /* high half */
    pop eax
    call puthex                   /* low half */
    mov al, '\n'
    call putc
    pop edx
    dec ebp
    jnz round
    lea esi, msg_primes
    call puts
    mov eax, edx
    call puthex
    mov al, '\n'
    call putc
#ifdef HOST
    mov eax, 1                    /* exit(0) */
    xor ebx, ebx
    int 0x80
#else
    mov al, 0
    out 0xf4, al
4:  hlt
    jmp 4b
#endif

/* putc: AL to the console, registers kept */
putc:
#ifdef HOST
    pusha
    push eax
    mov eax, 4                    /* write(1, esp, 1) */
    mov ebx, 1
    mov ecx, esp
    mov edx, 1
    int 0x80
    pop eax
    popa
#else
    push edx
    mov dx, COM1
    out dx, al
    pop edx
#endif
    ret

#include "print.inc"

/* putdec: EAX in decimal */
putdec:
    push ebx
    push ecx
    push edx
    mov ebx, 10
    xor ecx, ecx
1:  xor edx, edx
    div ebx
    push edx
    inc ecx
    test eax, eax
    jnz 1b
2:  pop eax
    add al, '0'
    call putc
    dec ecx
    jnz 2b
    pop edx
    pop ecx
    pop ebx
    ret

    .section .rodata
msg_head:   .asciz "sieve: "
msg_rounds: .asciz " rounds\n"
msg_round:  .asciz "round "
msg_primes: .asciz "primes "
#ifdef HOST
    .bss
    .space 1 << 20                /* the sieve array, linked at 0x200000 */
#endif
