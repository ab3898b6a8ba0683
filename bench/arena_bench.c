/*
 * bench/arena_bench.c - what the arena costs, beside what it is measured
 * against in the same run.
 *
 * Prints one line per case, as space-separated key=value pairs:
 *   alloc_free  alloc+free pairs per second, 1 and 2 processes, fixed and mixed sizes
 *   copy        copying a buffer into arena memory (reused by this process, reused
 *               after another process, never used, prefaulted in the background)
 *               against memcpy into already-touched private memory
 * Usage: arena_bench [--size-mib N] [--reps N]
 */
#define _GNU_SOURCE
#include <shoal/arena.h>

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MiB (1024ull * 1024ull)

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, cmp_d);
    return v[n / 2];
}

static void die(const char *what, int rc)
{
    fprintf(stderr, "arena_bench: %s: %s\n", what, strerror(-rc));
    exit(1);
}

static shoal_arena *make(uint64_t heap, uint64_t retain, uint32_t flags, uint64_t ahead)
{
    shoal_arena_opts o = {.heap_size = heap, .retain_bytes = retain, .flags = flags, .prefault_ahead = ahead};
    shoal_arena *a;
    int rc = shoal_arena_create(&o, &a);
    if (rc < 0)
        die("create", rc);
    return a;
}

/* ---- alloc/free throughput ------------------------------------------------ */

/* n alloc+free pairs with up to 16 blocks live; sizes fixed or mixed. */
static void churn(shoal_arena *a, long n, uint64_t size, unsigned seed)
{
    shoal_handle live[16];
    int k = 0;
    for (long i = 0; i < n; i++) {
        uint64_t len = size ? size : (64u << (rand_r(&seed) % 11));
        if (k == 16) {
            int j = rand_r(&seed) % 16;
            int rc = shoal_arena_release(a, live[j]);
            if (rc < 0)
                die("release", rc);
            live[j] = live[--k];
        }
        int rc = shoal_arena_alloc(a, len, &live[k]);
        if (rc < 0)
            die("alloc", rc);
        k++;
    }
    while (k)
        shoal_arena_release(a, live[--k]);
}

static void bench_alloc_free(int procs, uint64_t size, long n)
{
    shoal_arena *a = make(256 * MiB, 0, 0, 0);
    churn(a, 10000, size, 1); /* warm up: commit the memory this will use */
    double t = now();
    pid_t pids[8];
    for (int p = 0; p < procs; p++) {
        pids[p] = fork();
        if (pids[p] == 0) {
            shoal_arena *b;
            int rc = shoal_arena_attach(shoal_arena_fd(a), &b);
            if (rc < 0)
                die("attach", rc);
            churn(b, n, size, 100u + (unsigned)p);
            shoal_arena_close(b);
            _exit(0);
        }
    }
    for (int p = 0; p < procs; p++)
        waitpid(pids[p], NULL, 0);
    t = now() - t;
    char msg[256];
    if (shoal_arena_check(a, msg, sizeof msg) < 0) {
        fprintf(stderr, "arena_bench: invariant broken: %s\n", msg);
        exit(1);
    }
    printf("bench=arena case=alloc_free procs=%d size=%s pairs=%ld seconds=%.3f pairs_per_s=%.0f\n", procs,
           size ? "256" : "64..65536", n * procs, t, (double)(n * procs) / t);
    fflush(stdout);
    shoal_arena_close(a);
}

/* ---- copying into arena memory -------------------------------------------- */

static void report_copy(const char *variant, uint64_t bytes, double secs, double base_secs, double extra)
{
    printf("bench=arena case=copy variant=%s bytes=%llu seconds=%.4f gb_per_s=%.2f ratio_vs_memcpy=%.2f", variant,
           (unsigned long long)bytes, secs, (double)bytes / secs / 1e9, base_secs / secs);
    if (extra >= 0)
        printf(" alloc_seconds=%.4f", extra);
    printf("\n");
    fflush(stdout);
}

static void *ptr_of(shoal_arena *a, shoal_handle h)
{
    void *p;
    int rc = shoal_arena_ptr(a, h, &p);
    if (rc < 0)
        die("ptr", rc);
    return p;
}

