/*
 * pyhv emu: the per-block hook of the software CPU engine, in C because a Python
 * UC_HOOK_BLOCK callback costs ~1 us per translated-block execution.
 *
 * unicorn calls pyhv_emu_block() at the start of every translation block, before the
 * block's instructions run. It counts blocks (the guest-progress measure the virtual
 * clock advances with) and stops emulation, from inside the hook (the only correct
 * place: docs/host.md), when:
 *   1. the slice budget (blocks until the next timer deadline) is used up,
 *   2. another thread asked for a stop (kick),
 *   3. an interrupt is waiting and RFLAGS.IF is now 1 (the interrupt window opened).
 * A block stopped in its hook has not executed: RIP is the block's first instruction.
 * `run_first` lets the first block of a slice run unconditionally: after STI / MOV SS
 * the instruction in the interrupt shadow must execute before an interrupt is taken,
 * and stopping at the next block start (not after exactly one instruction) is
 * architecturally fine (interrupt latency is not specified), while an instruction-count
 * run would make unicorn add, then later remove, its per-instruction count hook and
 * drop every translated block each time.
 *
 * No headers and no link-time dependency: unicorn's uc_emu_stop and uc_reg_read are
 * passed in as function pointers in the control block, filled in from Python.
 * The struct layout is mirrored by pyhv/engines/emu/native/__init__.py (_Ctl).
 */
#include <stdint.h>

#define UC_X86_REG_EFLAGS 25
#define RFLAGS_IF 0x200

enum { STOP_NONE = 0, STOP_BUDGET = 1, STOP_KICK = 2, STOP_IRQ_WINDOW = 3 };

struct pyhv_emu_ctl {
    int64_t budget;                /* blocks left in this slice */
    uint64_t blocks;               /* blocks started, all slices together */
    volatile int32_t kick;         /* set from any thread: stop at the next block */
    int32_t irq_window;            /* stop as soon as RFLAGS.IF is 1 */
    int32_t reason;                /* why the hook (or Python) stopped; 0 = not stopped */
    int32_t run_first;             /* the slice's first block runs whatever the state */
    int (*emu_stop)(void *uc);
    int (*reg_read)(void *uc, int regid, void *value);
};

void pyhv_emu_block(void *uc, uint64_t address, uint32_t size, void *user)
{
    struct pyhv_emu_ctl *c = (struct pyhv_emu_ctl *)user;
    (void)address;
    (void)size;
    if (c->reason != STOP_NONE) {     /* a stop is already on its way: repeat it */
        c->emu_stop(uc);
        return;
    }
    if (c->run_first) {
        c->run_first = 0;
        c->blocks++;
        c->budget--;
        return;
    }
    if (c->budget <= 0) {
        c->reason = STOP_BUDGET;
    } else if (c->kick) {
        c->reason = STOP_KICK;
    } else if (c->irq_window) {
        uint64_t flags = 0;
        c->reg_read(uc, UC_X86_REG_EFLAGS, &flags);
        if (flags & RFLAGS_IF)
            c->reason = STOP_IRQ_WINDOW;
    }
    if (c->reason == STOP_NONE) {     /* the block runs */
        c->blocks++;
        c->budget--;
        return;
    }
    c->emu_stop(uc);
}

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
