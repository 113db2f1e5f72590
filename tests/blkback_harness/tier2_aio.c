/* Guest workload for tests/xen-qemu/dom0-tests/tier2.sh (failover tier 2: the driver domain
 * serving this disk dies and the guest is moved to a standby driver domain through a
 * suspend/resume, docs/failover.md).
 *
 *   tier2_aio DEVICE ROUNDS LASTFILE
 *
 * Each round writes BLOCKS blocks of 64 KiB of fresh data (derived from a random per-run seed,
 * the round and the block) at the start of DEVICE with Linux AIO and O_DIRECT, all in flight at
 * once, then a flush (IOCB_CMD_FDSYNC), then reads them all back the same way and compares.
 *
 * Why AIO: Linux suspends a PV guest only after freezing its tasks (drivers/xen/manage.c,
 * do_suspend -> freeze_processes), and a task in uninterruptible sleep cannot be frozen. A
 * task waiting in read(2)/write(2)/fsync(2) for a request the dead driver domain will never
 * answer is such a task, so the guest could not be suspended at all. io_getevents(2) waits
 * interruptibly: the freezer stops the task there (the call returns EINTR afterwards) while
 * its requests stay on the ring, and blkfront re-issues them to the new backend on resume.
 *
 * Output, one line each:
 *   ROUND r                       before round r
 *   EINTR r pending=N             io_getevents was interrupted (the suspend) with N requests
 *                                 of round r still unanswered
 *   VERDICT rounds=R mismatches=M ioerrors=E eintr=I maxpending=P
 * and the last round's data is written to LASTFILE (dom0 checks the image holds it).
 * Exit status 0 when every round was read back equal with no I/O error.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/aio_abi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define BLOCK (64 * 1024)
#define BLOCKS 32

static aio_context_t ctx;
static long eintr_count, max_pending, io_errors;

static void fill(uint64_t *p, uint64_t seed, uint64_t round, uint64_t block) {
    uint64_t x = seed ^ (round + 1) * 0x9E3779B97F4A7C15ull ^ (block + 1) * 0xD1B54A32D192ED03ull;
    for (size_t i = 0; i < BLOCK / 8; i++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        p[i] = x;
    }
}

/* Submit n iocbs and wait for all of them; count failed ones. */
static void run_batch(struct iocb *cbs, int n, long round, size_t want) {
    struct iocb *ptrs[BLOCKS + 1];
    struct io_event ev[BLOCKS + 1];
    for (int i = 0; i < n; i++) ptrs[i] = &cbs[i];
    int done = 0;
    while (done < n) {
        long r = syscall(SYS_io_submit, ctx, n - done, ptrs + done);
        if (r < 0) {
            if (errno == EINTR || errno == EAGAIN) continue;
            perror("io_submit");
            exit(2);
        }
        done += (int)r;
    }
    if (n > max_pending) max_pending = n;
    int got = 0;
    while (got < n) {
        long r = syscall(SYS_io_getevents, ctx, 1, n - got, ev, NULL);
        if (r < 0) {
            if (errno == EINTR) {
                eintr_count++;
                printf("EINTR %ld pending=%d\n", round, n - got);
                fflush(stdout);
                continue;
            }
            perror("io_getevents");
            exit(2);
        }
        for (long i = 0; i < r; i++) {
            if (ev[i].res < 0 || (want && (size_t)ev[i].res != want)) {
                io_errors++;
                printf("IOERR %ld res=%lld\n", round, (long long)ev[i].res);
                fflush(stdout);
            }
        }
        got += (int)r;
    }
}

/* One request per block: block b of buf at offset b * BLOCK of the device. */
static void prepare(struct iocb *cbs, int fd, int opcode, uint8_t *buf) {
    memset(cbs, 0, sizeof(struct iocb) * BLOCKS);
    for (int b = 0; b < BLOCKS; b++) {
        cbs[b].aio_fildes = fd;
        cbs[b].aio_lio_opcode = opcode;
        cbs[b].aio_buf = (uint64_t)(uintptr_t)(buf + (size_t)b * BLOCK);
        cbs[b].aio_nbytes = BLOCK;
        cbs[b].aio_offset = (int64_t)b * BLOCK;
    }
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: tier2_aio DEVICE ROUNDS LASTFILE\n");
        return 2;
    }
    long rounds = strtol(argv[2], NULL, 10);
    int fd = open(argv[1], O_RDWR | O_DIRECT);
    if (fd < 0) { perror(argv[1]); return 2; }
    uint64_t seed;
    int rnd = open("/dev/urandom", O_RDONLY);
    if (rnd < 0 || read(rnd, &seed, sizeof seed) != sizeof seed) { perror("urandom"); return 2; }
    close(rnd);
    if (syscall(SYS_io_setup, BLOCKS + 1, &ctx) < 0) { perror("io_setup"); return 2; }

    uint8_t *wbuf, *rbuf;
    if (posix_memalign((void **)&wbuf, 4096, (size_t)BLOCK * BLOCKS) ||
        posix_memalign((void **)&rbuf, 4096, (size_t)BLOCK * BLOCKS)) {
        fprintf(stderr, "out of memory\n");
        return 2;
    }
    struct iocb cbs[BLOCKS];
    long mismatches = 0, r;
    for (r = 1; r <= rounds; r++) {
        printf("ROUND %ld\n", r);
        fflush(stdout);
        for (int b = 0; b < BLOCKS; b++) fill((uint64_t *)(wbuf + (size_t)b * BLOCK), seed, r, b);

        prepare(cbs, fd, IOCB_CMD_PWRITE, wbuf);
        run_batch(cbs, BLOCKS, r, BLOCK);

        memset(cbs, 0, sizeof cbs[0]);
        cbs[0].aio_fildes = fd;
        cbs[0].aio_lio_opcode = IOCB_CMD_FDSYNC;
        run_batch(cbs, 1, r, 0);

        memset(rbuf, 0, (size_t)BLOCK * BLOCKS);
        prepare(cbs, fd, IOCB_CMD_PREAD, rbuf);
        run_batch(cbs, BLOCKS, r, BLOCK);
        if (memcmp(wbuf, rbuf, (size_t)BLOCK * BLOCKS) != 0) {
            mismatches++;
            printf("MISMATCH %ld\n", r);
            fflush(stdout);
        }
    }
    FILE *last = fopen(argv[3], "wb");
    if (!last || fwrite(wbuf, 1, (size_t)BLOCK * BLOCKS, last) != (size_t)BLOCK * BLOCKS || fclose(last)) {
        perror(argv[3]);
        return 2;
    }
    printf("VERDICT rounds=%ld mismatches=%ld ioerrors=%ld eintr=%ld maxpending=%ld\n", r - 1,
           mismatches, io_errors, eintr_count, max_pending);
    fflush(stdout);
    return (mismatches == 0 && io_errors == 0) ? 0 : 1;
}
