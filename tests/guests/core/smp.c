/*
 * smp: a multiprocessor guest for pyhv's local APIC, I/O APIC and ACPI (issue 11), in
 * 32-bit protected mode with paging off (multiboot; smp_start.S has the entry, the AP
 * trampoline and the interrupt stubs). It prints one line per check on COM1:
 *
 *   cpus: N                      the CPU count from fw_cfg (key 0x05)
 *   (a) start-up: INIT, then SIPI twice (vector 0x08 -> TRAMP 0x8000), to all but self;
 *       every AP and the BSP add 1 to a counter COUNT times with `lock xadd`:
 *   aps: N-1 started, counter=N*COUNT (exact)
 *   (b) IPIs both ways: the BSP sends PINGS fixed IPIs (vector 0x40, physical
 *       destination) to each AP, one at a time; each AP's handler counts it and answers
 *       with IPI 0x41 to the BSP; then one broadcast (all but self, vector 0x42):
 *   ipi: PINGS*(N-1) pings, PINGS*(N-1) pongs, broadcast N-1
 *   (c) the APIC timer, one-shot (fires once) and periodic (TICKS times), and whether
 *       CPUID offers TSC-deadline (pyhv's emu does not: its MSR is unreachable there);
 *       the I/O APIC with the 8259 fully masked: the PIT on GSI 2 (vector 0x60, 1 kHz,
 *       TICKS interrupts) and the UART's THRE interrupt on GSI 4 (vector 0x61):
 *   timer: one-shot 1, periodic TICKS, tsc-deadline not offered
 *   ioapic: pit TICKS, uart 1
 *   (d) ACPI: RSDP in 0xe0000-0xfffff, RSDT -> FACP -> PM1a_CNT and DSDT -> \_S5's
 *       SLP_TYP; writes SLP_TYP | SLP_EN to PM1a_CNT, which powers the machine off:
 *   acpi: S5 SLP_TYP=5 PM1a_CNT=0x604
 *
 * With `bench=N ticks=M` on the multiboot command line (bench/smp_bench.py) it starts
 * the APs, then runs N IPI round trips with AP 1 and M periodic APIC timer interrupts
 * (every 20 us), prints "bench: N round trips, M timer interrupts" and powers off; the
 * host CPU time of two sizes gives the cost of one of each.
 *
 * Any failure prints "FAIL: ..." and exits through debug-exit with 0x33 (status 103);
 * an exception exits with 0x7d (status 251). Success never returns from (d): pyhv ends
 * the run with status 0 ("poweroff").
 */
#define COM1      0x3f8
#define LAPIC     0xfee00000u
#define IOAPIC    0xfec00000u
#define TRAMP     0x8000u
#define COUNT     200000
#define PINGS     5
#define TICKS     20
#define SPIN      20000000

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

extern char ap_tramp[], ap_tramp_end[];
extern void isr_0x40(void), isr_0x41(void), isr_0x42(void), isr_0x43(void), isr_0x50(void);
extern void isr_0x60(void), isr_0x61(void), isr_0xff(void), isr_fault(void), isr_0x02(void);

static volatile u32 counter, aps_started, aps_ready;
static volatile u32 pings[16], pongs, broadcasts, timer_ticks, pit_ticks, uart_ints;
static u32 ncpus;
static u32 idt[256 * 2];
static struct __attribute__((packed)) { u16 limit; u32 base; } idtr;

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 rd(u32 addr) { return *(volatile u32 *)addr; }
static inline void wr(u32 addr, u32 v) { *(volatile u32 *)addr = v; }
static inline void pause(void) { __asm__ volatile("pause"); }

static void putc(char c) { while (!(inb(COM1 + 5) & 0x20)) ; outb(COM1, (u8)c); }
static void puts(const char *s) { while (*s) putc(*s++); }
static void putdec(u32 v)
{
    char b[12];
    int i = 0;
    do { b[i++] = (char)('0' + v % 10); v /= 10; } while (v);
    while (i) putc(b[--i]);
}
static void puthex(u32 v)
{
    puts("0x");
    int started = 0;
    for (int s = 28; s >= 0; s -= 4) {
        u32 d = (v >> s) & 0xf;
        if (d || started || s == 0) { putc("0123456789abcdef"[d]); started = 1; }
    }
}

static u32 fail(const char *why)
{
    puts("FAIL: ");
    puts(why);
    putc('\n');
    return 0x33;
}

void fault(int code)
{
    puts("unexpected exception\n");
    outb(0xf4, (u8)code);
}

static u32 xadd(volatile u32 *p, u32 v)
{
    __asm__ volatile("lock xaddl %0, %1" : "+r"(v), "+m"(*p) : : "memory");
    return v;
}

typedef unsigned long long u64;
static volatile u32 x2;              /* the BSP's APIC is in x2APIC mode */
static volatile u32 self_ipis;
static volatile u32 nmis, nmi_depth, nmi_deepest;

static inline u64 rdmsr(u32 msr)
{
    u32 lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
    return (u64)hi << 32 | lo;
}
static inline void wrmsr(u32 msr, u64 v)
{
    __asm__ volatile("wrmsr" : : "c"(msr), "a"((u32)v), "d"((u32)(v >> 32)) : "memory");
}
static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return (u64)hi << 32 | lo;
}

static u32 apic_id(void) { return rd(LAPIC + 0x20) >> 24; }
static void eoi(void)
{
    if (x2 && (rdmsr(0x1b) & (1u << 10)))
        wrmsr(0x80b, 0);
    else
        wr(LAPIC + 0xb0, 0);
}

static void send_ipi(u32 dest, u32 low)
{
    wr(LAPIC + 0x310, dest << 24);
    wr(LAPIC + 0x300, low);
}

void isr_dispatch(int vec)
{
    switch (vec) {
    case 0x40:                       /* ping (on an AP): count, answer the BSP */
        pings[apic_id() & 15]++;
        eoi();
        send_ipi(0, 0x41);
        return;
    case 0x41: pongs++; break;
    case 0x42: xadd(&broadcasts, 1); break;
    case 0x43: self_ipis++; break;
    case 0x02:                       /* NMI: no EOI (it does not go through the ISR) */
        if (++nmi_depth > nmi_deepest)
            nmi_deepest = nmi_depth;
        if (++nmis == 1) {           /* a second NMI now must wait for this IRET */
            send_ipi(0, 0x400);
            for (int i = 0; i < 200000; i++)
                pause();
        }
        nmi_depth--;
        return;
    case 0x50: timer_ticks++; break;
    case 0x60: pit_ticks++; break;
    case 0x61:
        (void)inb(COM1 + 2);         /* IIR: the THRE interrupt is acknowledged */
        outb(COM1 + 1, 0);           /* IER: no more */
        uart_ints++;
        break;
    case 0xff: return;               /* spurious: no EOI */
    }
    eoi();
}

static void set_gate(int vec, void (*fn)(void))
{
    u32 a = (u32)fn;
    idt[vec * 2] = (0x08 << 16) | (a & 0xffff);
    idt[vec * 2 + 1] = (a & 0xffff0000) | 0x8e00;
}

static void setup_idt(void)
{
    for (int v = 0; v < 32; v++)
        set_gate(v, isr_fault);
    set_gate(2, isr_0x02);
    set_gate(0x40, isr_0x40);
    set_gate(0x41, isr_0x41);
    set_gate(0x42, isr_0x42);
    set_gate(0x43, isr_0x43);
    set_gate(0x50, isr_0x50);
    set_gate(0x60, isr_0x60);
    set_gate(0x61, isr_0x61);
    set_gate(0xff, isr_0xff);
    idtr.limit = sizeof(idt) - 1;
    idtr.base = (u32)idt;
}

static void load_idt_and_enable_apic(void)
{
    __asm__ volatile("lidt %0" : : "m"(idtr));
    wr(LAPIC + 0xf0, 0x1ff);         /* SVR: enabled, spurious vector 0xff */
    wr(LAPIC + 0x80, 0);             /* TPR: accept everything */
}

/* ---- APs ---- */

void ap_main(u32 index)
{
    (void)index;
    load_idt_and_enable_apic();
    xadd(&aps_started, 1);
    for (int i = 0; i < COUNT; i++)
        xadd(&counter, 1);
    xadd(&aps_ready, 1);
    for (;;)
        __asm__ volatile("sti; hlt");  /* wait for IPIs */
}

static int wait_for(volatile u32 *v, u32 want)
{
    for (u32 i = 0; i < SPIN; i++) {
        if (*v >= want)
            return 1;
        pause();
    }
    return 0;
}

/* ---- BSP ---- */

static u32 fw_cfg_cpus(void)
{
    outw(0x510, 0x05);
    return inb(0x511) | (inb(0x511) << 8);
}

static void ioapic_route(u32 gsi, u32 low)
{
    wr(IOAPIC, 0x11 + 2 * gsi);
    wr(IOAPIC + 0x10, 0);            /* destination: APIC ID 0 */
    wr(IOAPIC, 0x10 + 2 * gsi);
    wr(IOAPIC + 0x10, low);
}

static int memeq(const char *a, const char *b, int n)
{
    for (int i = 0; i < n; i++)
        if (a[i] != b[i]) return 0;
    return 1;
}

static u32 acpi_poweroff(void)
{
    u32 rsdp = 0;
    for (u32 a = 0xe0000; a < 0x100000; a += 16)
        if (memeq((const char *)a, "RSD PTR ", 8)) { rsdp = a; break; }
    if (!rsdp) return fail("no RSDP");
    u32 rsdt = rd(rsdp + 16), fadt = 0;
    u32 n = (rd(rsdt + 4) - 36) / 4;
    for (u32 i = 0; i < n; i++) {
        u32 t = rd(rsdt + 36 + 4 * i);
        if (memeq((const char *)t, "FACP", 4)) fadt = t;
    }
    if (!fadt) return fail("no FADT");
    u32 dsdt = rd(fadt + 40), pm1a_cnt = rd(fadt + 64);
    u32 len = rd(dsdt + 4);
    u32 typ = 0xff;
    for (u32 i = 36; i + 8 < len; i++) {
        const u8 *p = (const u8 *)(dsdt + i);
        if (memeq((const char *)p, "_S5_", 4) && p[4] == 0x12) {
            const u8 *e = p + 7;     /* PackageOp, 1-byte PkgLength, NumElements */
            typ = *e == 0x0a ? e[1] : *e;
            break;
        }
    }
    if (typ > 7) return fail("no \\_S5 in the DSDT");
    puts("acpi: S5 SLP_TYP=");
    putdec(typ);
    puts(" PM1a_CNT=");
    puthex(pm1a_cnt);
    putc('\n');
    outw((u16)pm1a_cnt, (u16)((typ << 10) | (1 << 13)));
    for (u32 i = 0; i < SPIN; i++)
        pause();
    return fail("still running after S5");
}

/* TSC-deadline mode: LVT timer mode 2; the interrupt comes once the TSC reaches the
 * deadline (never before); a deadline of 0 disarms, one in the past fires at once. */
static u32 tsc_deadline(void)
{
    timer_ticks = 0;
    wr(LAPIC + 0x320, 0x40050);
    u64 t0 = rdtsc();
    wrmsr(0x6e0, t0 + 2000000);
    while (timer_ticks < 1)
        __asm__ volatile("sti; hlt; cli");
    u64 t1 = rdtsc();
    u32 first = timer_ticks;
    if (rdmsr(0x6e0) != 0) return fail("TSC_DEADLINE not cleared after it fired");
    wrmsr(0x6e0, 1);                 /* in the past: at once */
    while (timer_ticks < 2)
        __asm__ volatile("sti; hlt; cli");
    wrmsr(0x6e0, rdtsc() + 1000000);
    wrmsr(0x6e0, 0);                 /* disarmed: no third interrupt */
    for (int i = 0; i < 3000000; i++)
        pause();
    wr(LAPIC + 0x320, 0x10050);
    puts("tsc-deadline: ");
    putdec(first);
    puts(" after the deadline, past 1, disarmed ");
    putdec(timer_ticks - 2);
    putc('\n');
    if (t1 - t0 < 2000000 || first != 1 || timer_ticks != 2) return fail("tsc-deadline");
    return 0;
}

/* x2APIC on the BSP: enable through IA32_APIC_BASE, then the ID, a ping to every AP
 * through the 64-bit ICR (the APs answer through their xAPIC page), a SELF IPI, EOI
 * and the timer (one-shot) through MSRs. */
