/*
 * pyhv emu: RDTSC, RDMSR, WRMSR and IRET reach pyhv, through unicorn's own helpers.
 *
 * unicorn 2.1.4 executes RDMSR/WRMSR itself (QEMU's helper_rdmsr/helper_wrmsr) and
 * refuses an instruction hook for them, RDTSC reads the host's TSC, and IRET ends NMI
 * blocking without telling anyone. TCG calls these helpers by address from translated
 * code, and libunicorn takes those addresses through its dynamic symbol table, so this
 * shared object (loaded with RTLD_GLOBAL before libunicorn, as for the TB-start helper in
 * blockhook.c) defines functions of the same names and the dynamic linker binds
 * libunicorn's references to them. No code is patched.
 *
 * Each interposed helper finds the vCPU from the CPU state: env->uc (offset ENV_UC) is
 * the unicorn handle, looked up in `pyhv_cpu.vcpus` (registered by Python). A CPU that
 * is not registered (unicorn used by other code, scratch checks) goes to libunicorn's
 * own helper: a tail jump (`jmp`, not `call`), so that the original, which finds the
 * guest instruction from its return address when it raises an exception, sees the
 * translated code's return address.
 *
 * - RDTSC: the guest's TSC is constant-rate on the machine's virtual clock, 1 GHz:
 *   TSC = tsc_ns + (blocks - tsc_blocks) * ns_per_block + tsc_offset, where Python
 *   stamps (tsc_ns, tsc_blocks) whenever it synchronises the clock, so a TSC read
 *   between two synchronisations counts the blocks run since (the clock's own rule).
 *   CR4.TSD at CPL > 0 goes to the original, which raises #GP.
 * - RDMSR/WRMSR of IA32_TSC (0x10): that TSC (a write sets tsc_offset).
 *   IA32_APIC_BASE (0x1b), IA32_TSC_DEADLINE (0x6e0) and the x2APIC range
 *   (0x800-0x8ff), when `route_apic` is set: Python's `msr_cb(msr, write, &value)`,
 *   which returns 0 (done), 1 (#GP(0): raised here with the helper's return address, so
 *   RIP is the RDMSR/WRMSR) or 2 (unicorn's helper does it). Every other MSR: unicorn.
 * - PAUSE: with `yield_on_pause` (several vCPUs), ends the slice at the next block
 *   start (reason STOP_YIELD), as QEMU's round-robin TCG moves to the next vCPU on PAUSE.
 * - IRET (protected and real mode): sets `iret_seen` (NMI blocking ends); when Python
 *   waits for that (`nmi_window`), also forces the block counter's slow path so that
 *   emulation stops at the next block start (the pending NMI is delivered there).
 *
 * The offsets into unicorn's CPUX86State are those of the pinned unicorn 2.1.4; Python
 * reads them from the originals' code and registers no vCPU if they differ
 * (native/__init__.py: cpu_hooks), then checks the whole path on a scratch instance.
 */
#include <stdint.h>

#define ENV_UC 0x1b58          /* CPUX86State.uc */
#define ENV_CR4 0x1c8          /* CPUX86State.cr[4] */
#define ENV_HFLAGS 0xb0        /* CPUX86State.hflags (CPL in bits 0-1) */
#define CR4_TSD 0x4
#define EXCP_GP 13
#define PYHV_CPU_VCPUS 64

/* the first fields of struct pyhv_emu_ctl (blockhook.c) */
struct pyhv_ctl_head { int64_t limit; int64_t blocks; int64_t end; int32_t kick;
                       int32_t irq_window; int32_t reason; };
#define STOP_PYTHON 4
#define STOP_YIELD 5

struct pyhv_emu_cpu {
    struct pyhv_ctl_head *ctl;     /* the vCPU's block counter (blockhook.c) */
    int64_t tsc_ns;                /* virtual clock (ns) at tsc_blocks */
    int64_t tsc_blocks;
    int64_t ns_per_block;
    int64_t tsc_offset;            /* guest TSC - virtual ns */
    int32_t route_apic;            /* APIC MSRs go to msr_cb */
    int32_t iret_seen;             /* an IRET ran since Python cleared it */
    int32_t nmi_window;            /* stop at the next block start after an IRET */
    int32_t yield_on_pause;        /* PAUSE ends the slice (several vCPUs) */
    uint64_t rdtsc;                /* counters, for --stats */
    uint64_t msrs;
    int (*msr_cb)(uint32_t msr, int32_t write, uint64_t *value);
};

struct pyhv_cpu_vcpu { void *volatile uc; struct pyhv_emu_cpu *volatile cpu; };

struct pyhv_cpu_state {
    void *orig_rdtsc, *orig_rdmsr, *orig_wrmsr, *orig_iret_protected, *orig_iret_real;
    void *orig_pause;
    void (*raise_err_ra)(void *env, int excp, int code, uintptr_t ra);
    int64_t env_uc, env_cr4, env_hflags;        /* for Python's check */
    struct pyhv_cpu_vcpu vcpus[PYHV_CPU_VCPUS + 1];
};

__attribute__((visibility("hidden"))) struct pyhv_cpu_state pyhv_cpu = {
    0, 0, 0, 0, 0, 0, 0, ENV_UC, ENV_CR4, ENV_HFLAGS, {{0, 0}},
};

struct pyhv_cpu_state *pyhv_cpu_state(void) { return &pyhv_cpu; }

/* Register (cpu != NULL) or unregister the vCPU whose unicorn handle is uc: 0, or -1
 * when the table is full (ctl stored before uc, as in blockhook.c). */
int pyhv_cpu_register(void *uc, struct pyhv_emu_cpu *cpu)
{
    int i;
    for (i = 0; i < PYHV_CPU_VCPUS; i++) {
        if (pyhv_cpu.vcpus[i].uc == uc) {
            if (cpu == 0) {
                pyhv_cpu.vcpus[i].uc = (void *)1;
                return 0;
            }
            pyhv_cpu.vcpus[i].cpu = cpu;
            return 0;
        }
    }
    if (cpu == 0)
        return 0;
    for (i = 0; i < PYHV_CPU_VCPUS; i++) {
        void *cur = pyhv_cpu.vcpus[i].uc;
        if (cur == 0 || cur == (void *)1) {
            pyhv_cpu.vcpus[i].cpu = cpu;
            __atomic_thread_fence(__ATOMIC_RELEASE);
            pyhv_cpu.vcpus[i].uc = uc;
            return 0;
        }
    }
    return -1;
}

static struct pyhv_emu_cpu *find(void *env)
{
    void *uc = *(void **)((char *)env + ENV_UC);
    int i;
    for (i = 0; i < PYHV_CPU_VCPUS; i++) {
        void *cur = pyhv_cpu.vcpus[i].uc;
        if (cur == uc)
            return pyhv_cpu.vcpus[i].cpu;
        if (cur == 0)
            break;
    }
    return 0;
}

static uint64_t guest_tsc(struct pyhv_emu_cpu *c)
{
    int64_t ns = c->tsc_ns + (c->ctl->blocks - c->tsc_blocks) * c->ns_per_block;
    return (uint64_t)(ns + c->tsc_offset);
}

static void set_edx_eax(void *env, uint64_t v)
{
    uint64_t *regs = (uint64_t *)env;    /* regs[0] = RAX, regs[2] = RDX */
    regs[0] = (uint32_t)v;
    regs[2] = (uint32_t)(v >> 32);
}

static int apic_msr(uint32_t msr)
{
    return msr == 0x1b || msr == 0x6e0 || (msr >= 0x800 && msr <= 0x8ff);
}

/* 1: done here; 0: the original helper does it */
__attribute__((visibility("hidden"))) int pyhv_rdtsc_c(void *env)
{
    struct pyhv_emu_cpu *c = find(env);
    if (c == 0)
        return 0;
    if ((*(uint8_t *)((char *)env + ENV_CR4) & CR4_TSD) &&
            (*(uint32_t *)((char *)env + ENV_HFLAGS) & 3))
        return 0;                        /* the original raises #GP */
    c->rdtsc++;
    set_edx_eax(env, guest_tsc(c));
    return 1;
}

__attribute__((visibility("hidden"))) int pyhv_msr_c(void *env, uintptr_t ra, int write)
{
    struct pyhv_emu_cpu *c = find(env);
    uint64_t *regs = (uint64_t *)env;
    uint32_t msr;
    uint64_t value;
    int r;
    if (c == 0)
        return 0;
    msr = (uint32_t)regs[1];
    value = (uint32_t)regs[0] | (uint64_t)(uint32_t)regs[2] << 32;
    if (msr == 0x10) {
        c->msrs++;
        if (write)
            c->tsc_offset += (int64_t)(value - guest_tsc(c));
        else
            set_edx_eax(env, guest_tsc(c));
        return 1;
    }
    if (!c->route_apic || c->msr_cb == 0 || !apic_msr(msr))
        return 0;
    c->msrs++;
    r = c->msr_cb(msr, write, &value);
    if (r == 2)
        return 0;
    if (r != 0)
        pyhv_cpu.raise_err_ra(env, EXCP_GP, 0, ra);     /* does not return */
    if (!write)
        set_edx_eax(env, value);
    return 1;
}

__attribute__((visibility("hidden"))) void pyhv_iret_c(void *env)
{
    struct pyhv_emu_cpu *c = find(env);
    if (c == 0)
        return;
    c->iret_seen = 1;
    if (c->nmi_window) {
        c->ctl->reason = STOP_PYTHON;    /* blockhook.c's slow path stops there */
        c->ctl->limit = c->ctl->blocks;
    }
}

/* PAUSE (a spin-wait loop): with several vCPUs, the slice ends at the next block start
 * so that the vCPU it waits for runs (what QEMU's round-robin TCG does on PAUSE, and
 * pause-loop exiting on hardware). The original helper then does PAUSE itself. */
__attribute__((visibility("hidden"))) void pyhv_pause_c(void *env)
{
    struct pyhv_emu_cpu *c = find(env);
    if (c == 0 || !c->yield_on_pause || c->ctl->reason != 0)
        return;
    c->ctl->reason = STOP_YIELD;
    c->ctl->limit = c->ctl->blocks;
}

#if defined(__x86_64__)
/* At entry RSP = 8 mod 16; one push makes calls aligned. */
__asm__(
    "    .text\n"
    "    .globl helper_rdtsc_x86_64\n"
    "    .type helper_rdtsc_x86_64, @function\n"
    "helper_rdtsc_x86_64:\n"
    "    pushq %rdi\n"
    "    call pyhv_rdtsc_c\n"
    "    popq %rdi\n"
    "    testl %eax, %eax\n"
    "    jz 1f\n"
    "    ret\n"
    "1:  jmp *pyhv_cpu+0(%rip)\n"
    "    .size helper_rdtsc_x86_64, .-helper_rdtsc_x86_64\n"

    "    .globl helper_rdmsr_x86_64\n"
    "    .type helper_rdmsr_x86_64, @function\n"
    "helper_rdmsr_x86_64:\n"
    "    movq (%rsp), %rsi\n"
    "    pushq %rdi\n"
    "    xorl %edx, %edx\n"
    "    call pyhv_msr_c\n"
    "    popq %rdi\n"
    "    testl %eax, %eax\n"
    "    jz 1f\n"
    "    ret\n"
    "1:  jmp *pyhv_cpu+8(%rip)\n"
    "    .size helper_rdmsr_x86_64, .-helper_rdmsr_x86_64\n"

    "    .globl helper_wrmsr_x86_64\n"
    "    .type helper_wrmsr_x86_64, @function\n"
    "helper_wrmsr_x86_64:\n"
    "    movq (%rsp), %rsi\n"
    "    pushq %rdi\n"
    "    movl $1, %edx\n"
    "    call pyhv_msr_c\n"
    "    popq %rdi\n"
    "    testl %eax, %eax\n"
    "    jz 1f\n"
    "    ret\n"
    "1:  jmp *pyhv_cpu+16(%rip)\n"
    "    .size helper_wrmsr_x86_64, .-helper_wrmsr_x86_64\n"

    /* helper_iret_protected(env, shift, next_eip), helper_iret_real(env, shift) */
    "    .globl helper_iret_protected_x86_64\n"
    "    .type helper_iret_protected_x86_64, @function\n"
    "helper_iret_protected_x86_64:\n"
    "    pushq %rdi\n"
    "    pushq %rsi\n"
    "    pushq %rdx\n"
    "    call pyhv_iret_c\n"
    "    popq %rdx\n"
    "    popq %rsi\n"
    "    popq %rdi\n"
    "    jmp *pyhv_cpu+24(%rip)\n"
    "    .size helper_iret_protected_x86_64, .-helper_iret_protected_x86_64\n"

    "    .globl helper_iret_real_x86_64\n"
    "    .type helper_iret_real_x86_64, @function\n"
    "helper_iret_real_x86_64:\n"
    "    pushq %rdi\n"
    "    pushq %rsi\n"
    "    pushq %rdx\n"
    "    call pyhv_iret_c\n"
    "    popq %rdx\n"
    "    popq %rsi\n"
    "    popq %rdi\n"
    "    jmp *pyhv_cpu+32(%rip)\n"
    "    .size helper_iret_real_x86_64, .-helper_iret_real_x86_64\n"

    /* helper_pause(env, next_eip_addend) */
    "    .globl helper_pause_x86_64\n"
    "    .type helper_pause_x86_64, @function\n"
    "helper_pause_x86_64:\n"
    "    pushq %rdi\n"
    "    pushq %rsi\n"
    "    pushq %rdx\n"
    "    call pyhv_pause_c\n"
    "    popq %rdx\n"
    "    popq %rsi\n"
    "    popq %rdi\n"
    "    jmp *pyhv_cpu+40(%rip)\n"
    "    .size helper_pause_x86_64, .-helper_pause_x86_64\n"
);
#endif
