/*
 * tests/shm/test_arena.c - the arena allocator, from one and many processes.
 *
 * Each test makes its own small arena (memfds need no global names, so
 * Criterion's parallel test processes never collide). Multi-process tests
 * fork children that attach from the inherited fd, as engines will.
 */
#define _GNU_SOURCE
#include <criterion/criterion.h>

#include <shoal/arena.h>

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern void (*shoal__arena_test_hook)(const char *where);

#define MiB (1024ull * 1024ull)

static shoal_arena *make(uint64_t heap)
{
    shoal_arena_opts o = {.heap_size = heap, .max_holders = 16, .max_refs = 4096};
    shoal_arena *a = NULL;
    int rc = shoal_arena_create(&o, &a);
    cr_assert_eq(rc, 0, "create: %s", strerror(-rc));
    return a;
}

static void assert_ok(shoal_arena *a)
{
    char msg[256];
    int rc = shoal_arena_check(a, msg, sizeof msg);
    cr_assert_eq(rc, 0, "invariant broken: %s", msg);
}

static void assert_empty(shoal_arena *a)
{
    assert_ok(a);
    shoal_arena_stats s;
    cr_assert_eq(shoal_arena_get_stats(a, &s), 0);
    cr_assert_eq(s.used_blocks, 0, "%llu blocks still allocated", (unsigned long long)s.used_blocks);
    cr_assert_eq(s.used_bytes, 0);
    cr_assert_eq(s.free_blocks, 1, "free space is in %llu pieces", (unsigned long long)s.free_blocks);
    cr_assert_eq(s.free_bytes, s.heap_size);
}

static shoal_arena_stats stats(shoal_arena *a)
{
    shoal_arena_stats s;
    cr_assert_eq(shoal_arena_get_stats(a, &s), 0);
    return s;
}

static uint8_t *ptr(shoal_arena *a, shoal_handle h)
{
    void *p = NULL;
    int rc = shoal_arena_ptr(a, h, &p);
    cr_assert_eq(rc, 0, "ptr: %s", strerror(-rc));
    return p;
}

static shoal_handle alloc(shoal_arena *a, uint64_t n)
{
    shoal_handle h;
    int rc = shoal_arena_alloc(a, n, &h);
    cr_assert_eq(rc, 0, "alloc(%llu): %s", (unsigned long long)n, strerror(-rc));
    return h;
}

static void release(shoal_arena *a, shoal_handle h)
{
    int rc = shoal_arena_release(a, h);
    cr_assert_eq(rc, 0, "release: %s", strerror(-rc));
}

static int wait_child(pid_t pid)
{
    int st;
    while (waitpid(pid, &st, 0) < 0)
        cr_assert_eq(errno, EINTR);
    return st;
}

/* ---- creation and attachment ---------------------------------------------- */

Test(arena, create_defaults_is_sparse_and_fast)
{
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    shoal_arena *a = NULL;
    cr_assert_eq(shoal_arena_create(NULL, &a), 0);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    shoal_arena_stats s = stats(a);
    long pages = sysconf(_SC_PHYS_PAGES), psz = sysconf(_SC_PAGESIZE);
    cr_assert_eq(s.heap_size, shoal_arena_default_heap_size());
    cr_assert_leq(s.heap_size, (uint64_t)pages * (uint64_t)psz / 2, "at most half of RAM (less in a cgroup)");
    cr_assert_eq(s.committed_bytes, 0, "nothing is committed before use");
    cr_assert_eq(s.holders, 1);
    cr_assert_geq(shoal_arena_fd(a), 0);
    assert_empty(a);
    shoal_arena_close(a);
    shoal_arena_close(NULL);
}

Test(arena, attach_rejects_bad_fds)
{
    shoal_arena *a = NULL;
    cr_assert_eq(shoal_arena_attach(-1, &a), -EBADF);
    int fd = memfd_create("not-an-arena", MFD_CLOEXEC);
    cr_assert_eq(shoal_arena_attach(fd, &a), -EPROTO, "an empty file");
    cr_assert_eq(ftruncate(fd, 1 << 20), 0);
    cr_assert_eq(shoal_arena_attach(fd, &a), -EPROTO, "a zeroed file");
    cr_assert_null(a, "out-parameter untouched on failure");
    close(fd);
}

Test(arena, attach_rejects_a_truncated_arena)
{
    shoal_arena *a = make(8 * MiB);
    int fd = dup(shoal_arena_fd(a));
    /* Grow the file behind the arena's back: the header's size no longer matches. */
    cr_assert_eq(ftruncate(fd, 64 * MiB), 0);
    shoal_arena *b = NULL;
    cr_assert_eq(shoal_arena_attach(fd, &b), -EPROTO);
    close(fd);
    shoal_arena_close(a);
}

Test(arena, holder_table_full_is_enospc)
{
    shoal_arena_opts o = {.heap_size = 4 * MiB, .max_holders = 2};
    shoal_arena *a, *b, *c = NULL;
    cr_assert_eq(shoal_arena_create(&o, &a), 0);
    cr_assert_eq(shoal_arena_attach(shoal_arena_fd(a), &b), 0);
    cr_assert_eq(shoal_arena_attach(shoal_arena_fd(a), &c), -ENOSPC);
    shoal_arena_close(b);
    cr_assert_eq(shoal_arena_attach(shoal_arena_fd(a), &c), 0, "a closed holder's record is reused");
    shoal_arena_close(c);
    shoal_arena_close(a);
}

Test(arena, holder_count_counts_the_attachments_of_a_pid)
{
    shoal_arena *a = make(4 * MiB), *b;
    cr_assert_eq(shoal_arena_holder_count(a, getpid()), 1);
    cr_assert_eq(shoal_arena_attach(shoal_arena_fd(a), &b), 0);
    cr_assert_eq(shoal_arena_holder_count(a, getpid()), 2, "each attachment is a holder");
    cr_assert_eq(shoal_arena_holder_count(a, getppid()), 0);
    shoal_arena_close(b);
    cr_assert_eq(shoal_arena_holder_count(a, getpid()), 1, "closing frees the record");
    shoal_arena_close(a);
}

Test(arena, bad_options_are_einval)
{
    shoal_arena_opts o = {.heap_size = 1ull << 50};
    shoal_arena *a = NULL;
    cr_assert_eq(shoal_arena_create(&o, &a), -EINVAL);
    cr_assert_null(a);
}

/* ---- allocation patterns ---------------------------------------------------- */

Test(arena, alloc_rejects_zero_and_oversize)
{
    shoal_arena *a = make(4 * MiB);
    shoal_handle h = {0};
    cr_assert_eq(shoal_arena_alloc(a, 0, &h), -EINVAL);
    cr_assert_eq(shoal_arena_alloc(a, 4 * MiB, &h), -EINVAL, "header does not fit");
    cr_assert_eq(h.generation, 0, "out-parameter untouched on failure");
    assert_empty(a);
    shoal_arena_close(a);
}

Test(arena, alloc_is_aligned_distinct_and_writable)
{
    shoal_arena *a = make(8 * MiB);
    static const uint64_t sizes[] = {1, 63, 64, 65, 100, 4096, 4097, 65536, 1000000};
    shoal_handle hs[9];
    for (int i = 0; i < 9; i++) {
        hs[i] = alloc(a, sizes[i]);
        cr_assert_eq(hs[i].offset % 64, 0);
        cr_assert_eq(hs[i].length, sizes[i]);
        cr_assert_eq((uintptr_t)ptr(a, hs[i]) % 64, 0);
        memset(ptr(a, hs[i]), i + 1, sizes[i]);
    }
    for (int i = 0; i < 9; i++) {
        uint8_t *p = ptr(a, hs[i]);
        for (uint64_t j = 0; j < sizes[i]; j++)
            cr_assert_eq(p[j], i + 1, "block %d was overwritten at %llu", i, (unsigned long long)j);
        for (int k = 0; k < i; k++)
            cr_assert_neq(hs[i].generation, hs[k].generation);
    }
    assert_ok(a);
    for (int i = 0; i < 9; i++)
        release(a, hs[i]);
    assert_empty(a);
    shoal_arena_close(a);
}

Test(arena, freed_neighbours_coalesce)
{
    shoal_arena *a = make(4 * MiB);
    shoal_handle x = alloc(a, 1000), y = alloc(a, 1000), z = alloc(a, 1000), w = alloc(a, 1000);
    release(a, x);
    release(a, z);
    cr_assert_eq(stats(a).free_blocks, 3, "x, z and the tail are apart");
    release(a, y);
    cr_assert_eq(stats(a).free_blocks, 2, "x, y and z merge into one");
    assert_ok(a);
    shoal_handle big = alloc(a, 3 * 1024);
    cr_assert_eq(big.offset, x.offset, "the merged space is reused first");
    release(a, big);
    release(a, w);
    assert_empty(a);
    shoal_arena_close(a);
}

Test(arena, small_blocks_leave_a_freed_large_block_whole)
{
    /* A freed 64 MiB block below a live one, the rest of the heap above: the
     * small blocks that come and go meanwhile (messages, replies) must not
     * split the freed block, or the next 64 MiB array would not fit there. */
    shoal_arena *a = make(256 * MiB);
    shoal_handle big = alloc(a, 64 * MiB), keep = alloc(a, 64 * MiB);
    release(a, big);
    enum { N = 8 };
    shoal_handle small[N];
    for (int i = 0; i < N; i++) {
        small[i] = alloc(a, 200 + 700 * (uint64_t)i);
        cr_assert_gt(small[i].offset, keep.offset, "small block %d was split off the freed large one", i);
    }
    shoal_handle again = alloc(a, 64 * MiB);
    cr_assert_eq(again.offset, big.offset, "the next block of that size goes where the freed one was");
    /* A request of a chunk or more still takes the smallest free block that holds it. */
    release(a, again);
    shoal_handle mid = alloc(a, 4 * MiB);
    cr_assert_eq(mid.offset, big.offset);
    release(a, mid);
    for (int i = 0; i < N; i++)
        release(a, small[i]);
    release(a, keep);
    assert_empty(a);
    shoal_arena_close(a);
}

