/*
 * emu test guest: 64-bit long mode, an ELF64 image (pyhv's loader enters it in long mode
 * at 1 MiB, RDI = the multiboot-format information structure). It builds its own
 * identity map of the first 4 GiB (2 MiB pages, U/S set, so CPL 3 may use it; the PD of
 * GiB 1, `pd + 0x1000`, is what the #PF scenarios edit), its own GDT (flat CS=0x08,
 * data 0x10) and TSS. The command line (a decimal number) selects the scenario:
 *
 *   0  exceptions handled by guest handlers: #DE, #UD, #GP(sel), #PF (read/write, CR2),
 *      then CPL 3: IRETQ to user, SYSCALL/SYSRETQ (with SWAPGS), INT 0x80 from CPL 3
 *      (stack from TSS.RSP0), #GP from CPL 3 (CLI), then HLT with a periodic timer
 *      interrupt and a busy loop interrupted by it
 *   1  #PF whose IDT gate is not present -> #NP -> #DF on IST1
 *   2  empty IDT: #UD -> #GP -> #DF -> triple fault
 *   3  jump to the MMIO hole (fetch outside RAM)
 *   4  #PF handler stack unmapped -> #DF on IST1
 *   5  MMIO read and write at 0xD0000000
 *   6  CPUID: vendor (leaf 0 EBX) and extended features (0x80000001 EDX)
 *   7  jump to an unmapped linear address: #PF with CR2 = target, handled, resumed
 *   8  user mode (CPL 3, IF=1) spinning until timer interrupts taken at CPL 0 (on the
 *      TSS.RSP0 stack) have counted 3 ticks; then SYSCALL back to the kernel
 *   9  STI shadow: a tick becomes pending while IF=0; "sti; hlt" must let HLT execute
 *      before the interrupt, so HLT returns after that one tick -> "S1"
 *  10  a #GP handler that faults again (#GP) forever: the nested frames overflow the
 *      stack into an unmapped page, the #PF cannot be pushed either -> #DF on IST1
 *
 * The timer is the 8254 on IRQ 0 through the 8259 at vector 0x20, about 1 kHz (pc.inc).
 * Output (COM1): one token per event, e.g. "V0/0/0" = vector 0, error code 0,
 * interrupted CPL 0; #PF adds "/<cr2>". Ends through debug-exit 0.
 */
#include "pc.inc"
    .intel_syntax noprefix
    .code64
    .text
    .globl start

start:
    lea rsp, [rip + kstack_top]
    /* scenario: the decimal number on the multiboot command line (info +16), if any */
    xor r13d, r13d
    test dword ptr [rdi], 1 << 2
    jz 2f
    mov esi, dword ptr [rdi + 16]
1:  movzx eax, byte ptr [rsi]
    sub eax, '0'
    cmp eax, 9
    ja 2f
    imul r13, r13, 10
    add r13, rax
    inc rsi
    jmp 1b
2:  /* page tables: PML4[0] -> PDPT[0..3] -> 4 PDs of 512 2 MiB pages, P|RW|US */
    lea rdi, [rip + pd]
    mov eax, 0x87
    xor ecx, ecx
1:  mov [rdi + rcx*8], rax
    add rax, 0x200000
    inc ecx
    cmp ecx, 4 * 512
    jb 1b
    lea rdi, [rip + pdpt]
    lea rax, [rip + pd]
    or rax, 0x7
    xor ecx, ecx
1:  mov [rdi + rcx*8], rax
    add rax, 0x1000
    inc ecx
    cmp ecx, 4
    jb 1b
    lea rax, [rip + pdpt]
    or rax, 0x7
    mov [rip + pml4], rax
    lea rax, [rip + pml4]
    mov cr3, rax
    /* GDT: fill the TSS descriptor (base = tss) */
    lea rax, [rip + tss]
    mov rbx, rax
    and rbx, 0xffff
    shl rbx, 16
    mov rcx, rax
    shr rcx, 16
    and rcx, 0xff
    shl rcx, 32
    or rbx, rcx
    mov rcx, rax
    shr rcx, 24
    and rcx, 0xff
    shl rcx, 56
    or rbx, rcx
    mov rcx, 0x0000890000000067   /* present, type 9 (available 64-bit TSS), limit 0x67 */
    or rbx, rcx
    mov [rip + gdt_tss], rbx
    mov rcx, rax
    shr rcx, 32
    mov [rip + gdt_tss + 8], rcx
    lgdt [rip + gdtr]
    /* reload CS via far return, data segments */
    lea rax, [rip + 1f]
    push 0x08
    push rax
    retfq
1:  mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov ax, 0x30
    ltr ax
    /* TSS: RSP0 and IST1 */
    lea rax, [rip + kstack0_top]
    mov [rip + tss + 4], rax
    lea rax, [rip + iststack_top]
    mov [rip + tss + 36], rax

    cmp r13, 2
    je scen2
    cmp r13, 10
    jne 1f
    lea rax, [rip + h_recurse]    /* scenario 10: a #GP handler that faults again */
    mov [rip + handlers + 13*8], rax
1:  call build_idt
    lidt [rip + idtr]
    cmp r13, 0
    je scen0
    cmp r13, 1
    je scen1
    cmp r13, 3
    je scen3
    cmp r13, 4
    je scen4
    cmp r13, 5
    je scen5
    cmp r13, 6
    je scen6
    cmp r13, 7
    je scen7
    cmp r13, 8
    je scen8
    cmp r13, 9
    je scen9
    cmp r13, 10
    je scen10
    jmp done

/* ------------------------------------------------------------------ IDT */
build_idt:
    lea rdi, [rip + idt]
    lea rsi, [rip + handlers]
    xor ecx, ecx
2:  mov rax, [rsi + rcx*8]
    test rax, rax
    jz 3f
    mov rdx, rax
    and rdx, 0xffff               /* offset 15:0 */
    mov rbx, 0x08
    shl rbx, 16
    or rdx, rbx
    mov rbx, 0x8e                 /* present, DPL 0, interrupt gate */
    cmp ecx, 0x80
    jne 4f
    mov rbx, 0xee                 /* DPL 3 for int 0x80 */
4:  shl rbx, 40
    or rdx, rbx
    mov rbx, rax
    shr rbx, 16
    and rbx, 0xffff
    shl rbx, 48
    or rdx, rbx
    cmp ecx, 8
    jne 6f
    mov rbx, 1                    /* #DF on IST1 */
    shl rbx, 32
    or rdx, rbx
6:  mov rbx, rcx
    shl rbx, 4
    mov [rdi + rbx], rdx
    shr rax, 32
    mov [rdi + rbx + 8], rax
3:  inc ecx
    cmp ecx, 256
    jb 2b
    ret

/* ------------------------------------------------------------------ scenario 0 */
scen0:
    /* #DE */
    lea r15, [rip + 1f]
    xor ecx, ecx
    xor edx, edx
    mov eax, 7
    div ecx
1:  /* #UD */
    lea r15, [rip + 1f]
    ud2
1:  /* #GP(0x1230): selector beyond the GDT */
    lea r15, [rip + 1f]
    mov ax, 0x1230
    mov ds, ax
1:  mov ax, 0x10
    mov ds, ax
    /* #PF read: unmap 0x40000000 (PD entry 0 of GiB 1) */
    mov qword ptr [rip + pd + 0x1000], 0
    invlpg [0x40000000]
    lea r15, [rip + 1f]
    mov rax, [0x40000000]
1:  /* #PF write to a read-only page: map it back read-only */
    mov qword ptr [rip + pd + 0x1000], 0x40000000 | 0x85
    invlpg [0x40000000]
    mov rax, cr0
    or rax, 0x10000               /* CR0.WP */
    mov cr0, rax
    lea r15, [rip + 1f]
    mov qword ptr [0x40000000], 1
1:  mov qword ptr [rip + pd + 0x1000], 0x40000000 | 0x87
    invlpg [0x40000000]
    outc ' '

    /* ---- user mode: STAR/LSTAR/SFMASK/EFER.SCE/KERNEL_GS_BASE */
    mov ecx, 0xc0000080
    rdmsr
    or eax, 1
    wrmsr
    mov ecx, 0xc0000081           /* STAR: sysret base 0x18, syscall CS 0x08 */
    xor eax, eax
    mov edx, 0x00180008
    wrmsr
    mov ecx, 0xc0000082
    lea rax, [rip + syscall_entry]
    mov rdx, rax
    shr rdx, 32
    wrmsr
    mov ecx, 0xc0000084           /* SFMASK: clear IF, TF, DF */
    mov eax, 0x700
    xor edx, edx
    wrmsr
    mov ecx, 0xc0000102           /* KERNEL_GS_BASE -> kgs_area */
    lea rax, [rip + kgs_area]
    mov rdx, rax
    shr rdx, 32
    wrmsr
    mov [rip + kernel_rsp], rsp
    push 0x23                     /* SS: user data 0x20 | 3 */
    lea rax, [rip + ustack_top]
    push rax
    push 0x002                    /* RFLAGS: IF=0 */
    push 0x2b                     /* CS: user code 0x28 | 3 */
    lea rax, [rip + user_entry]
    push rax
    iretq

user_entry:
    mov ax, cs
    and eax, 3
    add al, '0'
    mov bl, al                    /* no OUT at CPL 3: the kernel prints it later */
    mov [rip + user_cpl], bl
    mov eax, 42
    syscall                       /* -> syscall_entry, back with rax = 43 */
    mov [rip + sys_ret], rax
    int 0x80                      /* DPL 3 gate, stack switch to RSP0 */
    mov r14, 0x5a                 /* tell the #GP handler to go back to the kernel */
    cli                           /* #GP(0) at CPL 3 */
    jmp .                         /* not reached */

syscall_entry:
    swapgs
    mov rax, gs:[0]               /* kgs_area magic */
    mov [rip + kgs_seen], rax
    swapgs
    mov ax, cs
    and eax, 3
    add al, '0'
    mov [rip + sys_cpl], al
    mov rax, 43
    sysretq

back_in_kernel:
    mov rsp, [rip + kernel_rsp]
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    outc ' '
    outc 'U'
    mov al, [rip + user_cpl]
    putc_al
    outc 'S'
    mov al, [rip + sys_cpl]
    putc_al
    outc 'R'
    mov rax, [rip + sys_ret]
    call puthex
    outc 'G'
    mov rax, [rip + kgs_seen]
    call puthex
    outc ' '

    /* ---- timer: ~1 ms period, HLT until 3 ticks, then busy-wait until 6 */
    pic_init
    pit_1khz
    sti
1:  hlt
    cmp qword ptr [rip + ticks], 3
    jb 1b
    outc 'H'
2:  cmp qword ptr [rip + ticks], 6
    jb 2b
    cli
    outc 'B'
    mov rax, [rip + ticks]
    call puthex
    jmp done

/* ------------------------------------------------------------------ scenarios 1-5 */
scen1:
    /* make the #PF gate not present */
    lea rdi, [rip + idt]
    mov rax, [rdi + 14*16]
    btr rax, 47
    mov [rdi + 14*16], rax
    mov qword ptr [rip + pd + 0x1000], 0
    invlpg [0x40000000]
    mov rax, [0x40000000]
    jmp done

scen2:
    lidt [rip + idtr_empty]
    ud2
    jmp done

scen3:
    mov rax, 0xd0000000
    jmp rax

scen4:
    mov qword ptr [rip + pd + 0x1000], 0     /* unmap GiB 1 ... */
    invlpg [0x40000000]
    mov rsp, 0x40001000           /* ... and put the stack there */
    mov rax, [0x40000000]         /* #PF, whose frame push faults -> #DF (IST1) */
    jmp done

scen5:
    mov rax, 0xd0000000
    mov ebx, [rax]
    mov rax, rbx
    call puthex
    mov rax, 0xd0000010
    mov dword ptr [rax], 0x12345678
    jmp done

scen6:
    xor eax, eax
    cpuid
    mov eax, ebx
    call puthex
    outc ' '
    mov eax, 0x80000001
    cpuid
    mov eax, edx
    call puthex
    jmp done

scen7:
    mov qword ptr [rip + pd + 0x1000], 0
    invlpg [0x40000000]
    lea r15, [rip + 1f]
    mov rax, 0x40000000
    jmp rax
1:  outc '!'
    jmp done

scen8:
    mov ecx, 0xc0000080           /* EFER.SCE, STAR, LSTAR = scen8_sys, SFMASK = IF */
    rdmsr
    or eax, 1
    wrmsr
    mov ecx, 0xc0000081
    xor eax, eax
    mov edx, 0x00180008
    wrmsr
    mov ecx, 0xc0000082
    lea rax, [rip + scen8_sys]
    mov rdx, rax
    shr rdx, 32
    wrmsr
    mov ecx, 0xc0000084
    mov eax, 0x200
    xor edx, edx
    wrmsr
    mov [rip + kernel_rsp], rsp
    pic_init                      /* ~1 ms timer */
    pit_1khz
    push 0x23
    lea rax, [rip + ustack_top]
    push rax
    push 0x202                    /* IF=1 at CPL 3 */
    push 0x2b
    lea rax, [rip + scen8_user]
    push rax
    iretq
scen8_user:
    cmp qword ptr [rip + ticks], 3
    jb scen8_user
    syscall
scen8_sys:                        /* CPL 0, IF=0 (SFMASK) */
    mov rsp, [rip + kernel_rsp]
    outc 'T'
    mov rax, [rip + ticks_user]
    call puthex
    outc '/'
    mov rax, [rip + ticks_rsp0]
    call puthex
    jmp done

scen9:
    pic_init                      /* ~1 ms timer, then spin with IF=0 past the first tick */
    pit_1khz
    mov ecx, 400000
1:  dec ecx
    jnz 1b
    sti
    hlt
    cli
    outc 'S'
    mov rax, [rip + ticks]
    call puthex
    jmp done

scen10:
    mov qword ptr [rip + pd + 0x1000], 0     /* 0x40000000-0x401fffff unmapped; 0x40200000 -> RAM */
    mov qword ptr [rip + pd + 0x1008], 0x600000 | 0x83
    invlpg [0x40000000]
    invlpg [0x40200000]
    mov rsp, 0x40201000
    mov ax, 0x1230
    mov ds, ax                    /* #GP -> h_recurse -> #GP -> ... */
    jmp done

