/* kernel64.h: selectors, ports and counts shared by the trap guests and kernel64.inc. */
#ifndef KERNEL64_H
#define KERNEL64_H
#define KERNEL_CS   0x08
#define KERNEL_DS   0x10
#define PIC1_CMD    0x20
#define PIC1_DATA   0x21
#define PIC2_CMD    0xa0
#define PIC2_DATA   0xa1
#define PIC_EOI     0x20
#define PIT_CH0     0x40
#define PIT_CMD     0x43
#define PIT_COUNT   11932         /* 1193182 Hz / 11932 = 100.0 Hz */
#define N_GATES     48

#ifdef __ASSEMBLER__
/* Set U/S on the entries that map 0..2 MiB (PML4[0], PDPT[0], PD[0]), each a load and
   a MOV store (what shadow paging emulates), then reload CR3: user mode may run there.
   Clobbers rax, rcx, rdx. */
.macro user_low_2mib
    mov rax, cr3
    mov ecx, 3
1:  and rax, ~0xfff
    mov rdx, [rax]
    or rdx, 4
    mov [rax], rdx
    mov rax, rdx
    dec ecx
    jnz 1b
    mov rax, cr3
    mov cr3, rax
.endm
#endif
#endif
