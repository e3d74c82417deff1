/*
 * emu test guest: 32-bit protected mode, flat segments, no paging: a multiboot image
 * (pyhv enters it in flat protected mode at 1 MiB). Loads its own GDT (kernel/user code
 * and data, a 32-bit TSS) and IDT (32-bit gates), then:
 *   #DE and #GP(0x1230) through interrupt gates      -> "V0/0/0 Vd/1230/0 "
 *   IRET to CPL 3, INT 0x80 from CPL 3 through a DPL 3 trap gate, with the stack
 *   switched to the TSS's SS0:ESP0                    -> "V80/0/3 K "
 *   HLT woken twice by the 8254 on IRQ 0 through the 8259 (vector 0x20) -> "T2"
 * Ends through debug-exit 0.
 */
#include "guest.h"
#include "pc.inc"
    .intel_syntax noprefix
    MULTIBOOT_HEADER

    .text
    .code32
    .globl start

start:
    lgdt [gdtr]
    ljmp 0x08, offset 1f
1:  mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov esp, offset kstack_top
    /* TSS descriptor base */
    mov eax, offset tss
    mov word ptr [gdt_tss + 2], ax
    shr eax, 16
    mov byte ptr [gdt_tss + 4], al
    mov byte ptr [gdt_tss + 7], ah
    mov dword ptr [tss + 4], offset kstack0_top
    mov dword ptr [tss + 8], 0x10
    mov ax, 0x28
    ltr ax
    /* IDT */
    mov ecx, 0
2:  mov eax, [handlers + ecx*4]
    test eax, eax
    jz 3f
    mov edx, eax
    and edx, 0xffff
    or edx, 0x00080000
    mov [idt + ecx*8], edx
    and eax, 0xffff0000
    or eax, 0x8e00                /* present, DPL 0, 32-bit interrupt gate */
    cmp ecx, 0x80
    jne 4f
    or eax, 0x6f00                /* DPL 3, trap gate (0xef00) */
4:  mov [idt + ecx*8 + 4], eax
3:  inc ecx
    cmp ecx, 256
    jb 2b
    lidt [idtr]

    mov edi, offset 1f
    xor ecx, ecx
    xor edx, edx
    mov eax, 9
    div ecx
1:  mov edi, offset 1f
    mov ax, 0x1230
    mov ds, ax
1:  mov ax, 0x10
    mov ds, ax
    mov [kernel_esp], esp
    push 0x23
    push offset ustack_top
    push 0x2
    push 0x1b
    push offset user_entry
    iret

user_entry:
    int 0x80
    jmp .

back_in_kernel:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov esp, [kernel_esp]
    pic_init
    pit_1khz
    sti
1:  hlt
    cmp dword ptr [ticks], 2
    jb 1b
    cli
    outc 'T'
    mov al, '0'
    add al, byte ptr [ticks]
    putc_al
    mov al, 0
    exit_al
    jmp .

.macro HANDLER vec, err
h\vec:
    .if \err == 0
    push 0
    .endif
    push \vec
    jmp common
.endm
HANDLER 0, 0
HANDLER 13, 1
HANDLER 0x80, 0

/* stack: vec, err, eip, cs, eflags [, esp, ss] */
common:
    push eax
    outc 'V'
    mov eax, [esp + 4]
    call puthex
    outc '/'
    mov eax, [esp + 8]
    call puthex
    outc '/'
    mov eax, [esp + 16]
    and eax, 3
    call puthex
    outc ' '
    cmp dword ptr [esp + 4], 0x80
    jne 1f
    mov eax, offset kstack0_top
    sub eax, esp
    cmp eax, 0x40
    ja 2f
    outc 'K'
    outc ' '
2:  jmp back_in_kernel
1:  mov [esp + 12], edi
    pop eax
    add esp, 8
    iret

timer:
    push eax
    inc dword ptr [ticks]
    eoi
    pop eax
    iret

puthex:                           /* eax, no leading zeros */
    push ecx
    push ebx
    push edx
    mov ebx, eax
    mov ecx, 28
    xor edx, edx
1:  mov eax, ebx
    shr eax, cl
    and eax, 0xf
    test edx, edx
    jnz 2f
    test eax, eax
    jnz 2f
    test ecx, ecx
    jnz 3f
2:  mov edx, 1
    cmp al, 10
    jb 4f
    add al, 'a' - 10 - '0'
4:  add al, '0'
    putc_al
3:  sub ecx, 4
    jns 1b
    pop edx
    pop ebx
    pop ecx
    ret

    .balign 8
handlers:
    .long h0
    .fill 12, 4, 0
    .long h13
    .fill 0x20 - 14, 4, 0
    .long timer
    .fill 0x80 - 0x21, 4, 0
    .long h0x80
    .fill 255 - 0x80, 4, 0
gdt:
    .quad 0
    .quad 0x00cf9a000000ffff      /* 0x08 code 32 DPL 0 */
    .quad 0x00cf92000000ffff      /* 0x10 data DPL 0 */
    .quad 0x00cffa000000ffff      /* 0x18 code 32 DPL 3 */
    .quad 0x00cff2000000ffff      /* 0x20 data DPL 3 */
gdt_tss:
    .quad 0x0000890000000067      /* 0x28 32-bit TSS (base filled in) */
gdt_end:
gdtr:
    .word gdt_end - gdt - 1
    .long gdt
idtr:
    .word 256*8 - 1
    .long idt
kernel_esp: .long 0
ticks:      .long 0
    .balign 16
tss:
    .fill 104, 1, 0
    .balign 4096
idt:
    .fill 2048, 1, 0
    .fill 4096, 1, 0
kstack_top:
    .fill 4096, 1, 0
kstack0_top:
    .fill 4096, 1, 0
ustack_top:
