"""pyhv's paravirtual ABI: what a PV kernel and the `pv` engine agree on (docs/pv.md).

Design (Xen's, simplified): the kernel knows it is virtualized and asks the monitor
instead of executing privileged instructions.

    HCALL_GPA    a guest-physical page with nothing behind it. A 4-byte store of a
                 hypercall number to HCALL_GPA is a hypercall; an 8-byte store to
                 HCALL_GPA + 8 registers the vCPU's shared page (its guest-physical
                 address is the stored value). A store there is an MMIO exit; the
                 arguments and the result travel in the shared page, never in
                 registers (so the monitor needs no register access for a hypercall).
    shared page  one 4 KiB page of guest RAM per vCPU, chosen by the kernel:

        0x00  u8   VIF       1: events may be delivered (the kernel's "sti")
        0x01  u8   PENDING   set by pyhv when an event waits while VIF is 0
        0x08  u64  TIME_NS   guest time, updated at every hypercall and event
        0x10  u64  VECTOR    the event being delivered to the callback
        0x20  u64  ARG[0..3] hypercall arguments
        0x40  i64  RET       hypercall result (negative: an error, below)

Hypercalls (number: arguments -> result):

    1 CONSOLE_WRITE   ptr, len (<= 4096)        bytes written (to COM1)
    2 MMU_UPDATE      list ptr, count (<= 512)  entries done; the list is `count`
                      pairs of u64 (guest-physical address of a page-table entry,
                      new value); each address must be 8-byte aligned guest RAM and
                      each present entry must name guest RAM; the first bad entry
                      stops the batch (RET = -EINVAL, earlier entries stay done)
    3 SET_DESCRIPTORS gdt base, gdt limit, idt base, idt limit   0 (as LGDT + LIDT)
    4 SET_TIMER       hz (0: stop; 19..1193182) 0: the 8254's counter 0 periodic
    5 SET_CALLBACK    handler address (canonical)                0
    6 EVENT_POLL      -                         0 (a pending event is delivered now)
    7 HALT            -                         0 (VIF=1 and wait for an event: sti; hlt)

Events: an interrupt from the 8259 is delivered, when VIF is 1, by calling the
callback as a CPU calls an interrupt handler at CPL 0 (a frame of RIP, CS, RFLAGS, RSP,
SS pushed on the 16-byte-aligned stack, VIF cleared), with VECTOR set; the callback
returns with IRETQ, which restores VIF from the frame's IF. While VIF is 0 the event
waits and PENDING is set; the kernel's "sti" checks PENDING and polls.
"""

from __future__ import annotations

HCALL_GPA = 0xFEB0_0000
HCALL_REGISTER = HCALL_GPA + 8

SH_VIF, SH_PENDING, SH_TIME, SH_VECTOR, SH_ARGS, SH_RET = 0x00, 0x01, 0x08, 0x10, 0x20, 0x40

CONSOLE_WRITE, MMU_UPDATE, SET_DESCRIPTORS, SET_TIMER, SET_CALLBACK = 1, 2, 3, 4, 5
EVENT_POLL, HALT = 6, 7
NAMES = {CONSOLE_WRITE: "console write", MMU_UPDATE: "mmu update",
         SET_DESCRIPTORS: "set descriptors", SET_TIMER: "set timer",
         SET_CALLBACK: "set callback", EVENT_POLL: "event poll", HALT: "halt"}

EINVAL, ENOSYS, EFAULT = -22, -38, -14
MAX_CONSOLE = 4096
MAX_BATCH = 512
PIT_HZ = 1193182