h_recurse:
    mov ax, 0x1230
    mov ds, ax
    jmp h_recurse

done:
    mov al, 0
    exit_al
    jmp done

/* ------------------------------------------------------------------ handlers */
.macro HANDLER vec, err
h\vec:
    .if \err == 0
    push 0
    .endif
    push \vec
    jmp common
.endm

HANDLER 0, 0
HANDLER 6, 0
HANDLER 8, 1
HANDLER 13, 1
HANDLER 14, 1
HANDLER 0x80, 0

/* stack: vec, err, rip, cs, rflags, rsp, ss */
common:
    push rax
    push rdx
    outc 'V'
    mov rax, [rsp + 16]
    call puthex
    outc '/'
    mov rax, [rsp + 24]
    call puthex
    outc '/'
    mov rax, [rsp + 40]
    and eax, 3
    call puthex
    cmp qword ptr [rsp + 16], 14
    jne 1f
    outc '/'
    mov rax, cr2
    call puthex
1:  cmp qword ptr [rsp + 16], 8
    jne 2f
    outc ' '
    outc 'D'
    outc 'F'
    jmp done
2:  outc ' '
    cmp qword ptr [rsp + 16], 0x80
    jne 3f
    /* int 0x80 from CPL 3: check the stack switched to RSP0 (rsp within kstack0) */
    lea rax, [rip + kstack0_top]
    sub rax, rsp
    cmp rax, 0x100
    ja 3f
    outc 'K'
    outc ' '
3:  cmp r14, 0x5a
    jne 4f
    cmp qword ptr [rsp + 16], 13
    jne 4f
    xor r14, r14
    jmp back_in_kernel
4:  cmp qword ptr [rsp + 16], 0x80
    je 5f
    mov [rsp + 32], r15           /* resume at the recovery address */
5:  pop rdx
    pop rax
    add rsp, 16
    iretq

timer:
    push rax
    inc qword ptr [rip + ticks]
    mov rax, [rsp + 16]           /* interrupted CS */
    and eax, 3
    cmp eax, 3
    jne 1f
    inc qword ptr [rip + ticks_user]
    lea rax, [rip + kstack0_top]
    sub rax, rsp
    cmp rax, 0x100
    ja 1f
    inc qword ptr [rip + ticks_rsp0]
1:
    eoi
    pop rax
    iretq

/* print rax in hex (no leading zeros) */
puthex:
    push rcx
    push rbx
    push rdx
    mov rbx, rax
    mov ecx, 60
    xor edx, edx                  /* printed anything yet */
1:  mov rax, rbx
    shr rax, cl
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
    pop rdx
    pop rbx
    pop rcx
    ret

/* ------------------------------------------------------------------ data */
    .balign 16
handlers:
    .quad h0, 0, 0, 0, 0, 0, h6, 0, h8, 0, 0, 0, 0, h13, h14, 0
    .fill 16, 8, 0
    .quad timer
    .fill 0x80 - 0x21, 8, 0
    .quad h0x80
    .fill 255 - 0x80, 8, 0

    .balign 16
gdt:
    .quad 0
    .quad 0x00af9a000000ffff      /* 0x08 kernel code 64 */
    .quad 0x00cf92000000ffff      /* 0x10 kernel data */
    .quad 0x00cffa000000ffff      /* 0x18 user code 32 (DPL 3) */
    .quad 0x00cff2000000ffff      /* 0x20 user data (DPL 3) */
    .quad 0x00affa000000ffff      /* 0x28 user code 64 (DPL 3) */
gdt_tss:
    .quad 0, 0                    /* 0x30 TSS (filled in) */
gdt_end:
gdtr:
    .word gdt_end - gdt - 1
    .quad gdt
idtr:
    .word 256*16 - 1
    .quad idt
idtr_empty:
    .word 0
    .quad 0

    .balign 16
tss:
    .fill 104, 1, 0
kgs_area:
    .quad 0x6b6773                /* "sgk" magic seen through SWAPGS */
kernel_rsp: .quad 0
sys_ret:    .quad 0
kgs_seen:   .quad 0
ticks:      .quad 0
ticks_user: .quad 0
ticks_rsp0: .quad 0
user_cpl:   .byte 0
sys_cpl:    .byte 0

    .balign 4096
pml4:
    .fill 4096, 1, 0
pdpt:
    .fill 4096, 1, 0
pd:
    .fill 4 * 4096, 1, 0
idt:
    .fill 4096, 1, 0
    .fill 4096, 1, 0
kstack_top:
    .fill 4096, 1, 0
kstack0_top:
    .fill 4096, 1, 0
iststack_top:
    .fill 4096, 1, 0
ustack_top:
