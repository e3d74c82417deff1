/*
 * pit: timer interrupts through the 8254 PIT and the 8259 PIC, in 32-bit protected
 * mode (multiboot). It
 *   1. builds an IDT: vector 0x20 = the timer handler, vectors 0-31 = "unexpected";
 *   2. initialises the PIC pair (ICW1-ICW4: vector bases 0x20/0x28, cascade on IRQ 2,
 *      8086 mode) and unmasks only IRQ 0 (8259A datasheet, "Initialization Command
 *      Words");
 *   3. programs PIT counter 0 in mode 2 (rate generator) with count 1193, ~1000 Hz
 *      (8254 datasheet, "Control Word Format");
 *   4. waits for TICKS interrupts with "sti; hlt" (HLT with IF=1 must sleep until the
 *      timer wakes it); the handler counts and sends a non-specific EOI (0x20 to 0x20);
 *   5. with IF=0, polls the PIT counter (counter latch command) across two periods:
 *      the tick must stay pending, not delivered; after STI it must be delivered;
 *   6. masks IRQ 0 and ends through debug-exit with 0x13 (status 39).
 *
 *   pit: 1000 Hz, waiting for 50 ticks
 *   ticks=50, hlt woke on the timer
 *   IF=0 held the tick, sti delivered it
 *
 * An exception prints "unexpected exception" and exits with 0x7d (status 251).
 */
#include "guest.h"
    .intel_syntax noprefix
    MULTIBOOT_HEADER

#define TICKS       50
#define PIT_COUNT   1193          /* 1193182 Hz / 1193 = 1000.2 Hz */
#define PIC1_CMD    0x20
#define PIC1_DATA   0x21
#define PIC2_CMD    0xa0
#define PIC2_DATA   0xa1
#define PIC_EOI     0x20
#define PIT_CH0     0x40
#define PIT_CMD     0x43

    .text
    .code32
    .globl start
start:
    mov esp, offset stack_top

    /* 1. IDT: 48 interrupt gates (type 0xE, present, DPL 0) on the current CS */
    xor ecx, ecx
1:  mov eax, offset unexpected
    cmp ecx, 0x20
    jne 2f
    mov eax, offset timer
2:  mov edx, eax
    and edx, 0xffff0000
    or edx, 0x8e00                /* P=1, DPL=0, 32-bit interrupt gate */
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

    /* 2. PIC pair */
    mov al, 0x11                  /* ICW1: edge, cascade, ICW4 needed */
    out PIC1_CMD, al
    out PIC2_CMD, al
    mov al, 0x20                  /* ICW2: vector bases */
    out PIC1_DATA, al
    mov al, 0x28
    out PIC2_DATA, al
    mov al, 0x04                  /* ICW3: slave on IRQ 2 / slave id 2 */
    out PIC1_DATA, al
    mov al, 0x02
    out PIC2_DATA, al
    mov al, 0x01                  /* ICW4: 8086 mode, normal EOI */
    out PIC1_DATA, al
    out PIC2_DATA, al
    mov al, 0xfe                  /* OCW1: only IRQ 0 */
    out PIC1_DATA, al
    mov al, 0xff
    out PIC2_DATA, al

    /* 3. PIT counter 0: mode 2, LSB then MSB, binary */
    mov al, 0x34
    out PIT_CMD, al
    mov al, PIT_COUNT & 0xff
    out PIT_CH0, al
    mov al, PIT_COUNT >> 8
    out PIT_CH0, al
    mov esi, offset msg_start
    call puts

    /* 4. sleep until TICKS timer interrupts have been taken */
wait:
    sti                           /* the STI shadow covers HLT: no wakeup is lost */
    hlt
    cli
    inc dword ptr [wakeups]
    cmp dword ptr [ticks], TICKS
    jb wait
    mov esi, offset msg_ticks
    call puts
    mov eax, [ticks]
    call putdec
    mov eax, [wakeups]            /* each HLT ends on an interrupt: 1 <= wakeups <= ticks */
    test eax, eax
    jz 3f
    cmp eax, [ticks]
    ja 3f
    mov esi, offset msg_hlt_ok
    jmp 4f
3:  mov esi, offset msg_hlt_bad
4:  call puts

    /* 5. interrupts off across two PIT periods: IRQ 0 must wait for STI */
    mov ebx, [ticks]
    call wait_reload
    call wait_reload
    cmp [ticks], ebx
    jne 5f
    sti
    nop                           /* delivered after the STI shadow, by here */
    nop
    cli
    cmp [ticks], ebx
    je 6f
    mov esi, offset msg_if_ok
    jmp 7f
5:  mov esi, offset msg_if_leak
    jmp 7f
6:  mov esi, offset msg_if_lost
7:  call puts

    /* 6. quiet the timer and leave */
    mov al, 0xff
    out PIC1_DATA, al
    DEBUG_EXIT_WITH(0x13)

/* Wait until PIT counter 0 reloads (its count goes up instead of down). */
wait_reload:
    push eax
    push ecx
    call read_count
    mov ecx, eax
1:  call read_count
    cmp eax, ecx
    mov ecx, eax
    jbe 1b
    pop ecx
    pop eax
    ret

/* EAX = PIT counter 0's current count (counter latch command, then LSB, MSB) */
read_count:
    mov al, 0x00
    out PIT_CMD, al
    in al, PIT_CH0
    mov ah, al
    in al, PIT_CH0
    xchg al, ah
    movzx eax, ax
    ret

timer:
    push eax
    inc dword ptr [ticks]
    mov al, PIC_EOI
    out PIC1_CMD, al
    pop eax
    iretd

unexpected:
    mov esi, offset msg_unexpected
    call puts
    DEBUG_EXIT_WITH(0x7d)

#include "serial32.inc"

    .section .rodata
msg_start:      .asciz "pit: 1000 Hz, waiting for 50 ticks\n"
msg_ticks:      .asciz "ticks="
msg_hlt_ok:     .asciz ", hlt woke on the timer\n"
msg_hlt_bad:    .asciz ", hlt BAD (did not sleep)\n"
msg_if_ok:      .asciz "IF=0 held the tick, sti delivered it\n"
msg_if_leak:    .asciz "IF=0 BAD: a tick was delivered with interrupts off\n"
msg_if_lost:    .asciz "IF=0 BAD: the pending tick was lost\n"
msg_unexpected: .asciz "unexpected exception\n"

    .data
    .align 8
idtr:
    .word 48 * 8 - 1
    .long idt
ticks:   .long 0
wakeups: .long 0

    .bss
    .align 8
idt: .skip 48 * 8
    .align 16
    .skip 4096
stack_top:
