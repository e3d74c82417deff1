/*
 * emu benchmark guest: a CPU-bound multiboot v1 kernel (ELF32, 32-bit protected mode).
 * Runs REPEAT rounds of a sieve of Eratosthenes over 1 MiB at 2 MiB, prints the number
 * of primes below 2^20 (82025 = 0x14069) in hex on port 0xE9, then writes 0 to the
 * isa-debug-exit port 0xF4. Assemble with -DREPEAT=n.
 *
 * Options (the default build is unchanged by them):
 *   -DOUTPORT=0x3f8  print on that port instead of 0xE9 (COM1: `pyhv run` shows it)
 *   -DHOST           a Linux i386 user program with the same sieve code: link with
 *                    -Ttext 0x100000 -Tbss 0x200000 so the array is at the same address;
 *                    prints with write(2), ends with exit(2) (bench/emu_bench.py)
 */
#ifndef REPEAT
#define REPEAT 20
#endif
#if defined(HOST)
#define PUTC call putc
#elif defined(OUTPORT)
#define PUTC push edx; mov dx, OUTPORT; out dx, al; pop edx
#else
#define PUTC out 0xe9, al
#endif
    .intel_syntax noprefix
    .code32
    .text
    .globl start
    .balign 4
    .long 0x1BADB002, 0x00000000, -0x1BADB002
start:
#ifndef HOST
    mov esp, 0x80000
#endif
    mov ebp, REPEAT
round:
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
    dec ebp
    jnz round
    /* print edx in hex */
    mov ecx, 28
4:  mov eax, edx
    shr eax, cl
    and eax, 0xf
    add al, '0'
    cmp al, '9'
    jbe 5f
    add al, 'a' - '9' - 1
5:  PUTC
    sub ecx, 4
    jns 4b
    mov al, '\n'
    PUTC
#ifdef HOST
    mov eax, 1              /* exit(0) */
    xor ebx, ebx
    int 0x80
putc:                       /* write(1, &al, 1), registers kept */
    pusha
    push eax
    mov eax, 4
    mov ebx, 1
    mov ecx, esp
    mov edx, 1
    int 0x80
    pop eax
    popa
    ret
    .bss
    .space 1 << 20          /* the sieve array, linked at 0x200000 */
#else
    mov al, 0
    out 0xf4, al
6:  hlt
    jmp 6b
#endif
