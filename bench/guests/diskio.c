/* diskio: the guest side of bench/virtio_bench.py, built static and added to the
 * initramfs. O_DIRECT I/O on a block device, so every request reaches the device.
 *
 *     diskio MODE DEV COUNT BS SPAN      MODE: seqread | seqwrite | randread | randwrite
 *
 * COUNT requests of BS bytes; sequential from offset 0, random (xorshift64, fixed seed,
 * so both peers do the same requests) over the first SPAN bytes; writes end with fsync.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: diskio MODE DEV COUNT BS SPAN\n");
        return 2;
    }
    const char *mode = argv[1];
    int wr = strstr(mode, "write") != NULL;
    int rnd = strncmp(mode, "rand", 4) == 0;
    long count = atol(argv[3]);
    size_t bs = (size_t)atol(argv[4]);
    unsigned long long blocks = strtoull(argv[5], NULL, 0) / bs;
    int fd = open(argv[2], (wr ? O_WRONLY : O_RDONLY) | O_DIRECT);
    void *buf;
    if (fd < 0 || blocks == 0 || posix_memalign(&buf, 4096, bs)) {
        perror("diskio");
        return 1;
    }
    memset(buf, 0x5a, bs);
    unsigned long long x = 88172645463325252ULL;
    for (long i = 0; i < count; i++) {
        unsigned long long b = (unsigned long long)i % blocks;
        if (rnd) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b = x % blocks;
        }
        ssize_t n = wr ? pwrite(fd, buf, bs, (off_t)(b * bs)) : pread(fd, buf, bs, (off_t)(b * bs));
        if (n != (ssize_t)bs) {
            perror("diskio: I/O");
            return 1;
        }
    }
    if (wr && fsync(fd)) {
        perror("diskio: fsync");
        return 1;
    }
    return 0;
}
