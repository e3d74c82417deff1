/*
 * pyhv emu: block counting and synchronous stops for the software CPU engine, in C (and
 * a few instructions of assembly) because a Python UC_HOOK_BLOCK callback costs ~1 us
 * per translated-block execution.
 *
 * At the start of every translation block, before the block's instructions run, pyhv
 * counts the block (the guest-progress measure the virtual clock advances with) and
 * stops emulation there (the only correct place: docs/host.md) when:
 *   1. the slice budget (blocks until the next timer deadline) is used up,
 *   2. another thread asked for a stop (kick),
 *   3. an interrupt is waiting and RFLAGS.IF is now 1 (the interrupt window opened).
 * A block stopped at its start has not executed: RIP is the block's first instruction.
 * `run_first` lets the first block of a slice run unconditionally: after STI / MOV SS
 * the instruction in the interrupt shadow must execute before an interrupt is taken,
 * and stopping at the next block start (not after exactly one instruction) is
 * architecturally fine (interrupt latency is not specified), while an instruction-count
 * run would make unicorn add, then later remove, its per-instruction count hook and
 * drop every translated block each time.
 *
 * Fast path: a block starts while blocks + 1 <= limit and no kick is pending; anything
 * else goes to pyhv_emu_slow(), which decides. `limit` equals `end` (the block count at
 * which the slice ends) unless Python or the slow path forces every block through the
 * slow path (limit = blocks: interrupt window watched, first block to run, a stop on its
 * way). Only the emulating thread writes `blocks` and, while emu_start runs, `limit`;
 * kick() writes `kick` alone, so a kick is never lost to a racing write.
 *
 * Two ways to get called at every block start; the engine uses the first available:
 *
 * a) unicorn's TB-start helper. unicorn 2.1.4 translates every block with a call to
 *    helper_check_exit_request_x86_64 at its start (where QEMU inlines its exit check).
 *    pyhv's shared object defines a function of that name and is loaded with
 *    RTLD_GLOBAL before libunicorn, so the dynamic linker binds libunicorn's references
 *    to it (ELF symbol interposition, no code is patched). It counts the block of a
 *    registered vCPU (pyhv_tb_register), then does the original's check: it reads the
 *    CPU's exit request word and, when it is negative, jumps (not calls: the original
 *    finds the block from its return address) to libunicorn's own helper. Instances
 *    that are not registered (unicorn used by other code, scratch checks) go straight
 *    to the original. The two offsets of the inline check are those of the pinned
 *    unicorn 2.1.4; Python reads them from the original's code and registers no vCPU
 *    if they differ. With unicorn's per-access exit checks on, the helper also runs
 *    after every load and store, so this mode is used only with them off
 *    (native/__init__.py: exit_checks_off).
 * b) UC_HOOK_BLOCK with pyhv_emu_block: the same decisions, at the cost of one more
 *    call per block (~1 ns: unicorn's call sequence, not the hook's few instructions).
 *
 * No headers and no link-time dependency: unicorn's uc_emu_stop and uc_reg_read and the
 * original helper are passed in from Python. The struct layouts are mirrored by
 * pyhv/engines/emu/native/__init__.py (Ctl, TbState).
 */
#include <stdint.h>

#define UC_X86_REG_EFLAGS 25
#define RFLAGS_IF 0x200

enum { STOP_NONE = 0, STOP_BUDGET = 1, STOP_KICK = 2, STOP_IRQ_WINDOW = 3 };

struct pyhv_emu_ctl {
    int64_t limit;                 /* fast path while blocks + 1 <= limit */
    int64_t blocks;                /* blocks started, all slices together */
    int64_t end;                   /* the slice ends when blocks reaches end */
    volatile int32_t kick;         /* set from any thread: stop at the next block */
    int32_t irq_window;            /* stop as soon as RFLAGS.IF is 1 */
    int32_t reason;                /* why the slow path (or Python) stopped; 0 = not */
    int32_t run_first;             /* the slice's first block runs whatever the state */
    int (*emu_stop)(void *uc);
    int (*reg_read)(void *uc, int regid, void *value);
};

_Static_assert(__builtin_offsetof(struct pyhv_emu_ctl, limit) == 0, "asm: limit");
_Static_assert(__builtin_offsetof(struct pyhv_emu_ctl, blocks) == 8, "asm: blocks");
_Static_assert(__builtin_offsetof(struct pyhv_emu_ctl, kick) == 24, "asm: kick");

__attribute__((visibility("hidden")))
void pyhv_emu_slow(void *uc, struct pyhv_emu_ctl *c)
{
    if (c->reason != STOP_NONE) {     /* a stop is already on its way: repeat it */
        c->limit = c->blocks;
        c->emu_stop(uc);
        return;
    }
    if (c->run_first) {
        c->run_first = 0;
    } else {
        if (c->blocks >= c->end) {
            c->reason = STOP_BUDGET;
        } else if (c->kick) {
            c->reason = STOP_KICK;
        } else if (c->irq_window) {
            uint64_t flags = 0;
            c->reg_read(uc, UC_X86_REG_EFLAGS, &flags);
            if (flags & RFLAGS_IF)
                c->reason = STOP_IRQ_WINDOW;
        }
        if (c->reason != STOP_NONE) {
            c->limit = c->blocks;
            c->emu_stop(uc);
            return;
        }
    }
    c->blocks++;                      /* the block runs */
    c->limit = c->irq_window ? c->blocks : c->end;
}

void pyhv_emu_block(void *uc, uint64_t address, uint32_t size, void *user)
{
    struct pyhv_emu_ctl *c = (struct pyhv_emu_ctl *)user;
    int64_t next = c->blocks + 1;
    (void)address;
    (void)size;
    if (next <= c->limit && !c->kick) {
        c->blocks = next;
        return;
    }
    pyhv_emu_slow(uc, c);
}

/* ---- (a) the interposed TB-start helper ---------------------------------------- */

#define PYHV_TB_VCPUS 64
#define PYHV_TB_FREE ((void *)1)       /* an unregistered slot (the list ends at NULL) */
/* unicorn 2.1.4's check, `uc->cpu->icount_decr.u32 < 0`: offsetof(struct uc_struct,
 * cpu) and of the exit request word in its CPU; Python compares them with the original
 * helper's code before any vCPU registers (native/__init__.py: bind_original). */
#define UC_CPU_OFFSET 0x1b8
#define CPU_EXIT_OFFSET 0x8a40

struct pyhv_tb_vcpu { void *volatile uc; struct pyhv_emu_ctl *volatile ctl; };

struct pyhv_tb_state {
    void *original;                /* libunicorn's helper_check_exit_request_x86_64 */
    int64_t cpu_offset;            /* UC_CPU_OFFSET, for Python's check */
    int64_t exit_offset;           /* CPU_EXIT_OFFSET, for Python's check */
    struct pyhv_tb_vcpu vcpus[PYHV_TB_VCPUS + 1];
};

_Static_assert(__builtin_offsetof(struct pyhv_tb_state, vcpus) == 24, "asm: vcpus");

__attribute__((visibility("hidden"))) struct pyhv_tb_state pyhv_tb = {
    0, UC_CPU_OFFSET, CPU_EXIT_OFFSET, {{0, 0}},
};

struct pyhv_tb_state *pyhv_tb_state(void) { return &pyhv_tb; }

/* Register (ctl != NULL) or unregister (ctl == NULL) the vCPU whose unicorn handle is
 * uc. Returns 0, or -1 when the table is full. Writers store ctl before uc, so a
 * concurrent reader that sees the handle sees its ctl (x86-64 keeps stores in order). */
int pyhv_tb_register(void *uc, struct pyhv_emu_ctl *ctl)
{
    int i;
    for (i = 0; i < PYHV_TB_VCPUS; i++) {
        if (pyhv_tb.vcpus[i].uc == uc) {
            if (ctl == 0) {
                pyhv_tb.vcpus[i].uc = PYHV_TB_FREE;
                return 0;
            }
            pyhv_tb.vcpus[i].ctl = ctl;
            return 0;
        }
    }
    if (ctl == 0)
        return 0;
    for (i = 0; i < PYHV_TB_VCPUS; i++) {
        void *cur = pyhv_tb.vcpus[i].uc;
        if (cur == 0 || cur == PYHV_TB_FREE) {
            pyhv_tb.vcpus[i].ctl = ctl;
            __atomic_thread_fence(__ATOMIC_RELEASE);
            pyhv_tb.vcpus[i].uc = uc;
            return 0;
        }
    }
    return -1;
}

#if defined(__x86_64__)
#define STR2(x) #x
#define STR(x) STR2(x)
/* void helper_check_exit_request_x86_64(void *uc, uint32_t in_delay_slot)
 * rdi = uc, esi = in_delay_slot (always 0 for x86). Clobbers only what the SysV ABI
 * lets a callee clobber (rax, rcx, r8; rdi/rsi are restored around the slow path).
 * A registered vCPU (slot 0 first, the others by a scan) is counted, then the exit
 * request word is read inline; everything else goes to the original helper. */
__asm__(
    "    .text\n"
    "    .globl helper_check_exit_request_x86_64\n"
    "    .type helper_check_exit_request_x86_64, @function\n"
    "    .p2align 4\n"
    "helper_check_exit_request_x86_64:\n"
    "    cmpq %rdi, pyhv_tb+24(%rip)\n"     /* slot 0's handle */
    "    jne 6f\n"
    "    movq pyhv_tb+32(%rip), %rcx\n"     /* slot 0's ctl */
    "2:  movq 8(%rcx), %rax\n"              /* blocks + 1 <= limit and no kick: count */
    "    addq $1, %rax\n"
    "    cmpq (%rcx), %rax\n"
    "    jg 5f\n"
    "    cmpl $0, 24(%rcx)\n"
    "    jne 5f\n"
    "    movq %rax, 8(%rcx)\n"
    "3:  movq " STR(UC_CPU_OFFSET) "(%rdi), %r8\n"   /* the original's check */
    "    cmpl $0, " STR(CPU_EXIT_OFFSET) "(%r8)\n"
    "    jl 4f\n"
    "    ret\n"
    "4:  jmp *pyhv_tb(%rip)\n"              /* exit requested: the original exits here */
    "5:  pushq %rdi\n"                      /* slow path: decide in C */
    "    pushq %rsi\n"
    "    subq $8, %rsp\n"
    "    movq %rcx, %rsi\n"
    "    call pyhv_emu_slow\n"
    "    addq $8, %rsp\n"
    "    popq %rsi\n"
    "    popq %rdi\n"
    "    jmp 3b\n"
    "6:  leaq pyhv_tb+40(%rip), %rcx\n"     /* the other slots, up to the NULL handle */
    "7:  movq (%rcx), %rax\n"
    "    cmpq %rdi, %rax\n"
    "    je 8f\n"
    "    addq $16, %rcx\n"
    "    testq %rax, %rax\n"
    "    jne 7b\n"
    "    jmp 4b\n"                          /* not a pyhv vCPU: the original alone */
    "8:  movq 8(%rcx), %rcx\n"
    "    jmp 2b\n"
    "    .size helper_check_exit_request_x86_64, .-helper_check_exit_request_x86_64\n"
);
#endif

/*
 * The TLB-fill hook, used only while the guest runs with paging off (CR0.PG = 0).
 *
 * Why: unicorn 2.1.4 has no dirty-memory bitmap; its notdirty_write() keeps every TLB
 * entry that allows execution on the store slow path forever (its guard against missed
 * self-modifying code). With paging off, QEMU's x86 page walk makes every page
 * executable, so every guest store costs a helper call, two memory-region lookups and a
 * translated-code check (~40 ns against ~5 ns for a load; bench/native/uc_store_probe.py).
 * With unicorn's "virtual TLB" (UC_TLB_VIRTUAL) this hook fills the TLB instead: the
 * identity mapping, executable only for pages code has been fetched from. Pages without
 * code get read/write entries, so their stores take the inline fast path after the first.
 *
 * Self-modifying code stays exact: the first fetch from a page records it in the bitmap
 * and flushes the whole TLB (dropping any fast write entry for that page in every MMU
 * index and the victim TLB); from then on every entry for the page is executable, hence
 * slow and checked, exactly as with unicorn's own page walk. Pages whose code was
 * translated before this hook ran are unknown to it: the engine flushes the translation
 * cache when it switches to this mode.
 *
 * Paging on: the hook cannot walk page tables (QEMU's walker is not reachable), so it
 * refuses the fill and flags `paging`: unicorn restores the CPU to the start of the
 * accessing instruction and ends emu_start with UC_ERR_EXCEPTION; the engine switches
 * back to unicorn's own TLB and resumes there. The guest sees nothing.
 */
#define UC_X86_REG_CR0 50
#define CR0_PG 0x80000000u
#define UC_MEM_FETCH 18
#define UC_PROT_RW 3
#define UC_PROT_ALL 7

struct pyhv_uc_tlb_entry { uint64_t paddr; int32_t perms; };

struct pyhv_emu_tlb {
    uint8_t *code_pages;           /* 1 bit per 4 KiB page below 4 GiB (128 KiB) */
    uint64_t fills;                /* entries filled */
    uint64_t code_pages_seen;      /* pages added to code_pages */
    int32_t paging;                /* set when a fill was refused: CR0.PG is 1 */
    int32_t flush_ctl;             /* uc_ctl code of UC_CTL_TLB_FLUSH (write, 0 args) */
    int (*reg_read)(void *uc, int regid, void *value);
    int (*ctl)(void *uc, int control, ...);
};

_Bool pyhv_emu_tlb_fill(void *uc, uint64_t vaddr, int type, struct pyhv_uc_tlb_entry *e,
                        void *user)
{
    struct pyhv_emu_tlb *t = (struct pyhv_emu_tlb *)user;
    uint64_t cr0 = 0;
    t->reg_read(uc, UC_X86_REG_CR0, &cr0);
    if (cr0 & CR0_PG) {
        t->paging = 1;
        return 0;
    }
    uint64_t page = (vaddr & 0xffffffffu) >> 12;
    uint8_t bit = (uint8_t)(1u << (page & 7));
    int code = (t->code_pages[page >> 3] & bit) != 0;
    if (type == UC_MEM_FETCH && !code) {
        t->code_pages[page >> 3] |= bit;
        t->code_pages_seen++;
        t->ctl(uc, t->flush_ctl);
        code = 1;
    }
    e->paddr = page << 12;
    e->perms = code ? UC_PROT_ALL : UC_PROT_RW;
    t->fills++;
    return 1;
}