static u32 x2apic(u32 pings_before)
{
    u64 base = rdmsr(0x1b);
    wrmsr(0x1b, base | (1u << 10));
    x2 = 1;
    u32 id = (u32)rdmsr(0x802);
    u32 ldr = (u32)rdmsr(0x80d);
    __asm__ volatile("sti");
    u32 sent = pings_before, got = 0;
    for (u32 ap = 1; ap < ncpus; ap++) {
        wrmsr(0x830, (u64)ap << 32 | 0x40);
        sent++;
        if (!wait_for(&pongs, sent)) return fail("no x2APIC pong");
        got++;
    }
    wrmsr(0x83f, 0x43);              /* SELF IPI */
    if (!wait_for(&self_ipis, 1)) return fail("no SELF IPI");
    __asm__ volatile("cli");
    timer_ticks = 0;
    wrmsr(0x83e, 0xb);
    wrmsr(0x832, 0x50);              /* one-shot */
    wrmsr(0x838, 100000);
    while (timer_ticks < 1)
        __asm__ volatile("sti; hlt; cli");
    wrmsr(0x832, 0x10050);
    puts("x2apic: id ");
    putdec(id);
    puts(", ldr ");
    puthex(ldr);
    puts(", pings ");
    putdec(got);
    puts(", self-ipi ");
    putdec(self_ipis);
    puts(", timer ");
    putdec(timer_ticks);
    putc('\n');
    if (id != 0 || ldr != 1 || got != ncpus - 1 || self_ipis != 1) return fail("x2apic");
    return 0;
}

static u32 cmdline_value(u32 mbi, const char *key, int len)
{
    if (!(rd(mbi) & (1 << 2)))
        return 0;
    const char *s = (const char *)rd(mbi + 16);
    for (; *s; s++)
        if (memeq(s, key, len)) {
            u32 v = 0;
            for (s += len; *s >= '0' && *s <= '9'; s++)
                v = v * 10 + (u32)(*s - '0');
            return v;
        }
    return 0;
}

static u32 bench(u32 n, u32 ticks)
{
    if (ncpus < 2) return fail("bench needs 2 CPUs");
    __asm__ volatile("sti");
    for (u32 k = 1; k <= n; k++) {
        send_ipi(1, 0x40);
        while (pongs < k)
            pause();
    }
    __asm__ volatile("cli");
    timer_ticks = 0;
    wr(LAPIC + 0x3e0, 0xb);
    wr(LAPIC + 0x320, 0x20050);      /* periodic, 20 us */
    wr(LAPIC + 0x380, 20000);
    while (timer_ticks < ticks)
        __asm__ volatile("sti; hlt; cli");
    wr(LAPIC + 0x320, 0x10050);
    puts("bench: ");
    putdec(pongs);
    puts(" round trips, ");
    putdec(timer_ticks >= ticks ? ticks : timer_ticks);
    puts(" timer interrupts\n");
    return acpi_poweroff();
}

u32 smp_main(u32 mbi)
{
    u32 bench_n = cmdline_value(mbi, "bench=", 6);
    u32 bench_ticks = cmdline_value(mbi, "ticks=", 6);
    ncpus = fw_cfg_cpus();
    puts("cpus: ");
    putdec(ncpus);
    putc('\n');
    if (ncpus < 1 || ncpus > 16) return fail("cpu count");
    outb(0x21, 0xff);                /* mask the 8259s (a BIOS may have left the PIT on) */
    outb(0xa1, 0xff);
    setup_idt();
    load_idt_and_enable_apic();
    if (apic_id() != 0) return fail("BSP APIC ID");

    /* (a) INIT, SIPI, SIPI to all but self; lock xadd on every CPU */
    u8 *dst = (u8 *)TRAMP;
    for (char *s = ap_tramp; s < ap_tramp_end; s++)
        *dst++ = (u8)*s;
    if (ncpus > 1) {
        send_ipi(0, 0x000c4500);     /* INIT, level assert, all excluding self */
        send_ipi(0, 0x000c4600 | (TRAMP >> 12));
        send_ipi(0, 0x000c4600 | (TRAMP >> 12));
    }
    for (int i = 0; i < COUNT; i++)
        xadd(&counter, 1);
    if (!wait_for(&aps_ready, ncpus - 1)) return fail("APs did not finish");
    puts("aps: ");
    putdec(aps_started);
    puts(" started, counter=");
    putdec(counter);
    puts(counter == ncpus * COUNT ? " (exact)\n" : " (WRONG)\n");
    if (counter != ncpus * COUNT || aps_started != ncpus - 1) return fail("counter");
    if (bench_n)
        return bench(bench_n, bench_ticks);

    /* (b) IPIs both ways, then a broadcast */
    __asm__ volatile("sti");
    u32 sent = 0;
    for (u32 id = 1; id < ncpus; id++)
        for (int k = 0; k < PINGS; k++) {
            send_ipi(id, 0x40);
            sent++;
            if (!wait_for(&pongs, sent)) return fail("no pong");
        }
    send_ipi(0, 0x000c0042);         /* fixed, all excluding self */
    if (!wait_for(&broadcasts, ncpus - 1)) return fail("broadcast");
    u32 got = 0;
    for (u32 id = 1; id < ncpus; id++)
        got += pings[id];
    puts("ipi: ");
    putdec(got);
    puts(" pings, ");
    putdec(pongs);
    puts(" pongs, broadcast ");
    putdec(broadcasts);
    putc('\n');
    if (got != sent || pongs != sent) return fail("ipi counts");

    /* (e) NMI to self (physical destination = own ID) with IF=0: taken at once; the
     * handler sends a second one, which waits for its IRET (NMI blocking) */
    __asm__ volatile("cli");
    send_ipi(0, 0x400);
    if (!wait_for(&nmis, 2)) return fail("NMI with IF=0");
    puts("nmi: ");
    putdec(nmis);
    puts(" taken with IF=0, deepest nesting ");
    putdec(nmi_deepest);
    putc('\n');
    if (nmi_deepest != 1) return fail("nested NMI");

    /* (c) APIC timer: one-shot, periodic; TSC-deadline if CPUID offers it */
    wr(LAPIC + 0x3e0, 0xb);          /* divide by 1 */
    wr(LAPIC + 0x320, 0x50);         /* one-shot, vector 0x50 */
    wr(LAPIC + 0x380, 1000000);
    while (timer_ticks < 1)
        __asm__ volatile("sti; hlt; cli");
    for (int i = 0; i < 3000000 && timer_ticks == 1; i++)
        pause();
    u32 oneshot = timer_ticks;
    timer_ticks = 0;
    wr(LAPIC + 0x320, 0x20050);      /* periodic */
    wr(LAPIC + 0x380, 200000);
    while (timer_ticks < TICKS)
        __asm__ volatile("sti; hlt; cli");
    wr(LAPIC + 0x320, 0x10050);      /* masked */
    wr(LAPIC + 0x380, 0);
    u32 a, b, c, d;
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(1), "c"(0));
    puts("timer: one-shot ");
    putdec(oneshot);
    puts(", periodic ");
    putdec(timer_ticks);
    puts(c & (1u << 24) ? ", tsc-deadline offered\n" : ", tsc-deadline not offered\n");
    if (oneshot != 1) return fail("one-shot");
    if (c & (1u << 24)) {
        u32 r = tsc_deadline();
        if (r) return r;
    }
    if (c & (1u << 21)) {
        u32 r = x2apic(sent);
        if (r) return r;
    } else {
        puts("x2apic: not offered\n");
    }

    /* I/O APIC: the PIT on GSI 2 and the UART on GSI 4, with the 8259 masked */
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
    ioapic_route(2, 0x60);           /* edge, physical, fixed */
    ioapic_route(4, 0x61);
    outb(0x43, 0x34);                /* PIT counter 0, mode 2, 1 kHz */
    outb(0x40, 1193 & 0xff);
    outb(0x40, 1193 >> 8);
    while (pit_ticks < TICKS)
        __asm__ volatile("sti; hlt; cli");
    ioapic_route(2, 0x10060);        /* masked */
    outb(COM1 + 1, 0x02);            /* IER: THRE interrupt */
    while (uart_ints < 1)
        __asm__ volatile("sti; hlt; cli");
    puts("ioapic: pit ");
    putdec(pit_ticks >= TICKS ? TICKS : pit_ticks);
    puts(", uart ");
    putdec(uart_ints);
    putc('\n');

    /* (d) power off through ACPI */
    return acpi_poweroff();
}
