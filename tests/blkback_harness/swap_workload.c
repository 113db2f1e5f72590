/* Guest workload for tests/remote_swap_guest.rs: touches far more memory than the guest
 * has, so most of it lives on the swap device, and checks every byte it wrote.
 *
 *   swap_workload MIB
 *   1. fill MIB MiB, page by page, with a stream derived from (page, round 1)
 *   2. print REMOCA-KILL-NOW and wait for a line on the console (the host kills a memory
 *      server, then answers)
 *   3. verify every page; rewrite every other page with round 2
 *   4. verify every page again
 *   5. print REMOCA-VERDICT ok|bad pages=N bad=K
 */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#define PAGE 4096

static void fill(uint64_t *p, uint64_t page, uint64_t round) {
    uint64_t x = (page + 1) * 0x9E3779B97F4A7C15ull ^ round * 0xD1B54A32D192ED03ull;
    for (int i = 0; i < PAGE / 8; i++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        p[i] = x;
    }
}

static int check(const uint64_t *p, uint64_t page, uint64_t round) {
    uint64_t want[PAGE / 8];
    fill(want, page, round);
    for (int i = 0; i < PAGE / 8; i++)
        if (p[i] != want[i]) return 1;
    return 0;
}

static uint64_t verify(unsigned char *mem, uint64_t pages, const unsigned char *round) {
    uint64_t bad = 0;
    for (uint64_t i = 0; i < pages; i++)
        if (check((uint64_t *)(mem + i * PAGE), i, round[i])) {
            if (bad < 5) printf("REMOCA-BAD-PAGE %llu\n", (unsigned long long)i);
            bad++;
        }
    return bad;
}

int main(int argc, char **argv) {
    uint64_t mib = argc > 1 ? strtoull(argv[1], 0, 10) : 128;
    uint64_t pages = mib * 256;
    setvbuf(stdout, 0, _IONBF, 0);
    unsigned char *mem = mmap(0, pages * PAGE, PROT_READ | PROT_WRITE,
                              MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    unsigned char *round = calloc(pages, 1);
    if (mem == MAP_FAILED || !round) { printf("REMOCA-VERDICT bad alloc\n"); return 1; }
    for (uint64_t i = 0; i < pages; i++) { round[i] = 1; fill((uint64_t *)(mem + i * PAGE), i, 1); }
    printf("REMOCA-FILLED %llu MiB\n", (unsigned long long)mib);
    printf("REMOCA-KILL-NOW\n");
    int con = open("/dev/console", O_RDONLY);
    char c = 0;
    while (con >= 0 && read(con, &c, 1) == 1 && c != '\n') {}
    printf("REMOCA-RESUMED\n");
    uint64_t bad = verify(mem, pages, round);
    for (uint64_t i = 0; i < pages; i += 2) { round[i] = 2; fill((uint64_t *)(mem + i * PAGE), i, 2); }
    bad += verify(mem, pages, round);
    printf("REMOCA-VERDICT %s pages=%llu bad=%llu\n", bad ? "bad" : "ok",
           (unsigned long long)pages, (unsigned long long)bad);
    return bad != 0;
}
