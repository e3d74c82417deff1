/*
 * tsc_hz: the host's TSC rate in Hz, for bench/emu_bench.py to turn the TSC cycles its
 * guests print into seconds: RDTSC over 200 ms of CLOCK_MONOTONIC_RAW, printed once.
 */
#include <stdint.h>
#include <stdio.h>
#include <time.h>
#include <x86intrin.h>

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_RAW, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

int main(void)
{
    double t0 = now(), t1;
    uint64_t c0 = __rdtsc(), c1;
    do {
        t1 = now();
    } while (t1 - t0 < 0.2);
    c1 = __rdtsc();
    printf("%.0f\n", (double)(c1 - c0) / (t1 - t0));
    return 0;
}
