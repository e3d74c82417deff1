/*
 * pvops.h: the macro layer that builds one kernel source two ways (Linux's pv_ops
 * idea, at teaching scale). Without PV each macro is the privileged instruction a
 * kernel at CPL 0 executes; with -DPV it is a request to pyhv's hypervisor through the
 * ABI of docs/pv.md (src/pyhv/engines/pv/abi.py): a store of the hypercall number to
 * HCALL, arguments and result in the kernel's shared page (pv_shared, one page of its
 * .data), the virtual IF a byte in that page that the kernel changes itself.
 *
 *   PV_INIT           register the shared page and the event callback (pv_callback)
 *   PV_CLI / PV_STI   the interrupt flag (PV_STI polls if an event is pending)
 *   PV_SAFE_HALT      sti; hlt: wait for an event with events enabled
 *   PV_TIMER_HZ(n)    the periodic timer (native: the caller programs the 8254)
 *   HYPERCALL(nr)     the raw hypercall (RAX preserved)
 *
 * Everything else a PV kernel does natively is left to the trap machinery under
 * `--engine pv` (it traps and is emulated, as under `--engine trap`).
 */
#ifndef PVOPS_H
#define PVOPS_H

#define HCALL_GPA       0xfeb00000
#define SH_VIF          0x00
#define SH_PENDING      0x01
#define SH_VECTOR       0x10
#define SH_ARG0         0x20
#define SH_ARG1         0x28
#define SH_ARG2         0x30
#define SH_ARG3         0x38
#define SH_RET          0x40
#define HC_CONSOLE_WRITE    1
#define HC_MMU_UPDATE       2
#define HC_SET_DESCRIPTORS  3
#define HC_SET_TIMER        4
#define HC_SET_CALLBACK     5
#define HC_EVENT_POLL       6
#define HC_HALT             7

#define HYPERCALL(nr) push rax; mov eax, HCALL_GPA; mov dword ptr [rax], nr; pop rax

#ifdef PV
#define PV_INIT                                                  \
    push rax; push rcx;                                          \
    lea rcx, [rip + pv_shared];                                  \
    mov eax, HCALL_GPA + 8; mov qword ptr [rax], rcx;            \
    lea rcx, [rip + pv_callback];                                \
    mov qword ptr [rip + pv_shared + SH_ARG0], rcx;              \
    pop rcx; pop rax;                                            \
    HYPERCALL(HC_SET_CALLBACK)
#define PV_CLI      mov byte ptr [rip + pv_shared + SH_VIF], 0
#define PV_STI                                                   \
    mov byte ptr [rip + pv_shared + SH_VIF], 1;                  \
    cmp byte ptr [rip + pv_shared + SH_PENDING], 0;              \
    je 88f;                                                      \
    HYPERCALL(HC_EVENT_POLL);                                    \
88:
#define PV_SAFE_HALT    HYPERCALL(HC_HALT)
#define PV_TIMER_HZ(n)                                           \
    mov qword ptr [rip + pv_shared + SH_ARG0], n;                \
    HYPERCALL(HC_SET_TIMER)
#else
#define PV_INIT
#define PV_CLI          cli
#define PV_STI          sti
#define PV_SAFE_HALT    sti; hlt
#define PV_TIMER_HZ(n)
#endif

#endif
