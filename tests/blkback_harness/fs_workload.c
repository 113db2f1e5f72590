/* Guest workload for tests/failover_guest.rs: a checksummed file workload on a mounted
 * filesystem, run while the host kills the driver behind the guest's disk.
 *
 *   fs_workload run DIR NFILES STATE
 *     Print REMOCA-WORKLOAD-START, then in rounds r = 1, 2, ...: write every file
 *     DIR/f_<i> (i < NFILES) with the content of (r, i) — a temporary file written, fsynced,
 *     renamed over f_<i>, directory fsynced — then sync, drop the page cache and read every
 *     file back from the disk (REMOCA-ROUND r verified=N bad=K). After a round, a line on
 *     the console (fd 0) ends the loop. Then print the disk offset of f_0's first block
 *     (REMOCA-TARGET offset=BYTES, what a host may corrupt to prove the check works) and
 *     write the last complete round to STATE (in the initramfs, not on the disk).
 *   fs_workload verify DIR NFILES STATE
 *     Read every file back and print REMOCA-FINAL files=N verified=V bad=K ioerr=E round=R.
 *
 * Content of (r, i): size 4096 * (1 + h % 16) + (h >> 8) % 4096 bytes with h = mix(r, i),
 * bytes from a xorshift64 stream seeded by mix(r, i) (little-endian words). The host checks
 * the same formula on the image after the guest powered off. Every failed system call is
 * counted as an I/O error and printed (REMOCA-IOERR).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#define MAX_SIZE (4096 * 17)

static unsigned long long ioerr;

static uint64_t mix(uint64_t r, uint64_t i) {
    uint64_t z = (r << 32 | i) + 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return (z ^ (z >> 31)) | 1;
}

static size_t content(unsigned char *buf, uint64_t r, uint64_t i) {
    uint64_t h = mix(r, i);
    size_t size = 4096 * (1 + h % 16) + (h >> 8) % 4096;
    uint64_t x = h;
    for (size_t off = 0; off < size; off += 8) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        for (int b = 0; b < 8 && off + b < size; b++) buf[off + b] = (unsigned char)(x >> (8 * b));
    }
    return size;
}

static void fail(const char *op, const char *path) {
    ioerr++;
    printf("REMOCA-IOERR %s %s: %s\n", op, path, strerror(errno));
}

static int write_all(int fd, const unsigned char *p, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w <= 0) return -1;
        p += w; n -= (size_t)w;
    }
    return 0;
}

static void write_file(const char *dir, int dfd, uint64_t r, uint64_t i, unsigned char *buf) {
    char tmp[512], path[512];
    snprintf(tmp, sizeof tmp, "%s/.tmp_%llu", dir, (unsigned long long)i);
    snprintf(path, sizeof path, "%s/f_%llu", dir, (unsigned long long)i);
    size_t size = content(buf, r, i);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) { fail("open", tmp); return; }
    if (write_all(fd, buf, size)) fail("write", tmp);
    if (fsync(fd)) fail("fsync", tmp);
    if (close(fd)) fail("close", tmp);
    if (rename(tmp, path)) fail("rename", path);
    if (fsync(dfd)) fail("fsync", dir);
}

/* 0 when f_<i> holds the content of (r, i). */
static int check_file(const char *dir, uint64_t r, uint64_t i, unsigned char *want, unsigned char *got) {
    char path[512];
    snprintf(path, sizeof path, "%s/f_%llu", dir, (unsigned long long)i);
    size_t size = content(want, r, i);
    int fd = open(path, O_RDONLY);
    if (fd < 0) { fail("open", path); return 1; }
    size_t have = 0;
    for (;;) {
        ssize_t n = read(fd, got + have, MAX_SIZE + 1 - have);
        if (n < 0) { fail("read", path); close(fd); return 1; }
        if (n == 0 || have + (size_t)n > MAX_SIZE) { have += (size_t)n; break; }
        have += (size_t)n;
    }
    close(fd);
    if (have != size || memcmp(want, got, size) != 0) {
        size_t at = 0;
        while (at < size && at < have && want[at] == got[at]) at++;
        printf("REMOCA-BAD-FILE %s round %llu: %zu bytes (want %zu), first difference at %zu\n",
               path, (unsigned long long)r, have, size, at);
        return 1;
    }
    return 0;
}

