/*
 * pi: prints the first DIGITS decimal digits of pi on COM1, computed with integer
 * arithmetic only: the Rabinowitz-Wagon spigot in its base-10000 form (four digits
 * per outer step; after D. T. Winter's well-known C program). A wrong add, multiply,
 * divide or remainder anywhere shows up as wrong digits.
 *
 * Built freestanding for 32-bit protected mode (no libc): gcc -m32 -ffreestanding
 * -fno-pic -mgeneral-regs-only -nostdlib -O2; pi_start.S calls pi_main().
 * Output: "pi=3.1415...\n"; pi_main returns 0x0c (pyhv exits with status 25).
 */
#define COM1      0x3f8
#define COM1_LSR  0x3fd
#define LSR_THRE  0x20

#define DIGITS    256                  /* a multiple of 4 */
#define TERMS     (DIGITS / 4 * 14)    /* 14 series terms per 4 digits */

static inline void outb(unsigned short port, unsigned char v)
{
    __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static inline unsigned char inb(unsigned short port)
{
    unsigned char v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

static void putc(char c)
{
    while (!(inb(COM1_LSR) & LSR_THRE))
        ;
    outb(COM1, (unsigned char)c);
}

static void puts(const char *s)
{
    while (*s)
        putc(*s++);
}

/* gcc may emit calls to these even when freestanding */
void *memset(void *d, int c, unsigned long n)
{
    unsigned char *p = d;
    while (n--)
        *p++ = (unsigned char)c;
    return d;
}

void *memcpy(void *d, const void *s, unsigned long n)
{
    unsigned char *p = d;
    const unsigned char *q = s;
    while (n--)
        *p++ = *q++;
    return d;
}

static unsigned int f[TERMS + 1];

int pi_main(void)
{
    unsigned int b, c, d, e = 0, g, group;
    int first = 1;

    puts("pi=");
    for (b = 0; b < TERMS; b++)
        f[b] = 10000 / 5;
    for (c = TERMS; c > 0; c -= 14) {
        d = 0;
        g = c * 2;
        b = c;
        for (;;) {
            d += f[b] * 10000;
            f[b] = d % --g;
            d /= g--;
            if (--b == 0)
                break;
            d *= b;
        }
        group = e + d / 10000;
        e = d % 10000;
        for (unsigned int div = 1000; div > 0; div /= 10) {
            putc((char)('0' + group / div % 10));
            if (first) {
                putc('.');
                first = 0;
            }
        }
    }
    putc('\n');
    return 0x0c;
}
