/*
 * pyhv emu: the per-block hook of the software CPU engine, in C because a Python
 * UC_HOOK_BLOCK callback costs ~1 us per translated-block execution.
 *
 * unicorn calls pyhv_emu_block() at the start of every translation block, before the
 * block's instructions run. It counts blocks (the guest-progress measure the virtual
 * clock advances with) and stops emulation, from inside the hook (the only correct
 * place: HOST.md), when:
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