static unsigned long long verify_all(const char *dir, uint64_t r, uint64_t n, unsigned char *a,
                                     unsigned char *b) {
    unsigned long long bad = 0;
    for (uint64_t i = 0; i < n; i++) bad += (unsigned long long)check_file(dir, r, i, a, b);
    return bad;
}

static void drop_caches(void) {
    sync();
    int fd = open("/proc/sys/vm/drop_caches", O_WRONLY);
    if (fd < 0 || write(fd, "3\n", 2) != 2) fail("drop_caches", "/proc/sys/vm/drop_caches");
    if (fd >= 0) close(fd);
}

static int line_waiting(void) {
    struct pollfd p = { .fd = 0, .events = POLLIN };
    if (poll(&p, 1, 0) == 1 && (p.revents & POLLIN)) {
        char line[64];
        ssize_t n = read(0, line, sizeof line);
        (void)n;
        return 1;
    }
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, 0, _IONBF, 0);
    if (argc != 5) { printf("usage: fs_workload run|verify DIR NFILES STATE\n"); return 2; }
    const char *dir = argv[2];
    uint64_t n = strtoull(argv[3], 0, 10);
    const char *state = argv[4];
    unsigned char *a = malloc(MAX_SIZE + 1), *b = malloc(MAX_SIZE + 1);
    if (!a || !b || n == 0) { printf("REMOCA-FINAL bad setup\n"); return 2; }

    if (strcmp(argv[1], "verify") == 0) {
        unsigned long long r = 0;
        FILE *f = fopen(state, "r");
        if (!f || fscanf(f, "%llu", &r) != 1) { printf("REMOCA-FINAL no state in %s\n", state); return 1; }
        fclose(f);
        unsigned long long bad = verify_all(dir, r, n, a, b);
        printf("REMOCA-FINAL files=%llu verified=%llu bad=%llu ioerr=%llu round=%llu\n",
               (unsigned long long)n, (unsigned long long)n - bad, bad, ioerr, r);
        return bad || ioerr ? 1 : 0;
    }

    int dfd = open(dir, O_RDONLY | O_DIRECTORY);
    if (dfd < 0) { fail("open", dir); printf("REMOCA-FINAL no directory\n"); return 1; }
    printf("REMOCA-WORKLOAD-START files=%llu\n", (unsigned long long)n);
    uint64_t r = 0;
    unsigned long long bad_total = 0;
    while (r < 10000) {
        r++;
        for (uint64_t i = 0; i < n; i++) write_file(dir, dfd, r, i, a);
        drop_caches();
        unsigned long long bad = verify_all(dir, r, n, a, b);
        bad_total += bad;
        printf("REMOCA-ROUND %llu verified=%llu bad=%llu ioerr=%llu\n", (unsigned long long)r,
               (unsigned long long)n - bad, bad, ioerr);
        if (line_waiting()) break;
    }
    close(dfd);
    char f0[512];
    snprintf(f0, sizeof f0, "%s/f_0", dir);
    int fd = open(f0, O_RDONLY);
    int bsz = 0, blk = 0;
    if (fd < 0 || ioctl(fd, FIGETBSZ, &bsz) || ioctl(fd, FIBMAP, &blk)) fail("fibmap", f0);
    else printf("REMOCA-TARGET offset=%llu\n", (unsigned long long)blk * (unsigned long long)bsz);
    if (fd >= 0) close(fd);
    FILE *s = fopen(state, "w");
    if (!s || fprintf(s, "%llu\n", (unsigned long long)r) < 0 || fclose(s)) fail("write", state);
    printf("REMOCA-WORKLOAD-END rounds=%llu bad=%llu ioerr=%llu\n", (unsigned long long)r,
           bad_total, ioerr);
    return bad_total || ioerr ? 1 : 0;
}