Test(arena, fragmentation_and_recovery)
{
    shoal_arena *a = make(8 * MiB);
    enum { N = 100 };
    shoal_handle hs[N];
    for (int i = 0; i < N; i++)
        hs[i] = alloc(a, 64 * 1024);
    for (int i = 0; i < N; i += 2)
        release(a, hs[i]);
    shoal_arena_stats s = stats(a);
    cr_assert_geq(s.free_bytes, 50ull * 64 * 1024);
    /* Holes of one block each: a request of two blocks' worth only fits in the tail. */
    uint64_t tail = s.largest_free;
    shoal_handle h;
    cr_assert_eq(shoal_arena_alloc(a, tail + 1, &h), -ENOMEM, "no hole is that large");
    assert_ok(a);
    for (int i = 1; i < N; i += 2)
        release(a, hs[i]);
    assert_empty(a);
    h = alloc(a, 8 * MiB - 64);
    cr_assert_eq(stats(a).free_blocks, 0, "the whole heap in one block");
    release(a, h);
    shoal_arena_close(a);
}

Test(arena, exhaustion_is_enomem_and_recovers)
{
    shoal_arena *a = make(4 * MiB);
    shoal_handle hs[4096];
    int n = 0, rc;
    while ((rc = shoal_arena_alloc(a, 4000, &hs[n])) == 0)
        n++;
    cr_assert_eq(rc, -ENOMEM);
    cr_assert_gt(n, 900);
    shoal_arena_stats s = stats(a);
    cr_assert_lt(s.free_bytes, 4096 + 64, "the heap is used up");
    assert_ok(a);
    while (n--)
        release(a, hs[n]);
    assert_empty(a);
    shoal_arena_close(a);
}

Test(arena, holder_ref_table_full_is_enospc)
{
    shoal_arena_opts o = {.heap_size = 4 * MiB, .max_refs = 4};
    shoal_arena *a;
    cr_assert_eq(shoal_arena_create(&o, &a), 0);
    shoal_handle hs[5];
    for (int i = 0; i < 4; i++)
        hs[i] = alloc(a, 64);
    cr_assert_eq(shoal_arena_alloc(a, 64, &hs[4]), -ENOSPC);
    cr_assert_eq(shoal_arena_acquire(a, hs[0]), 0, "a second reference to a held block needs no entry");
    release(a, hs[0]);
    assert_ok(a);
    for (int i = 0; i < 4; i++)
        release(a, hs[i]);
    assert_empty(a);
    shoal_arena_close(a);
}

/* ---- handles ---------------------------------------------------------------- */

Test(arena, bad_handles_are_errors_not_crashes)
{
    shoal_arena *a = make(4 * MiB);
    shoal_handle h = alloc(a, 1000);
    void *p;
    shoal_handle bad;

    bad = h, bad.offset += 8;
    cr_assert_eq(shoal_arena_ptr(a, bad, &p), -EINVAL, "misaligned");
    bad = h, bad.generation = 0;
    cr_assert_eq(shoal_arena_acquire(a, bad), -EINVAL, "zero generation");
    bad = h, bad.offset = 0;
    cr_assert_eq(shoal_arena_ptr(a, bad, &p), -ERANGE, "in the metadata");
    bad = h, bad.offset = 1ull << 60;
    cr_assert_eq(shoal_arena_release(a, bad), -ERANGE, "past the end");
    bad = h, bad.length = 1ull << 60;
    cr_assert_eq(shoal_arena_acquire(a, bad), -ERANGE, "longer than the heap");
    bad = h, bad.length = 1025;
    cr_assert_eq(shoal_arena_ptr(a, bad, &p), -ERANGE, "longer than the block");
    bad = h, bad.generation++;
    cr_assert_eq(shoal_arena_acquire(a, bad), -ESTALE, "wrong generation");
    bad = h, bad.offset += 128;
    cr_assert_eq(shoal_arena_ptr(a, bad, &p), -ESTALE, "inside a payload, not a block");

    release(a, h);
    cr_assert_eq(shoal_arena_ptr(a, h, &p), -ESTALE, "freed");
    cr_assert_eq(shoal_arena_release(a, h), -ESTALE, "double release");
    shoal_handle again = alloc(a, 1000);
    cr_assert_eq(again.offset, h.offset, "the space is reused");
    cr_assert_eq(shoal_arena_acquire(a, h), -ESTALE, "an old handle does not reach the new block");

    shoal_arena *b;
    cr_assert_eq(shoal_arena_attach(shoal_arena_fd(a), &b), 0);
    cr_assert_eq(shoal_arena_release(b, again), -ENOENT, "releasing what this holder does not hold");
    cr_assert_eq(shoal_arena_acquire(b, again), 0);
    release(a, again);
    cr_assert_eq(shoal_arena_ptr(b, again, &p), 0, "still alive through b");
    release(b, again);
    assert_empty(a);
    shoal_arena_close(b);
    shoal_arena_close(a);
}

/* ---- many processes ------------------------------------------------------- */

Test(arena, forked_child_must_attach_again)
{
    shoal_arena *a = make(4 * MiB);
    pid_t pid = fork();
    if (pid == 0) {
        shoal_handle h;
        if (shoal_arena_alloc(a, 64, &h) != -ECHILD)
            _exit(1);
        shoal_arena *b;
        if (shoal_arena_attach(shoal_arena_fd(a), &b) < 0 || shoal_arena_alloc(b, 64, &h) < 0)
            _exit(2);
        shoal_arena_close(b);
        _exit(0);
    }
    int st = wait_child(pid);
    cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "child status %d", st);
    assert_empty(a);
    shoal_arena_close(a);
}

Test(arena, refcounts_are_held_across_processes)
{
    shoal_arena *a = make(4 * MiB);
    shoal_handle h = alloc(a, 4096);
    memset(ptr(a, h), 0x5a, 4096);
    int to_child[2], to_parent[2];
    cr_assert_eq(pipe(to_child), 0);
    cr_assert_eq(pipe(to_parent), 0);
    pid_t pid = fork();
    if (pid == 0) {
        shoal_arena *b;
        char c = 0;
        if (shoal_arena_attach(shoal_arena_fd(a), &b) < 0 || shoal_arena_acquire(b, h) < 0)
            _exit(1);
        if (write(to_parent[1], "a", 1) != 1 || read(to_child[0], &c, 1) != 1)
            _exit(2);
        void *p;
        if (shoal_arena_ptr(b, h, &p) < 0)
            _exit(3); /* the parent's release must not free our block */
        for (int i = 0; i < 4096; i++)
            if (((uint8_t *)p)[i] != 0x5a)
                _exit(4);
        if (shoal_arena_release(b, h) < 0)
            _exit(5);
        shoal_arena_close(b);
        _exit(0);
    }
    char c;
    cr_assert_eq(read(to_parent[0], &c, 1), 1);
    release(a, h);
    cr_assert_eq(stats(a).used_blocks, 1, "the child still holds the block");
    assert_ok(a);
    cr_assert_eq(write(to_child[1], "b", 1), 1);
    int st = wait_child(pid);
    cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "child status %d", st);
    void *p;
    cr_assert_eq(shoal_arena_ptr(a, h, &p), -ESTALE, "the child's release freed it");
    assert_empty(a);
    shoal_arena_close(a);
}

/* One worker of the stress test: random sizes, up to 32 live blocks, each
 * stamped with its own pattern and checked before it is freed, so that two
 * processes handed overlapping memory would be caught. */
static int stress_worker(int fd, unsigned seed, int iterations)
{
    shoal_arena *b;
    if (shoal_arena_attach(fd, &b) < 0)
        return 10;
    enum { LIVE = 32 };
    shoal_handle live[LIVE];
    uint32_t stamp[LIVE];
    int n = 0;
    for (int i = 0; i < iterations; i++) {
        if (n < LIVE && (n == 0 || rand_r(&seed) % 2)) {
            uint64_t len = 64u << (rand_r(&seed) % 11); /* 64 B .. 64 KiB */
            len -= rand_r(&seed) % 56; /* at least 8 bytes: two stamps */
            shoal_handle h;
            int rc = shoal_arena_alloc(b, len, &h);
            if (rc == -ENOMEM)
                continue;
            if (rc < 0)
                return 11;
            void *p;
            if (shoal_arena_ptr(b, h, &p) < 0)
                return 12;
            uint32_t s = (uint32_t)rand_r(&seed);
            memcpy(p, &s, 4);
            memcpy((uint8_t *)p + len - 4, &s, 4);
            live[n] = h;
            stamp[n++] = s;
        } else {
            int k = rand_r(&seed) % n;
            void *p;
            uint32_t x, y;
            if (shoal_arena_ptr(b, live[k], &p) < 0)
                return 13;
            memcpy(&x, p, 4);
            memcpy(&y, (uint8_t *)p + live[k].length - 4, 4);
            if (x != stamp[k] || y != stamp[k])
                return 14; /* somebody else wrote into our block */
            if (shoal_arena_release(b, live[k]) < 0)
                return 15;
            live[k] = live[--n];
            stamp[k] = stamp[n];
        }
    }
    shoal_arena_close(b); /* releases the rest */
    return 0;
}

Test(arena, four_processes_100k_alloc_free_each, .timeout = 240)
{
    shoal_arena *a = make(64 * MiB);
    enum { P = 4 };
    pid_t pids[P];
    for (int i = 0; i < P; i++) {
        pids[i] = fork();
        if (pids[i] == 0)
            _exit(stress_worker(shoal_arena_fd(a), 1234u + (unsigned)i, 100000));
    }
    for (int i = 0; i < P; i++) {
        int st = wait_child(pids[i]);
        cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "worker %d status %d", i, st);
    }
    assert_empty(a);
    cr_assert_eq(stats(a).holders, 1, "every worker's holder record is gone");
    shoal_arena_close(a);
}

/* ---- crashes ---------------------------------------------------------------- */

static const char *crash_at;
static int crash_skip;

static void crash_hook(const char *where)
{
    if (strcmp(where, crash_at) == 0 && crash_skip-- == 0)
        raise(SIGKILL);
}

/* In a child: attach, build up some state, then die with SIGKILL at the
 * named point inside the allocator's critical section. */
static void crash_child(int fd, const char *where)
{
    shoal_arena *b;
    if (shoal_arena_attach(fd, &b) < 0)
        _exit(10);
    shoal_handle x, y, z;
    if (shoal_arena_alloc(b, 5000, &x) < 0 || shoal_arena_alloc(b, 7000, &y) < 0 ||
        shoal_arena_alloc(b, 9000, &z) < 0)
        _exit(11);
    crash_at = where;
    crash_skip = 0;
    shoal__arena_test_hook = crash_hook;
    if (strcmp(where, "reclaim-step") == 0) {
        pid_t g = fork();
        if (g == 0) {
            shoal__arena_test_hook = NULL;
            shoal_arena *c;
            shoal_handle q;
            if (shoal_arena_attach(fd, &c) == 0 && shoal_arena_alloc(c, 100, &q) == 0 &&
                shoal_arena_alloc(c, 200, &q) == 0)
                raise(SIGKILL);
            _exit(1);
        }
        waitpid(g, NULL, 0);
        shoal_arena_reclaim(b, g);
        _exit(20);
    }
    /* Reach every other point: a split, a free with a free neighbour above
     * (y then z merges z's free tail), and one below (x after y). */
    shoal_handle w;
    shoal_arena_alloc(b, 100, &w);
    shoal_arena_release(b, y);
    shoal_arena_release(b, z);
    shoal_arena_release(b, x);
    _exit(21); /* the crash point was never reached */
}

static void crash_and_recover(const char *where)
{
    shoal_arena *a = make(4 * MiB);
    shoal_handle mine = alloc(a, 3000);
    memset(ptr(a, mine), 7, 3000);
    pid_t pid = fork();
    if (pid == 0)
        crash_child(shoal_arena_fd(a), where);
    int st = wait_child(pid);
    cr_assert(WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL, "child should die at %s (status %d)", where, st);
    /* The next lock owner repairs whatever the child left half done. */
    assert_ok(a);
    cr_assert_geq(stats(a).recoveries, 1, "the dead owner was noticed at %s", where);
    int n = shoal_arena_reclaim(a, pid);
    cr_assert_geq(n, 0, "reclaim: %s", strerror(-n));
    shoal_arena_reclaim_dead(a); /* the grandchild of reclaim-step, if any */
    assert_ok(a);
    cr_assert_eq(ptr(a, mine)[2999], 7, "our own block survived");
    release(a, mine);
    assert_empty(a);
    cr_assert_eq(stats(a).holders, 1);
    shoal_arena_close(a);
}

Test(arena, kill_inside_lock_at_split) { crash_and_recover("alloc-split"); }
Test(arena, kill_inside_lock_after_holder_update) { crash_and_recover("alloc-holder"); }
Test(arena, kill_inside_lock_marking_free) { crash_and_recover("free-mark"); }
Test(arena, kill_inside_lock_merging_next) { crash_and_recover("free-merge-next"); }
Test(arena, kill_inside_lock_merging_prev) { crash_and_recover("free-merge-prev"); }
Test(arena, kill_inside_lock_in_release) { crash_and_recover("release-holder"); }
Test(arena, kill_inside_lock_while_reclaiming) { crash_and_recover("reclaim-step"); }

Test(arena, kill_outside_lock_then_reclaim)
{
    shoal_arena *a = make(4 * MiB);
    int sync[2];
    cr_assert_eq(pipe(sync), 0);
    pid_t pid = fork();
    if (pid == 0) {
        shoal_arena *b;
        shoal_handle h;
        if (shoal_arena_attach(shoal_arena_fd(a), &b) < 0)
            _exit(1);
        for (int i = 0; i < 10; i++)
            if (shoal_arena_alloc(b, 1000 * (i + 1), &h) < 0 || shoal_arena_acquire(b, h) < 0)
                _exit(2);
        if (write(sync[1], "x", 1) != 1)
            _exit(3);
        pause();
        _exit(4);
    }
    char c;
    cr_assert_eq(read(sync[0], &c, 1), 1);
    cr_assert_eq(shoal_arena_reclaim(a, pid), -EBUSY, "a live process is not reclaimed");
    cr_assert_eq(shoal_arena_reclaim(a, 1), -ESRCH, "pid 1 holds nothing here");
    kill(pid, SIGKILL);
    wait_child(pid);
    cr_assert_eq(stats(a).used_blocks, 10);
    cr_assert_eq(shoal_arena_reclaim(a, pid), 20, "ten blocks, two references each");
    assert_empty(a);
    cr_assert_eq(stats(a).recoveries, 0, "nobody died holding the lock");
    shoal_arena_close(a);
}

Test(arena, random_kill_9_storm_leaves_nothing, .timeout = 240)
{
    shoal_arena *a = make(64 * MiB);
    unsigned seed = 42;
    for (int round = 0; round < 8; round++) {
        enum { P = 4 };
        pid_t pids[P];
        for (int i = 0; i < P; i++) {
            pids[i] = fork();
            if (pids[i] == 0)
                _exit(stress_worker(shoal_arena_fd(a), seed + (unsigned)(round * P + i), 1 << 30));
        }
        /* Start killing once every worker has attached and is working. */
        for (int i = 0; i < 5000 && stats(a).holders < P + 1; i++) {
            struct timespec ts = {0, 1000000L};
            nanosleep(&ts, NULL);
        }
        for (int i = 0; i < P; i++) {
            struct timespec ts = {0, (long)(rand_r(&seed) % 40 + 1) * 1000000L};
            nanosleep(&ts, NULL);
            kill(pids[i], SIGKILL);
        }
        for (int i = 0; i < P; i++) {
            int st = wait_child(pids[i]);
            cr_assert(WIFSIGNALED(st), "worker %d ended by itself (status %d)", i, st);
        }
        int n = shoal_arena_reclaim_dead(a);
        cr_assert_eq(n, P, "reclaimed %d of %d dead holders", n, P);
        assert_empty(a);
    }
    shoal_arena_close(a);
}

/* ---- memory commit -------------------------------------------------------- */

Test(arena, large_free_blocks_are_given_back)
{
    shoal_arena_opts o = {.heap_size = 512 * MiB, .retain_bytes = 64 * MiB};
    shoal_arena *a;
    cr_assert_eq(shoal_arena_create(&o, &a), 0);
    shoal_handle h = alloc(a, 200 * MiB);
    cr_assert_geq(stats(a).committed_bytes, 200 * MiB);
    memset(ptr(a, h), 1, 200 * MiB);
    release(a, h);
    shoal_arena_stats s = stats(a);
    cr_assert_geq(s.released_bytes, 190 * MiB, "released %llu", (unsigned long long)s.released_bytes);
    cr_assert_leq(s.committed_bytes, 10 * MiB);
    /* Reused memory reads as zero again and works as before. */
    h = alloc(a, 100 * MiB);
    cr_assert_eq(ptr(a, h)[50 * MiB], 0);
    release(a, h);
    assert_empty(a);
    shoal_arena_close(a);
}

Test(arena, small_frees_are_kept_for_reuse)
{
    shoal_arena_opts o = {.heap_size = 512 * MiB, .retain_bytes = 256 * MiB};
    shoal_arena *a;
    cr_assert_eq(shoal_arena_create(&o, &a), 0);
    shoal_handle h = alloc(a, 100 * MiB);
    release(a, h);
    shoal_arena_stats s = stats(a);
    cr_assert_eq(s.released_bytes, 0, "within the retain budget");
    cr_assert_geq(s.committed_bytes, 100 * MiB);
    shoal_arena_close(a);
}

Test(arena, prefault_thread_runs_ahead_of_use)
{
    shoal_arena_opts o = {.heap_size = 256 * MiB, .prefault_ahead = 16 * MiB, .flags = SHOAL_ARENA_PREFAULT_THREAD};
    shoal_arena *a;
    cr_assert_eq(shoal_arena_create(&o, &a), 0);
    for (int i = 0; i < 500 && stats(a).committed_bytes < 16 * MiB; i++) {
        struct timespec ts = {0, 10 * 1000000L};
        nanosleep(&ts, NULL);
    }
    cr_assert_geq(stats(a).committed_bytes, 16 * MiB, "the thread committed the window");
    cr_assert_leq(stats(a).committed_bytes, 18 * MiB, "and no more than the window");
    shoal_handle h = alloc(a, 32 * MiB);
    for (int i = 0; i < 500 && stats(a).committed_bytes < 48 * MiB; i++) {
        struct timespec ts = {0, 10 * 1000000L};
        nanosleep(&ts, NULL);
    }
    cr_assert_geq(stats(a).committed_bytes, 48 * MiB, "the window moves up with use");
    release(a, h);
    assert_ok(a);
    shoal_arena_close(a);
}

Test(arena, attach_reclaims_dead_holders_when_the_table_is_full)
{
    shoal_arena_opts o = {.heap_size = 4 * MiB, .max_holders = 2};
    shoal_arena *a, *b, *c = NULL;
    cr_assert_eq(shoal_arena_create(&o, &a), 0);
    cr_assert_eq(shoal_arena_attach(shoal_arena_fd(a), &b), 0);
    shoal_arena_close(a); /* record 0 is free again; b keeps the arena */
    pid_t pid = fork();
    if (pid == 0) {
        shoal_arena *y;
        shoal_handle h;
        if (shoal_arena_attach(shoal_arena_fd(b), &y) == 0 && shoal_arena_alloc(y, 1000, &h) == 0)
            raise(SIGKILL); /* dies holding record 0 and a block */
        _exit(1);
    }
    int st = wait_child(pid);
    cr_assert(WIFSIGNALED(st), "status %d", st);
    cr_assert_eq(stats(b).holders, 2, "the table is full");
    cr_assert_eq(shoal_arena_attach(shoal_arena_fd(b), &c), 0, "the dead holder's record is reclaimed");
    cr_assert_eq(stats(b).used_blocks, 0, "and its block freed");
    assert_empty(b);
    shoal_arena_close(c);
    shoal_arena_close(b);
}

Test(arena, acquire_with_a_full_ref_table_is_enospc)
{
    shoal_arena_opts o = {.heap_size = 4 * MiB, .max_refs = 2};
    shoal_arena *a, *b;
    cr_assert_eq(shoal_arena_create(&o, &a), 0);
    cr_assert_eq(shoal_arena_attach(shoal_arena_fd(a), &b), 0);
    shoal_handle x = alloc(a, 64), y = alloc(a, 64);
    shoal_handle z;
    cr_assert_eq(shoal_arena_alloc(a, 64, &z), -ENOSPC);
    cr_assert_eq(shoal_arena_acquire(b, x), 0);
    cr_assert_eq(shoal_arena_acquire(b, y), 0);
    release(a, y);
    cr_assert_eq(shoal_arena_alloc(a, 64, &z), 0);
    cr_assert_eq(shoal_arena_acquire(b, z), -ENOSPC, "b holds two blocks already");
    assert_ok(a);
    shoal_arena_close(b);
    release(a, x);
    release(a, z);
    assert_empty(a);
    shoal_arena_close(a);
}

