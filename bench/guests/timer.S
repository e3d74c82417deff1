/*
 * timer: the timer-interrupt guest of bench/emu_bench.py, on the machine's own 8259 PIC,
 * 8254 PIT and MC146818 RTC (the same models Linux uses on pyhv; QEMU's on QEMU).
 *
 * A multiboot v1 kernel (32-bit protected mode): it builds an IDT (vector 0x20 = the
 * timer handler, the others report an unexpected exception and exit with 0x7d),
 * initialises the PIC pair (ICW1-ICW4, vector bases 0x20/0x28, only IRQ 0 unmasked),
 * programs PIT counter 0 in mode 2 with count 1193 (1193182 Hz / 1193 = 1000.2 Hz) and
 * sleeps in `sti; hlt`; the handler counts, sends a non-specific EOI and IRETs. Then:
 *
 *   -DRATE=1   the rate in guest time: it waits for an RTC seconds edge (reading the
 *              RTC's seconds after each tick), counts ticks over the next 2 RTC seconds
 *              and prints   "rate: 00000fa0 ticks in 2 s of RTC time"
 *   -DTICKS=N  the cost: N ticks, HLT-woken only (no other I/O), timed with RDTSC and
 *              printed as   "ticks: 000003e8 in 00000000000f4240 TSC cycles"
 *
 * and ends through isa-debug-exit with 0 (exit status 1 on pyhv and QEMU). Everything is
 * printed on COM1. On pyhv's emu engine guest time is virtual (it jumps ahead while the
 * guest halts), so the TSC cycles are the host's cost of N ticks; on QEMU they are N ms
 * of real time, and the host cost is the process's CPU time (bench/emu_bench.py).
 */
#ifndef TICKS
#define TICKS 1000
#endif
#ifndef RATE
#define RATE 0
#endif
#define COM1        0x3f8
#define PIC1_CMD    0x20
#define PIC1_DATA   0x21
#define PIC2_CMD    0xa0
#define PIC2_DATA   0xa1
#define PIT_CH0     0x40
#define PIT_CMD     0x43
#define PIT_COUNT   1193
#define RTC_INDEX   0x70
#define RTC_DATA    0x71
    .intel_syntax noprefix
    .code32
    .section .multiboot, "a"
    .align 4
    .long 0x1BADB002, 0, -0x1BADB002

    .text
    .globl start
start:
    mov esp, 0x80000
    /* IDT: 48 32-bit interrupt gates on the current CS */
    xor ecx, ecx
1:  mov eax, offset unexpected
    cmp ecx, 0x20
    jne 2f
    mov eax, offset timer
2:  mov edx, eax
    and edx, 0xffff0000
    or edx, 0x8e00
    and eax, 0xffff
    xor ebx, ebx
    mov bx, cs
    shl ebx, 16
    or eax, ebx
    mov [idt + ecx*8], eax
    mov [idt + ecx*8 + 4], edx
    inc ecx
    cmp ecx, 48
    jb 1b
    lidt [idtr]
    /* PIC: ICW1 (edge, cascade, ICW4), ICW2 vector bases, ICW3 cascade on IRQ 2, ICW4 8086 */
    mov al, 0x11
    out PIC1_CMD, al
    out PIC2_CMD, al
    mov al, 0x20
    out PIC1_DATA, al
    mov al, 0x28
    out PIC2_DATA, al
    mov al, 0x04
    out PIC1_DATA, al
    mov al, 0x02
    out PIC2_DATA, al
    mov al, 0x01
    out PIC1_DATA, al
    out PIC2_DATA, al
    mov al, 0xfe                  /* only IRQ 0 */
    out PIC1_DATA, al
    mov al, 0xff
    out PIC2_DATA, al
    /* PIT counter 0: lobyte/hibyte, mode 2 (rate generator) */
    mov al, 0x34
    out PIT_CMD, al
    mov al, PIT_COUNT & 0xff
    out PIT_CH0, al
    mov al, PIT_COUNT >> 8
    out PIT_CH0, al
    sti
#if RATE
    call rtc_seconds              /* wait for an RTC seconds edge */
    mov bl, al
3:  hlt
    call rtc_seconds
    cmp al, bl
    je 3b
    mov bl, al
    mov esi, [ticks]
    mov ecx, 2                    /* then count ticks over 2 RTC seconds */
4:  hlt
    call rtc_seconds
    cmp al, bl
    je 4b
    mov bl, al
    dec ecx
    jnz 4b
    mov eax, [ticks]
    sub eax, esi
    push eax
    lea esi, msg_rate
    call puts
    pop eax
    call puthex
    lea esi, msg_rate_end
    call puts
#else
    mov esi, [ticks]
    rdtsc
    push edx
    push eax
5:  hlt
    mov eax, [ticks]
    sub eax, esi
    cmp eax, TICKS
    jb 5b
    rdtsc
    pop ecx
    sub eax, ecx
    pop ecx
    sbb edx, ecx
    push eax
    push edx
    lea esi, msg_ticks
    call puts
    mov eax, TICKS
    call puthex
    lea esi, msg_in
    call puts
    pop eax
    call puthex
    pop eax
    call puthex
    lea esi, msg_cycles
    call puts
#endif
    cli
    mov al, 0xff                  /* mask the timer, then debug-exit with 0 */
    out PIC1_DATA, al
    mov al, 0
    out 0xf4, al
6:  hlt
    jmp 6b

timer:
    push eax
    inc dword ptr [ticks]
    mov al, 0x20                  /* non-specific EOI */
    out PIC1_CMD, al
    pop eax
    iret

unexpected:
    lea esi, msg_unexpected
    call puts
    mov al, 0x7d
    out 0xf4, al
7:  hlt
    jmp 7b

/* rtc_seconds: AL = the RTC's seconds byte (BCD or binary: only compared) */
rtc_seconds:
    mov al, 0x00
    out RTC_INDEX, al
    in al, RTC_DATA
    ret

putc:
    push edx
    mov dx, COM1
    out dx, al
    pop edx
    ret

#include "print.inc"

    .section .rodata
msg_rate:       .asciz "rate: "
msg_rate_end:   .asciz " ticks in 2 s of RTC time\n"
msg_ticks:      .asciz "ticks: "
msg_in:         .asciz " in "
msg_cycles:     .asciz " TSC cycles\n"
msg_unexpected: .asciz "unexpected exception\n"

    .data
    .align 8
idtr:
    .word 48 * 8 - 1
    .long idt
ticks:
    .long 0
    .bss
    .align 8
idt:
    .space 48 * 8