static void bench_copy(uint64_t bytes, int reps)
{
    uint8_t *src = malloc(bytes), *dst = malloc(bytes);
    if (!src || !dst)
        die("malloc", -ENOMEM);
    memset(src, 0x5a, bytes);
    memset(dst, 0, bytes);
    double v[16];

    /* The peer: memcpy into private memory that is already touched. */
    for (int r = 0; r < reps; r++) {
        double t = now();
        memcpy(dst, src, bytes);
        v[r] = now() - t;
    }
    double base = median(v, reps);
    report_copy("memcpy_private_warm", bytes, base, base, -1);
    free(dst);

    /* A block this process used before: alloc, copy, free, again. */
    shoal_arena *a = make(bytes + 64 * MiB, bytes + 64 * MiB, 0, 0);
    shoal_handle h;
    int rc = shoal_arena_alloc(a, bytes, &h);
    if (rc < 0)
        die("alloc", rc);
    memset(ptr_of(a, h), 0, bytes);
    shoal_arena_release(a, h);
    for (int r = 0; r < reps; r++) {
        if ((rc = shoal_arena_alloc(a, bytes, &h)) < 0)
            die("alloc", rc);
        double t = now();
        memcpy(ptr_of(a, h), src, bytes);
        v[r] = now() - t;
        shoal_arena_release(a, h);
    }
    report_copy("arena_reused", bytes, median(v, reps), base, -1);

    /* A block another process used before: the pages exist, but this
     * process maps them for the first time. */
    for (int r = 0; r < reps; r++) {
        shoal_arena *b = make(bytes + 64 * MiB, bytes + 64 * MiB, 0, 0);
        pid_t pid = fork();
        if (pid == 0) {
            shoal_arena *c;
            shoal_handle hc;
            if (shoal_arena_attach(shoal_arena_fd(b), &c) < 0 || shoal_arena_alloc(c, bytes, &hc) < 0)
                _exit(1);
            memset(ptr_of(c, hc), 0, bytes);
            shoal_arena_close(c);
            _exit(0);
        }
        waitpid(pid, NULL, 0);
        double t = now();
        if ((rc = shoal_arena_alloc(b, bytes, &h)) < 0)
            die("alloc", rc);
        double ta = now() - t;
        t = now();
        memcpy(ptr_of(b, h), src, bytes);
        v[r] = now() - t;
        (void)ta;
        shoal_arena_close(b);
    }
    report_copy("arena_reused_by_another_process", bytes, median(v, reps), base, -1);

    /* Never-used memory, faulted in by the allocator (the default), and by
     * the copy itself (NO_POPULATE): the first-touch cost that faulting
     * ahead must hide. */
    double va[16];
    for (int pass = 0; pass < 2; pass++) {
        uint32_t flags = pass ? SHOAL_ARENA_NO_POPULATE : 0;
        for (int r = 0; r < reps; r++) {
            shoal_arena *b = make(bytes + 64 * MiB, 0, flags, 0);
            double t = now();
            if ((rc = shoal_arena_alloc(b, bytes, &h)) < 0)
                die("alloc", rc);
            va[r] = now() - t;
            t = now();
            memcpy(ptr_of(b, h), src, bytes);
            v[r] = now() - t;
            shoal_arena_close(b);
        }
        report_copy(pass ? "arena_never_used_faulted_by_copy" : "arena_never_used", bytes, median(v, reps), base,
                    median(va, reps));
    }

    /* Never-used memory that the prefault thread faulted in beforehand. */
    for (int r = 0; r < reps; r++) {
        shoal_arena *b = make(bytes + 64 * MiB, 0, SHOAL_ARENA_PREFAULT_THREAD, bytes + 4 * MiB);
        shoal_arena_stats s;
        double t0 = now();
        do {
            struct timespec ts = {0, 10 * 1000 * 1000};
            nanosleep(&ts, NULL);
            shoal_arena_get_stats(b, &s);
        } while (s.committed_bytes < bytes + 4 * MiB && now() - t0 < 60);
        /* The last chunk counts as committed while it is being faulted in. */
        struct timespec settle = {0, 100 * 1000 * 1000};
        nanosleep(&settle, NULL);
        double t = now();
        if ((rc = shoal_arena_alloc(b, bytes, &h)) < 0)
            die("alloc", rc);
        va[r] = now() - t;
        t = now();
        memcpy(ptr_of(b, h), src, bytes);
        v[r] = now() - t;
        shoal_arena_close(b);
    }
    report_copy("arena_prefaulted_in_background", bytes, median(v, reps), base, median(va, reps));
    shoal_arena_close(a);
    free(src);
}

int main(int argc, char **argv)
{
    uint64_t size_mib = 1024;
    int reps = 5;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--size-mib") && i + 1 < argc)
            size_mib = strtoull(argv[++i], NULL, 10);
        else if (!strcmp(argv[i], "--reps") && i + 1 < argc)
            reps = atoi(argv[++i]);
        else {
            fprintf(stderr, "usage: %s [--size-mib N] [--reps N]\n", argv[0]);
            return 2;
        }
    }
    if (reps < 1 || reps > 16)
        reps = 5;
    bench_alloc_free(1, 256, 2000000);
    bench_alloc_free(2, 256, 1000000);
    bench_alloc_free(1, 0, 2000000);
    bench_alloc_free(2, 0, 1000000);
    bench_copy(size_mib * MiB, reps);
    return 0;
}
