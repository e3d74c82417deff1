/*
 * user64: a multiboot v1 guest that enters 64-bit long mode itself and drops to CPL 3
 * with IOPL 3, so its work runs where KVM-PVM runs guest code natively (64-bit, CPL 3,
 * paging on) instead of in KVM's instruction emulator (all CPL 0 code). The same image
 * boots under pyhv (multiboot loader) and `qemu-system-x86_64 -kernel`.
 *
 * CPL 0 part (emulated under KVM-PVM, a few dozen instructions): identity paging of the
 * first 1 GiB with 2 MiB user pages, PAE, EFER.LME, CR0.PG, a far jump to a 64-bit
 * code segment, then IRETQ to CPL 3 with RFLAGS.IOPL = 3 and IF = 0. Under this host's
 * KVM-PVM, IRETQ from long-mode CPL 0 to CPL 3 works (docs/host.md's "IRET fails" is about
 * other IRETs); a far return (RETFQ) to CPL 3 is an emulation failure. SYSEXIT with
 * REX.W also works under KVM-PVM, but QEMU's TCG with an AMD CPU model raises #UD for
 * it in long mode (as AMD hardware does), so IRETQ it is: one image for every peer.
 *
 * CPL 3 part, chosen at build time:
 *   -DPIO -DCOUNT=N   N writes of AL to port 0x80 (IOPL 3: each one a port-I/O exit),
 *                     then debug-exit with 0 (status 1)
 *   -DCPU -DITERS=N   the loop of cpuloop.inc for N iterations, then debug-exit with
 *                     the checksum's low 7 bits (status (v << 1) | 1)
 *   -DSPIN -DITERS=N  forever: the loop of cpuloop.inc for N iterations (a chunk), then
 *                     its chunk counter (32 bits) to port 0x80: one exit per chunk, so
 *                     the VMM's count of port 0x80 writes is the guest's own progress
 *                     (`pyhv bench sched`, pyhv.benchsched)
 * Why no console output at CPL 3: under KVM-PVM, IN/OUT at CPL 3 with IOPL 3 reach the
 * VMM for low ports (0x61, 0x80, 0xf4, up to at least 0x300) but fault (a triple fault
 * here, no IDT) for COM1 (0x3f8) and other ports from about 0x3f0 up; and a SYSCALL
 * back to CPL 0 does not enter KVM's emulator: the handler runs with CS reading 0x33
 * and the same ports fault. So results travel in the exit status and in wall time.
 * Interrupts stay off throughout (IF=0 from the multiboot entry).
 * Build: gcc -m32 -c -DPIO -DCOUNT=N user64.S; ld -m elf_i386 -T bench.ld
 */
#define KERNEL_CS   0x08
#define KERNEL_DS   0x10
#define MSR_EFER    0xc0000080
#define USER_CS     (0x18 | 3)
#define USER_DS     (0x20 | 3)

    .intel_syntax noprefix
    .section .multiboot, "a"
    .align 4
    .long 0x1BADB002, 0, -0x1BADB002

    .text
    .code32
    .globl start
start:
    mov esp, offset kstack_top
    /* PD: 512 x 2 MiB pages, P | RW | US | PS; PDPT[0] -> PD; PML4[0] -> PDPT */
    mov edi, offset pd
    mov eax, 0x87
    xor ecx, ecx
1:  mov [edi + ecx*8], eax
    mov dword ptr [edi + ecx*8 + 4], 0
    add eax, 0x200000
    inc ecx
    cmp ecx, 512
    jb 1b
    mov dword ptr [pdpt], offset pd + 7
    mov dword ptr [pml4], offset pdpt + 7
    mov eax, offset pml4
    mov cr3, eax
    mov eax, cr4
    or eax, 0x20                  /* PAE */
    mov cr4, eax
    mov ecx, MSR_EFER
    rdmsr
    or eax, 0x100                 /* LME */
    wrmsr
    mov eax, cr0
    or eax, 0x80000001            /* PG | PE */
    mov cr0, eax
    lgdt [gdtr]
    ljmp KERNEL_CS, offset long_entry

    .code64
long_entry:
    mov ax, KERNEL_DS
    mov ds, ax
    mov es, ax
    mov ss, ax
    lea rax, [rip + ustack_top]
    push USER_DS                  /* SS */
    push rax                      /* RSP */
    push 0x3002                   /* RFLAGS: IOPL 3, IF 0 */
    push USER_CS                  /* CS */
    lea rax, [rip + user_entry]
    push rax                      /* RIP */
    iretq

/* ------------------------------------------------------------------ CPL 3 */
user_entry:
#if defined(PIO)
    mov ecx, COUNT
    xor eax, eax
1:  out 0x80, al
    dec ecx
    jnz 1b
#elif defined(CPU)
    mov rdi, ITERS
    call cpuloop
    mov eax, edx                  /* the checksum's low 7 bits become the exit value */
    and eax, 0x7f
    out 0xf4, al
    ud2
#elif defined(SPIN)
    xor r12d, r12d                /* the guest's work counter: chunks done */
2:  mov rdi, ITERS
    call cpuloop
    inc r12
    mov eax, r12d
    out 0x80, eax                 /* progress report: one exit per chunk, the count in EAX */
    jmp 2b
#else
#error "build with -DPIO, -DCPU or -DSPIN"
#endif
    xor eax, eax
    out 0xf4, al
    ud2                           /* not reached */

#if defined(CPU) || defined(SPIN)
#include "cpuloop.inc"
#endif

    .data
    .align 16
gdt:
    .quad 0                       /* 0x00 null */
    .quad 0x00af9a000000ffff      /* 0x08 kernel code: L=1, DPL 0 */
    .quad 0x00cf92000000ffff      /* 0x10 kernel data */
    .quad 0x00affa000000ffff      /* 0x18 user code: L=1, DPL 3 */
    .quad 0x00cff2000000ffff      /* 0x20 user data: DPL 3 */
gdt_end:
    .align 8
gdtr:
    .word gdt_end - gdt - 1
    .long gdt

    .bss
    .align 4096
pml4: .skip 4096
pdpt: .skip 4096
pd:   .skip 4096
    .align 16
kstack: .skip 4096
kstack_top:
ustack: .skip 8192
ustack_top:
