/*
 * Shared facts for the core test guests (included by every .S file through gcc's
 * preprocessor; see tests/machine/guestbuild.py for how each guest is built).
 *
 * Devices every guest may use (what pyhv's PC and QEMU's `-machine pc` both provide):
 *   COM1 16550 UART at 0x3f8: THR at +0 (write a byte), LSR at +5; a byte may be written
 *     once LSR bit 5 (THRE, "transmitter holding register empty") reads 1 (PC16550D
 *     datasheet, Line Status Register).
 *   isa-debug-exit at 0xf4: writing v ends the run; pyhv (like QEMU) exits with status
 *     (v << 1) | 1.
 *   fw_cfg at 0x510 (16-bit selector) / 0x511 (8-bit data), QEMU's docs/specs/fw_cfg.rst.
 *
 * Every guest ends in one of three ways the tests tell apart: a debug-exit write, HLT
 * with interrupts off (pyhv exits 0), or a triple fault (pyhv exits 4).
 */
#define COM1            0x3f8
#define COM1_LSR        0x3fd
#define LSR_THRE        0x20
#define DEBUG_EXIT      0xf4

#define MULTIBOOT_MAGIC         0x1BADB002
#define MULTIBOOT_BOOT_MAGIC    0x2BADB002   /* in EAX at a multiboot entry */
#define MULTIBOOT_INFO_CMDLINE  (1 << 2)     /* info.flags: info.cmdline (+16) is valid */

/* A multiboot v1 header (Multiboot Specification 0.6.96, 3.1.1): no a.out kludge, so
 * the loader takes the ELF program headers; flag 1 asks for mem_lower/mem_upper. */
#define MULTIBOOT_HEADER                                  \
    .section .multiboot, "a";                             \
    .align 4;                                             \
    .long MULTIBOOT_MAGIC;                                \
    .long 0x00000002;                                     \
    .long -(MULTIBOOT_MAGIC + 0x00000002)

/* End the run through the debug-exit port with status (v << 1) | 1; halt if it returns. */
#define DEBUG_EXIT_WITH(v)  mov al, v; out DEBUG_EXIT, al; cli; hlt
