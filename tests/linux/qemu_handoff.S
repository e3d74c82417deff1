/*
 * A multiboot "boot loader" that hands a machine prepared by pyhv's Linux loader to the
 * kernel under QEMU, so QEMU's CPU checks pyhv's boot_params, page tables, GDT and entry
 * state independently of pyhv's engines (tests/linux/test_linux_handoff.py).
 *
 * QEMU loads this 32-bit ELF at 256 MiB (-kernel) and each memory chunk pyhv wrote as a
 * multiboot module (-initrd "FILE HEXADDR,..."). In 32-bit protected mode, paging off:
 *   1. copy every module to the address its command line ends with (hex, no "0x");
 *   2. load pyhv's GDTR, CR4, CR3, EFER.LME, CR0 (PE|PG...): long mode, compat first;
 *   3. far-jump to pyhv's 64-bit code selector, load the data selector, RSI, RSP, and
 *      jump to pyhv's entry RIP.
 * The symbols CR4 CR3 EFER CR0 CS DS RSI RSP RIP GDT_LIMIT GDT_BASE come from
 * `as --defsym`: the CpuState pyhv returned. The code after long64 runs in 64-bit mode;
 * its instructions (mov imm32 to a register, mov to a segment register, jmp *reg)
 * encode the same in 32-bit and 64-bit mode, so one 32-bit assembly serves both.
 */
    .text
    .code32
    .globl _start
    .align 4
mb_header:
    .long 0x1BADB002
    .long 0x00000001
    .long -(0x1BADB002 + 0x00000001)
_start:
    cli
    mov 20(%ebx), %ebp
    mov 24(%ebx), %ebx
next:                         /* 1: ebx = module list, ebp = modules left */
    test %ebp, %ebp
    jz modules_done
    mov 8(%ebx), %esi
    xor %edi, %edi
parse:
    movzbl (%esi), %eax
    inc %esi
    test %eax, %eax
    jz parsed
    cmp $0x20, %eax
    jne 1f
    xor %edi, %edi
    jmp parse
1:  sub $0x30, %eax
    cmp $9, %eax
    jbe 2f
    sub $0x27, %eax
2:  shl $4, %edi
    or %eax, %edi
    jmp parse
parsed:
    mov 0(%ebx), %esi
    mov 4(%ebx), %ecx
    sub %esi, %ecx
    cld
    rep movsb
    add $16, %ebx
    dec %ebp
    jmp next
modules_done:                 /* 2: enter long mode as pyhv's CpuState says */
    lgdt gdtr
    mov $CR4, %eax
    mov %eax, %cr4
    mov $CR3, %eax
    mov %eax, %cr3
    mov $0xC0000080, %ecx
    rdmsr
    or $EFER, %eax
    wrmsr
    mov %cr0, %eax
    or $CR0, %eax
    mov %eax, %cr0
    ljmp $CS, $long64
long64:                       /* 3: 64-bit mode from here on */
    mov $DS, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov %eax, %fs
    mov %eax, %gs
    mov $RSI, %esi
    mov $RSP, %esp
    mov $RIP, %eax
    jmp *%eax
    .align 4
gdtr:
    .word GDT_LIMIT
    .long GDT_BASE