/* The invariant check must be able to fail: corrupt the documented layout
 * (docs/arena.md) by hand and see it reported. */
Test(arena, check_reports_corruption)
{
    shoal_arena *a = make(4 * MiB);
    shoal_handle x = alloc(a, 1000), y = alloc(a, 1000);
    uint8_t *hdr = (uint8_t *)shoal_arena_base(a) + x.offset - 64;
    char msg[256];
    uint32_t saved;
    memcpy(&saved, hdr + 32, 4);
    uint32_t two = 2;
    memcpy(hdr + 32, &two, 4); /* refcount no longer matches the holders */
    cr_assert_eq(shoal_arena_check(a, msg, sizeof msg), -EUCLEAN);
    cr_assert(strstr(msg, "refcount"), "message: %s", msg);
    memcpy(hdr + 32, &saved, 4);
    assert_ok(a);

    uint64_t size;
    memcpy(&size, hdr + 8, 8);
    uint64_t bad = size + 64; /* overlaps y */
    memcpy(hdr + 8, &bad, 8);
    cr_assert_eq(shoal_arena_check(a, msg, sizeof msg), -EUCLEAN);
    memcpy(hdr + 8, &size, 8);
    assert_ok(a);
    release(a, x);
    release(a, y);
    assert_empty(a);
    shoal_arena_close(a);
}

/* ---- found in review: races and hostile input ----------------------------- */

static shoal_arena *punch_arena;
static shoal_handle punch_other;

static void release_other_during_punch(const char *where)
{
    if (strcmp(where, "release-punch") == 0 && punch_other.generation) {
        shoal_handle o = punch_other;
        punch_other.generation = 0;
        /* What another thread of ours may do while the lock is dropped:
         * this removal moves our ref-table entries around. */
        cr_assert_eq(shoal_arena_release(punch_arena, o), 0);
    }
}

Test(arena, release_during_the_punch_window_keeps_the_ref_table_right)
{
    shoal_arena_opts o = {.heap_size = 256 * MiB, .retain_bytes = 64 * MiB};
    shoal_arena *a;
    cr_assert_eq(shoal_arena_create(&o, &a), 0);
    shoal_handle small = alloc(a, 64); /* entry 0 */
    shoal_handle last = alloc(a, 64); /* entry 1 */
    shoal_handle big = alloc(a, 100 * MiB); /* entry 2: moves into entry 0's place */
    punch_arena = a;
    punch_other = small;
    shoal__arena_test_hook = release_other_during_punch;
    release(a, big);
    shoal__arena_test_hook = NULL;
    cr_assert_eq(punch_other.generation, 0, "the punch window was reached");
    cr_assert_gt(stats(a).released_bytes, 0);
    assert_ok(a);
    release(a, last);
    assert_empty(a);
    shoal_arena_close(a);
}

Test(arena, unreadable_proc_is_not_taken_for_death)
{
    shoal_arena *a = make(4 * MiB);
    pid_t pid = fork();
    if (pid == 0) {
        shoal_arena *b;
        shoal_handle h;
        void *p;
        if (shoal_arena_attach(shoal_arena_fd(a), &b) < 0 || shoal_arena_alloc(b, 100, &h) < 0)
            _exit(1);
        /* Use up the fd table: /proc can no longer be opened. Lower the
         * limit first, which is always allowed, so that this stays quick. */
        struct rlimit rl = {64, 64};
        if (setrlimit(RLIMIT_NOFILE, &rl) < 0)
            _exit(5);
        while (dup(0) >= 0)
            ;
        if (errno != EMFILE)
            _exit(2);
        if (shoal_arena_reclaim_dead(b) != 0)
            _exit(3); /* every holder is alive; none may be reclaimed */
        if (shoal_arena_ptr(b, h, &p) < 0)
            _exit(4);
        _exit(0);
    }
    int st = wait_child(pid);
    cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "child status %d", st);
    cr_assert_eq(shoal_arena_reclaim(a, pid), 1, "now it is dead");
    assert_empty(a);
    shoal_arena_close(a);
}

static shoal_arena *zombie_arena;
static shoal_handle zombie_block;
static int zombie_pipe[2];

static void *zombie_worker(void *arg)
{
    (void)arg;
    char c;
    /* Wait for the parent's reclaim attempt, then report on our block. */
    if (read(zombie_pipe[0], &c, 1) != 1)
        _exit(5);
    void *p;
    _exit(shoal_arena_ptr(zombie_arena, zombie_block, &p) == 0 ? 0 : 6);
}

Test(arena, zombie_leader_with_live_threads_is_alive)
{
    shoal_arena *a = make(4 * MiB);
    cr_assert_eq(pipe(zombie_pipe), 0);
    pid_t pid = fork();
    if (pid == 0) {
        close(zombie_pipe[1]); /* so that the worker sees EOF if the test dies */
        if (shoal_arena_attach(shoal_arena_fd(a), &zombie_arena) < 0 ||
            shoal_arena_alloc(zombie_arena, 4096, &zombie_block) < 0)
            _exit(1);
        pthread_t t;
        if (pthread_create(&t, NULL, zombie_worker, NULL) != 0)
            _exit(2);
        pthread_exit(NULL); /* the leader shows as a zombie while the worker runs */
    }
    /* Wait until the leader is a zombie. */
    char path[64], buf[512];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    for (int i = 0; i < 2500; i++) {
        FILE *f = fopen(path, "r");
        cr_assert_not_null(f);
        size_t n = fread(buf, 1, sizeof buf - 1, f);
        fclose(f);
        buf[n] = '\0';
        if (strstr(buf, ") Z "))
            break;
        struct timespec ts = {0, 2000000};
        nanosleep(&ts, NULL);
    }
    cr_assert(strstr(buf, ") Z "), "leader never became a zombie: %s", buf);
    cr_assert_eq(shoal_arena_reclaim(a, pid), -EBUSY, "its worker thread still runs");
    cr_assert_eq(write(zombie_pipe[1], "x", 1), 1);
    int st = wait_child(pid);
    cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "the worker's block was freed under it (status %d)", st);
    cr_assert_eq(shoal_arena_reclaim(a, pid), 1);
    assert_empty(a);
    shoal_arena_close(a);
}

Test(arena, attach_rejects_a_forged_layout)
{
    shoal_arena *a = make(4 * MiB);
    struct stat st;
    cr_assert_eq(fstat(shoal_arena_fd(a), &st), 0);
    uint8_t page[4096];
    cr_assert_eq(pread(shoal_arena_fd(a), page, sizeof page, 0), (ssize_t)sizeof page);
    static const size_t fields[] = {32, 40, 48, 56, 64, 72, 80}; /* docs/arena.md */
    for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++) {
        int fd = memfd_create("forged", MFD_CLOEXEC);
        cr_assert_eq(ftruncate(fd, st.st_size), 0);
        uint8_t forged[4096];
        memcpy(forged, page, sizeof forged);
        uint64_t huge = 1ull << 40;
        memcpy(forged + fields[i], &huge, fields[i] == 40 ? 4 : 8);
        cr_assert_eq(pwrite(fd, forged, sizeof forged, 0), (ssize_t)sizeof forged);
        shoal_arena *b = NULL;
        cr_assert_eq(shoal_arena_attach(fd, &b), -EPROTO, "field at %zu", fields[i]);
        close(fd);
    }
    shoal_arena_close(a);
}

Test(arena, forged_block_header_inside_a_payload_is_stale)
{
    shoal_arena *a = make(4 * MiB);
    shoal_handle h = alloc(a, 4096);
    uint8_t *p = ptr(a, h);
    /* A header-shaped lie at payload + 64, claiming a block far past the heap. */
    uint32_t magic = 0x55424c53u, rc1 = 1;
    uint64_t size = 1ull << 40, gen = 12345, len = 64;
    memset(p, 0, 128);
    memcpy(p + 0, &magic, 4);
    memcpy(p + 8, &size, 8);
    memcpy(p + 24, &gen, 8);
    memcpy(p + 32, &rc1, 4);
    memcpy(p + 40, &len, 8);
    shoal_handle lie = {h.offset + 64, 64, gen};
    cr_assert_eq(shoal_arena_acquire(a, lie), -ESTALE);
    size = 128;
    memcpy(p + 8, &size, 8);
    uint64_t prev = 1ull << 40;
    memcpy(p + 16, &prev, 8);
    cr_assert_eq(shoal_arena_acquire(a, lie), -ESTALE, "a boundary tag below the heap");
    release(a, h);
    assert_empty(a);
    shoal_arena_close(a);
}

/* Pages of [p, p + len) that are resident, by mincore. */
static size_t resident_pages(const void *p, size_t len)
{
    size_t pg = (size_t)sysconf(_SC_PAGESIZE), n = len / pg, r = 0;
    unsigned char *v = malloc(n);
    cr_assert_not_null(v);
    cr_assert_eq(mincore((void *)p, len, v), 0);
    for (size_t i = 0; i < n; i++)
        r += v[i] & 1;
    free(v);
    return r;
}

Test(arena, first_block_in_a_chunk_faults_in_the_whole_chunk)
{
    for (int pass = 0; pass < 2; pass++) {
        shoal_arena_opts o = {.heap_size = 8 * MiB, .flags = pass ? SHOAL_ARENA_NO_POPULATE : 0};
        shoal_arena *a;
        cr_assert_eq(shoal_arena_create(&o, &a), 0);
        shoal_handle h = alloc(a, 64); /* the first block starts the heap, and chunk 0 */
        const uint8_t *chunk = (const uint8_t *)shoal_arena_base(a) + h.offset - 64;
        size_t all = SHOAL_ARENA_CHUNK / (size_t)sysconf(_SC_PAGESIZE);
        size_t got = resident_pages(chunk, SHOAL_ARENA_CHUNK);
        if (pass == 0)
            cr_assert_eq(got, all, "only %zu of %zu pages of the chunk are there", got, all);
        else
            cr_assert_lt(got, all / 2, "NO_POPULATE leaves the chunk to first touch (%zu resident)", got);
        cr_assert_eq(resident_pages(chunk + SHOAL_ARENA_CHUNK, SHOAL_ARENA_CHUNK), 0, "the next chunk is untouched");
        release(a, h);
        shoal_arena_close(a);
    }
}
