/*
 * tests/shm/test_ring.c - SPSC rings: order, wrap-around, full and empty,
 * closing, and the doorbell across processes (futex and eventfd), with the
 * rings living in arena blocks as the agent will put them.
 */
#define _GNU_SOURCE
#include <criterion/criterion.h>

#include <shoal/arena.h>
#include <shoal/ring.h>

#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
#include <stdatomic.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

struct slot {
    uint64_t seq;
    uint8_t fill[56];
};
_Static_assert(sizeof(struct slot) == SHOAL_RING_SLOT, "a slot is 64 bytes");

static _Alignas(64) uint8_t mem[256 + 64 * 64];

static struct slot mk(uint64_t seq)
{
    struct slot s;
    s.seq = seq;
    memset(s.fill, (int)(seq & 0xff), sizeof s.fill);
    return s;
}

static int64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

Test(ring, init_and_open_reject_bad_input)
{
    shoal_ring r;
    cr_assert_eq(shoal_ring_init(mem, sizeof mem, 3, &r), -EINVAL, "not a power of two");
    cr_assert_eq(shoal_ring_init(mem, sizeof mem, 1, &r), -EINVAL, "too few");
    cr_assert_eq(shoal_ring_init(mem, sizeof mem, 128, &r), -EINVAL, "does not fit");
    cr_assert_eq(shoal_ring_init(mem + 8, sizeof mem - 8, 8, &r), -EINVAL, "misaligned");
    memset(mem, 0xab, sizeof mem);
    cr_assert_eq(shoal_ring_open(mem, sizeof mem, &r), -EPROTO, "garbage");
    cr_assert_eq(shoal_ring_init(mem, sizeof mem, 64, &r), 0);
    cr_assert_eq(shoal_ring_open(mem, sizeof mem, &r), 0);
    cr_assert_eq(shoal_ring_open(mem, shoal_ring_size(64) - 1, &r), -EPROTO, "shorter than it says");
}

Test(ring, fifo_across_wrap_around_full_and_empty)
{
    shoal_ring r;
    cr_assert_eq(shoal_ring_init(mem, sizeof mem, 8, &r), 0);
    struct slot out[8], in[8];
    cr_assert_eq(shoal_ring_pop(&r, out, 8), 0, "empty");
    uint64_t next_in = 0, next_out = 0;
    for (int round = 0; round < 100; round++) {
        uint32_t n = 1 + (uint32_t)round % 8;
        for (uint32_t i = 0; i < n; i++)
            in[i] = mk(next_in + i);
        int k = shoal_ring_push(&r, in, n);
        cr_assert_geq(k, 0);
        next_in += (uint64_t)k;
        int got = shoal_ring_pop(&r, out, 8);
        for (int i = 0; i < got; i++) {
            cr_assert_eq(out[i].seq, next_out, "out of order");
            cr_assert_eq(out[i].fill[55], (uint8_t)(next_out & 0xff));
            next_out++;
        }
    }
    cr_assert_eq(next_in, next_out);
    for (uint32_t i = 0; i < 8; i++)
        in[i] = mk(i);
    cr_assert_eq(shoal_ring_push(&r, in, 8), 8);
    cr_assert_eq(shoal_ring_count(&r), 8);
    cr_assert_eq(shoal_ring_push(&r, in, 1), 0, "full");
    cr_assert_eq(shoal_ring_pop(&r, out, 3), 3);
    cr_assert_eq(shoal_ring_push(&r, in, 8), 3, "partly full: takes what fits");
}

Test(ring, close_drains_then_reports_epipe)
{
    shoal_ring r;
    cr_assert_eq(shoal_ring_init(mem, sizeof mem, 8, &r), 0);
    struct slot s = mk(1), out;
    cr_assert_eq(shoal_ring_push(&r, &s, 1), 1);
    shoal_ring_close(&r);
    cr_assert_eq(shoal_ring_push(&r, &s, 1), -EPIPE);
    cr_assert_eq(shoal_ring_wait(&r, 0, 0), 0, "still one to pop");
    cr_assert_eq(shoal_ring_pop(&r, &out, 1), 1);
    cr_assert_eq(shoal_ring_pop(&r, &out, 1), -EPIPE);
    cr_assert_eq(shoal_ring_wait(&r, 0, -1), -EPIPE, "never blocks on a closed ring");
}

Test(ring, corrupt_indices_are_euclean)
{
    shoal_ring r;
    cr_assert_eq(shoal_ring_init(mem, sizeof mem, 8, &r), 0);
    uint64_t bad = 100;
    memcpy(mem + 64, &bad, 8); /* tail far ahead of head: docs/rings.md */
    struct slot s = mk(0);
    cr_assert_eq(shoal_ring_pop(&r, &s, 1), -EUCLEAN);
    cr_assert_eq(shoal_ring_push(&r, &s, 1), -EUCLEAN);
    cr_assert_eq(shoal_ring_count(&r), 0);
}

Test(ring, wait_times_out)
{
    shoal_ring r;
    cr_assert_eq(shoal_ring_init(mem, sizeof mem, 8, &r), 0);
    int64_t t = now_ns();
    cr_assert_eq(shoal_ring_wait(&r, 1000, 20 * 1000 * 1000), -ETIMEDOUT);
    cr_assert_geq(now_ns() - t, 20 * 1000 * 1000);
}

/* Two rings in one arena block: ping (parent -> child) and pong (back). */
struct pair {
    shoal_arena *arena;
    shoal_handle block;
    shoal_ring ping, pong;
};

static void make_pair(struct pair *p, uint32_t nslots)
{
    shoal_arena_opts o = {.heap_size = 8u << 20};
    cr_assert_eq(shoal_arena_create(&o, &p->arena), 0);
    size_t one = shoal_ring_size(nslots);
    cr_assert_eq(shoal_arena_alloc(p->arena, 2 * one, &p->block), 0);
    uint8_t *m = (uint8_t *)shoal_arena_base(p->arena) + p->block.offset;
    cr_assert_eq(shoal_ring_init(m, one, nslots, &p->ping), 0);
    cr_assert_eq(shoal_ring_init(m + one, one, nslots, &p->pong), 0);
}

/* In the child: attach, open both rings, echo n slots back, each one bigger. */
static int echo_child(int fd, shoal_handle block, size_t one, uint64_t n, int64_t spin_ns)
{
    shoal_arena *a;
    if (shoal_arena_attach(fd, &a) < 0)
        return 10;
    void *m;
    if (shoal_arena_ptr(a, block, &m) < 0)
        return 11;
    shoal_ring ping, pong;
    if (shoal_ring_open(m, one, &ping) < 0 || shoal_ring_open((uint8_t *)m + one, one, &pong) < 0)
        return 12;
    for (uint64_t i = 0; i < n; i++) {
        struct slot s;
        int rc;
        while ((rc = shoal_ring_pop(&ping, &s, 1)) == 0)
            if (shoal_ring_wait(&ping, spin_ns, 10ll * 1000 * 1000 * 1000) < 0)
                return 13;
        if (rc < 0 || s.seq != i)
            return 14;
        s.seq++;
        while ((rc = shoal_ring_push(&pong, &s, 1)) == 0)
            ;
        if (rc < 0)
            return 15;
    }
    shoal_arena_close(a);
    return 0;
}

static void ping_pong(int64_t spin_ns, uint64_t n)
{
    struct pair p;
    make_pair(&p, 16);
    pid_t pid = fork();
    if (pid == 0)
        _exit(echo_child(shoal_arena_fd(p.arena), p.block, shoal_ring_size(16), n, spin_ns));
    for (uint64_t i = 0; i < n; i++) {
        struct slot s = mk(i);
        cr_assert_eq(shoal_ring_push(&p.ping, &s, 1), 1);
        int rc;
        while ((rc = shoal_ring_pop(&p.pong, &s, 1)) == 0)
            cr_assert_eq(shoal_ring_wait(&p.pong, spin_ns, 10ll * 1000 * 1000 * 1000), 0, "reply %llu lost",
                         (unsigned long long)i);
        cr_assert_eq(rc, 1);
        cr_assert_eq(s.seq, i + 1);
    }
    int st;
    waitpid(pid, &st, 0);
    cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "child status %d", st);
    shoal_arena_close(p.arena);
}

Test(ring, ping_pong_across_processes_sleeping_on_the_futex)
{
    ping_pong(0, 20000); /* no spinning: every hand-off goes through the doorbell */
}

Test(ring, ping_pong_across_processes_spinning)
{
    ping_pong(100 * 1000, 100000);
}

Test(ring, close_wakes_a_sleeping_consumer)
{
    struct pair p;
    make_pair(&p, 16);
    pid_t pid = fork();
    if (pid == 0) {
        shoal_arena *a;
        void *m;
        shoal_ring ping;
        if (shoal_arena_attach(shoal_arena_fd(p.arena), &a) < 0 || shoal_arena_ptr(a, p.block, &m) < 0 ||
            shoal_ring_open(m, shoal_ring_size(16), &ping) < 0)
            _exit(10);
        _exit(shoal_ring_wait(&ping, 0, -1) == -EPIPE ? 0 : 11);
    }
    struct timespec ts = {0, 50 * 1000 * 1000};
    nanosleep(&ts, NULL);
    shoal_ring_close(&p.ping);
    int st;
    waitpid(pid, &st, 0);
    cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "child status %d", st);
    shoal_arena_close(p.arena);
}

Test(ring, eventfd_doorbell_for_a_consumer_that_polls)
{
    shoal_ring r;
    cr_assert_eq(shoal_ring_init(mem, sizeof mem, 8, &r), 0);
    int efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    cr_assert_geq(efd, 0);
    shoal_ring producer = r;
    shoal_ring_set_notify_fd(&producer, efd);
    struct slot s = mk(5);

    /* Awake consumer: pushes cost no wake-up. */
    cr_assert_eq(shoal_ring_push(&producer, &s, 1), 1);
    uint64_t v;
    cr_assert_eq(read(efd, &v, sizeof v), -1, "no wake-up while the consumer is awake");
    cr_assert_eq(shoal_ring_prepare_sleep(&r), 0, "something is waiting: do not sleep");
    cr_assert_eq(shoal_ring_pop(&r, &s, 1), 1);

    /* Sleeping consumer: the push rings the eventfd. */
    cr_assert_eq(shoal_ring_prepare_sleep(&r), 1);
    cr_assert_eq(shoal_ring_push(&producer, &s, 1), 1);
    struct pollfd pfd = {efd, POLLIN, 0};
    cr_assert_eq(poll(&pfd, 1, 1000), 1, "the doorbell rang");
    cr_assert_eq(read(efd, &v, sizeof v), (ssize_t)sizeof v);
    shoal_ring_awake(&r);
    cr_assert_eq(shoal_ring_pop(&r, &s, 1), 1);
    cr_assert_eq(s.seq, 5);
    close(efd);
}

/* Three rings in one block, all pointed at one doorbell at the block's start. */
#define NMANY 3
struct many {
    shoal_arena *arena;
    shoal_handle block;
    shoal_ring in[NMANY], out;
};

static uint8_t *many_mem(shoal_arena *a, shoal_handle h)
{
    void *m;
    cr_assert_eq(shoal_arena_ptr(a, h, &m), 0);
    return m;
}

static void open_many(uint8_t *m, shoal_ring *in, shoal_ring *out, int init)
{
    size_t one = shoal_ring_size(16);
    for (int i = 0; i <= NMANY; i++) {
        shoal_ring *r = i < NMANY ? &in[i] : out;
        uint8_t *at = m + 64 + (size_t)i * one;
        if (init)
            cr_assert_eq(shoal_ring_init(at, one, 16, r), 0);
        else if (shoal_ring_open(at, one, r) < 0)
            _exit(12);
        if (i < NMANY)
            shoal_ring_set_doorbell(r, m); /* the consumer's one doorbell */
    }
}

static void make_many(struct many *p)
{
    shoal_arena_opts o = {.heap_size = 8u << 20};
    cr_assert_eq(shoal_arena_create(&o, &p->arena), 0);
    cr_assert_eq(shoal_arena_alloc(p->arena, 64 + (NMANY + 1) * shoal_ring_size(16), &p->block), 0);
    uint8_t *m = many_mem(p->arena, p->block);
    memset(m, 0, SHOAL_DOORBELL_SIZE);
    open_many(m, p->in, &p->out, 1);
}

Test(ring, one_doorbell_for_many_rings_across_processes)
{
    struct many p;
    make_many(&p);
    const uint64_t n = 6000;
    pid_t pid = fork();
    if (pid == 0) {
        shoal_arena *a;
        void *m;
        if (shoal_arena_attach(shoal_arena_fd(p.arena), &a) < 0 || shoal_arena_ptr(a, p.block, &m) < 0)
            _exit(10);
        shoal_ring in[NMANY], out;
        open_many(m, in, &out, 0);
        shoal_ring *set[NMANY] = {&in[0], &in[1], &in[2]};
        for (uint64_t got = 0; got < n;) {
            /* No spinning: every hand-off goes through the shared doorbell. */
            if (shoal_doorbell_wait(m, set, NMANY, 0, 10ll * 1000 * 1000 * 1000) < 0)
                _exit(13);
            for (int i = 0; i < NMANY; i++) {
                struct slot s;
                int rc = shoal_ring_pop(&in[i], &s, 1);
                if (rc < 0)
                    _exit(14);
                if (rc == 0)
                    continue;
                if (s.seq != got || s.fill[0] != i)
                    _exit(15); /* came through the wrong ring, or out of order */
                got++;
                while ((rc = shoal_ring_push(&out, &s, 1)) == 0)
                    ;
                if (rc < 0)
                    _exit(16);
            }
        }
        _exit(0);
    }
    for (uint64_t i = 0; i < n; i++) {
        struct slot s = mk(i);
        int which = (int)((i * 7) % NMANY);
        s.fill[0] = (uint8_t)which;
        cr_assert_eq(shoal_ring_push(&p.in[which], &s, 1), 1);
        int rc;
        while ((rc = shoal_ring_pop(&p.out, &s, 1)) == 0)
            cr_assert_eq(shoal_ring_wait(&p.out, 0, 10ll * 1000 * 1000 * 1000), 0, "reply %llu lost",
                         (unsigned long long)i);
        cr_assert_eq(s.seq, i);
    }
    int st;
    waitpid(pid, &st, 0);
    cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "child status %d", st);
    shoal_arena_close(p.arena);
}

Test(ring, doorbell_wait_times_out_and_wakes_on_close)
{
    struct many p;
    make_many(&p);
    uint8_t *m = many_mem(p.arena, p.block);
    shoal_ring *set[NMANY] = {&p.in[0], &p.in[1], &p.in[2]};
    int64_t t = now_ns();
    cr_assert_eq(shoal_doorbell_wait(m, set, NMANY, 1000, 20 * 1000 * 1000), -ETIMEDOUT);
    cr_assert_geq(now_ns() - t, 20 * 1000 * 1000);
    pid_t pid = fork();
    if (pid == 0) {
        struct timespec ts = {0, 50 * 1000 * 1000};
        nanosleep(&ts, NULL);
        shoal_ring_close(&p.in[1]); /* rings the shared doorbell */
        _exit(0);
    }
    cr_assert_eq(shoal_doorbell_wait(m, set, NMANY, 0, 5ll * 1000 * 1000 * 1000), 0, "the close woke us");
    cr_assert(shoal_ring_closed(&p.in[1]));
    cr_assert_not(shoal_ring_closed(&p.in[0]));
    waitpid(pid, NULL, 0);
    shoal_arena_close(p.arena);
}

/* A child that pushes one slot into each of the first k rings, pause_ms apart. */
static pid_t push_later(struct many *p, int k, long pause_ms)
{
    pid_t pid = fork();
    if (pid == 0) {
        for (int i = 0; i < k; i++) {
            struct timespec ts = {pause_ms / 1000, (pause_ms % 1000) * 1000 * 1000};
            nanosleep(&ts, NULL);
            struct slot s = mk((uint64_t)i);
            if (shoal_ring_push(&p->in[i], &s, 1) != 1)
                _exit(20);
        }
        _exit(0);
    }
    return pid;
}

Test(ring, doorbell_wait_n_sleeps_until_the_wanted_push)
{
    struct many p;
    make_many(&p);
    uint8_t *m = many_mem(p.arena, p.block);
    shoal_ring *set[NMANY] = {&p.in[0], &p.in[1], &p.in[2]};
    const int64_t ms = 1000 * 1000;
    /* Three pushes 60 ms apart: a wait for 3 sleeps through the first two. */
    int64_t t = now_ns();
    pid_t pid = push_later(&p, 3, 60);
    cr_assert_eq(shoal_doorbell_wait_n(m, set, NMANY, 3, 0, 5000 * ms), 0);
    int64_t took = now_ns() - t;
    cr_assert_geq(took, 180 * ms, "woken after %lld ms, before the third push", (long long)(took / ms));
    cr_assert_lt(took, 4000 * ms, "the third push did not wake it");
    for (int i = 0; i < NMANY; i++)
        cr_assert_eq(shoal_ring_count(&p.in[i]), 1u);
    int st;
    waitpid(pid, &st, 0);
    cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    /* Something already there: no sleep, whatever it waits for. */
    t = now_ns();
    cr_assert_eq(shoal_doorbell_wait_n(m, set, NMANY, 5, 0, 5000 * ms), 0);
    cr_assert_lt(now_ns() - t, 1000 * ms);
    struct slot s;
    for (int i = 0; i < NMANY; i++)
        cr_assert_eq(shoal_ring_pop(&p.in[i], &s, 1), 1);
    /* One push of the two it waits for: it sleeps to the timeout, then says
     * there is something (the push was counted, not lost). */
    t = now_ns();
    pid = push_later(&p, 1, 20);
    cr_assert_eq(shoal_doorbell_wait_n(m, set, NMANY, 2, 0, 300 * ms), 0);
    cr_assert_geq(now_ns() - t, 300 * ms);
    cr_assert_eq(shoal_ring_pop(&p.in[0], &s, 1), 1);
    waitpid(pid, &st, 0);
    cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    /* A close wakes it, however many pushes it waits for. */
    pid = fork();
    if (pid == 0) {
        struct timespec ts = {0, 50 * 1000 * 1000};
        nanosleep(&ts, NULL);
        shoal_ring_close(&p.in[2]);
        _exit(0);
    }
    t = now_ns();
    cr_assert_eq(shoal_doorbell_wait_n(m, set, NMANY, 7, 0, 5000 * ms), 0);
    cr_assert_lt(now_ns() - t, 4000 * ms, "the close did not wake it");
    cr_assert(shoal_ring_closed(&p.in[2]));
    waitpid(pid, NULL, 0);
    shoal_arena_close(p.arena);
}

Test(ring, push_without_waking_then_wake)
{
    shoal_ring r;
    cr_assert_eq(shoal_ring_init(mem, sizeof mem, 8, &r), 0);
    int efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    cr_assert_geq(efd, 0);
    shoal_ring producer = r;
    shoal_ring_set_notify_fd(&producer, efd);
    struct slot s = mk(9);
    uint64_t v;
    cr_assert_eq(shoal_ring_prepare_sleep(&r), 1);
    cr_assert_eq(shoal_ring_push_nowake(&producer, &s, 1), 1);
    cr_assert_eq(read(efd, &v, sizeof v), -1, "a quiet push wakes nobody");
    cr_assert_eq(shoal_ring_wake(&producer), 1);
    cr_assert_eq(read(efd, &v, sizeof v), (ssize_t)sizeof v, "wake() rings for the sleeper");
    cr_assert_eq(shoal_ring_wake(&producer), 0, "a wake-up is claimed once: the next producer need not ring");
    cr_assert_eq(read(efd, &v, sizeof v), -1);
    shoal_ring_awake(&r);
    shoal_ring_wake(&producer);
    cr_assert_eq(read(efd, &v, sizeof v), -1, "an awake consumer is not rung");
    cr_assert_eq(shoal_ring_pop(&r, &s, 1), 1);
    cr_assert_eq(s.seq, 9);
    close(efd);
}

/* ---- pools: one producer, many consumers ---- */

static uint64_t *claim_of(uint8_t *ring_mem, uint32_t nslots, uint64_t pos)
{
    return (uint64_t *)(ring_mem + 256 + 64 * (pos & (nslots - 1)) + 56);
}

Test(pool, take_withdraw_owner_retire)
{
    shoal_ring p, plain;
    cr_assert_eq(shoal_pool_init(mem, sizeof mem, 8, &p), 0);
    cr_assert(shoal_ring_is_pool(&p));
    shoal_ring q;
    cr_assert_eq(shoal_ring_open(mem, sizeof mem, &q), 0, "a pool opens as a ring");
    cr_assert(shoal_ring_is_pool(&q));
    struct slot s = mk(1), got;
    uint64_t pos;
    cr_assert_eq(shoal_ring_push(&p, &s, 1), -EPROTO, "a pool refuses SPSC pushes");
    cr_assert_eq(shoal_ring_pop(&p, &got, 1), -EPROTO, "and pops");
    for (uint64_t i = 0; i < 3; i++) {
        s = mk(100 + i);
        cr_assert_eq(shoal_pool_push(&p, &s, &pos), 1);
        cr_assert_eq(pos, i);
    }
    cr_assert_eq(shoal_pool_owner(&p, 0), SHOAL_POOL_WAITING);
    cr_assert_eq(shoal_pool_owner(&p, 3), SHOAL_POOL_GONE, "not pushed yet");
    cr_assert_eq(shoal_pool_take(&q, 7, &got, &pos), 1);
    cr_assert_eq(pos, 0);
    cr_assert_eq(got.seq, 100);
    cr_assert_eq(got.fill[0], 100, "the slot's bytes");
    cr_assert_eq(shoal_pool_owner(&p, 0), 7);
    cr_assert_eq(shoal_pool_withdraw(&p, 0), 0, "taken: cannot be withdrawn");
    cr_assert_eq(shoal_pool_withdraw(&p, 1), 1);
    cr_assert_eq(shoal_pool_owner(&p, 1), SHOAL_POOL_GONE);
    cr_assert_eq(shoal_pool_retire(&p, 2), -EBUSY, "still waiting");
    cr_assert_eq(shoal_pool_take(&q, 3, &got, &pos), 1, "the withdrawn one is stepped over");
    cr_assert_eq(pos, 2);
    cr_assert_eq(got.seq, 102);
    cr_assert_eq(shoal_pool_take(&q, 3, &got, &pos), 0, "none waits");
    for (uint64_t i = 0; i < 3; i++)
        cr_assert_eq(shoal_pool_retire(&p, i), 0);
    cr_assert_eq(shoal_pool_retire(&p, 0), -EINVAL, "twice");
    cr_assert_eq(shoal_pool_owner(&p, 0), SHOAL_POOL_GONE);
    shoal_ring_close(&p);
    cr_assert_eq(shoal_pool_take(&q, 3, &got, &pos), -EPIPE);
    cr_assert_eq(shoal_ring_init(mem, sizeof mem, 8, &plain), 0);
    cr_assert_eq(shoal_pool_push(&plain, &s, &pos), -EPROTO, "a plain ring is not a pool");
    cr_assert_eq(shoal_pool_take(&plain, 1, &got, &pos), -EPROTO);
    cr_assert_eq(shoal_pool_take(&q, 0xfffffffeu, &got, &pos), -EPROTO, "an id the claim word cannot hold");
}

Test(pool, full_until_the_oldest_is_retired)
{
    shoal_ring p;
    cr_assert_eq(shoal_pool_init(mem, sizeof mem, 4, &p), 0);
    struct slot s = mk(0), got;
    uint64_t pos;
    for (int i = 0; i < 4; i++)
        cr_assert_eq(shoal_pool_push(&p, &s, &pos), 1);
    cr_assert_eq(shoal_pool_push(&p, &s, &pos), 0, "four waiting");
    cr_assert_eq(shoal_pool_take(&p, 1, &got, &pos), 1);
    cr_assert_eq(shoal_pool_push(&p, &s, &pos), 0, "taken is not done: its slot is still out");
    cr_assert_eq(shoal_pool_take(&p, 2, &got, &pos), 1);
    cr_assert_eq(shoal_pool_retire(&p, 1), 0);
    cr_assert_eq(shoal_pool_push(&p, &s, &pos), 0, "the slot at tail is the oldest's, not the second's");
    cr_assert_eq(shoal_pool_retire(&p, 0), 0);
    cr_assert_eq(shoal_pool_push(&p, &s, &pos), 1);
    cr_assert_eq(pos, 4);
    cr_assert_eq(shoal_pool_push(&p, &s, &pos), 1);
    cr_assert_eq(pos, 5);
}

Test(pool, a_taker_that_dies_before_moving_head_stalls_nobody)
{
    shoal_ring p;
    cr_assert_eq(shoal_pool_init(mem, sizeof mem, 4, &p), 0);
    struct slot s = mk(5), got;
    uint64_t pos;
    for (int i = 0; i < 4; i++)
        cr_assert_eq(shoal_pool_push(&p, &s, &pos), 1);
    /* Consumer 9 swaps the claim word of position 0 and dies before moving head. */
    *claim_of(mem, 4, 0) = (uint64_t)0 << 32 | 10;
    cr_assert_eq(shoal_pool_owner(&p, 0), 9, "the dead consumer's claim is on record");
    cr_assert_eq(shoal_pool_take(&p, 1, &got, &pos), 1);
    cr_assert_eq(pos, 1, "the next consumer steps over it");
    /* The same with the pool full and the producer the only one left: it
     * retires the dead one's task, and head moves on. */
    cr_assert_eq(shoal_pool_init(mem, sizeof mem, 4, &p), 0);
    for (int i = 0; i < 4; i++)
        cr_assert_eq(shoal_pool_push(&p, &s, &pos), 1);
    *claim_of(mem, 4, 0) = (uint64_t)0 << 32 | 10;
    cr_assert_eq(shoal_pool_retire(&p, 0), 0);
    cr_assert_eq(shoal_pool_push(&p, &s, &pos), 1, "room again");
    cr_assert_eq(pos, 4);
}

Test(pool, scribbled_claim_words_end_in_euclean_not_a_hang)
{
    shoal_ring p;
    cr_assert_eq(shoal_pool_init(mem, sizeof mem, 4, &p), 0);
    struct slot s = mk(5), got;
    uint64_t pos;
    cr_assert_eq(shoal_pool_push(&p, &s, &pos), 1);
    *claim_of(mem, 4, 0) = (uint64_t)77 << 32; /* waiting, for a position that is not there */
    cr_assert_eq(shoal_pool_take(&p, 1, &got, &pos), -EUCLEAN);
}

/* Three processes take from one pool, each with its own doorbell; the
 * producer wakes the sleepers, and retires what they report done. */
#define NTAKERS 3
#define NTASKS 30000

struct shared_pool {
    _Alignas(64) uint8_t ring[256 + 64 * 256];
    _Alignas(64) uint8_t bells[NTAKERS][64];
    _Atomic uint32_t taken_by[NTASKS]; /* who + 1 */
    _Atomic uint64_t done[NTASKS];
};

Test(pool, three_processes_take_every_task_exactly_once)
{
    struct shared_pool *sp = mmap(NULL, sizeof *sp, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    cr_assert_neq(sp, MAP_FAILED);
    shoal_ring prod;
    cr_assert_eq(shoal_pool_init(sp->ring, sizeof sp->ring, 256, &prod), 0);
    pid_t pids[NTAKERS];
    for (uint32_t who = 0; who < NTAKERS; who++) {
        pids[who] = fork();
        if (pids[who] == 0) {
            shoal_ring mine;
            if (shoal_ring_open(sp->ring, sizeof sp->ring, &mine) < 0)
                _exit(2);
            shoal_ring_set_doorbell(&mine, sp->bells[who]);
            shoal_ring *set[1] = {&mine};
            for (;;) {
                struct slot s;
                uint64_t pos;
                int rc = shoal_pool_take(&mine, who, &s, &pos);
                if (rc == -EPIPE)
                    _exit(0);
                if (rc < 0) {
                    fprintf(stderr, "taker %u: take: %s\n", who, strerror(-rc));
                    _exit(3);
                }
                if (rc == 0) {
                    if (getppid() == 1)
                        _exit(6); /* the test is gone */
                    shoal_doorbell_wait(sp->bells[who], set, 1, who == 0 ? 20000 : 0, 1000ll * 1000 * 1000);
                    continue;
                }
                if (s.seq >= NTASKS || s.fill[0] != (uint8_t)(s.seq & 0xff))
                    _exit(4);
                uint32_t none = 0;
                if (!atomic_compare_exchange_strong(&sp->taken_by[s.seq], &none, who + 1))
                    _exit(5); /* taken twice */
                atomic_store(&sp->done[s.seq], pos + 1);
            }
        }
    }
    shoal_ring waker[NTAKERS];
    for (int i = 0; i < NTAKERS; i++) {
        waker[i] = prod;
        shoal_ring_set_doorbell(&waker[i], sp->bells[i]);
    }
    uint64_t retired = 0;
    int64_t deadline = now_ns() + 60ll * 1000 * 1000 * 1000;
    for (uint64_t i = 0; i < NTASKS;) {
        struct slot s = mk(i);
        uint64_t pos;
        int rc = shoal_pool_push(&prod, &s, &pos);
        cr_assert_geq(rc, 0);
        if (rc == 1) {
            i++;
            for (int k = 0; k < NTAKERS; k++)
                if (shoal_ring_wake(&waker[k]))
                    break; /* one sleeper per task is enough */
        }
        /* Retire, in order, whatever has been done. */
        while (retired < i && atomic_load(&sp->done[retired])) {
            cr_assert_eq(shoal_pool_retire(&prod, atomic_load(&sp->done[retired]) - 1), 0);
            retired++;
        }
        cr_assert_lt(now_ns(), deadline, "stuck at task %llu", (unsigned long long)i);
    }
    while (retired < NTASKS) {
        if (atomic_load(&sp->done[retired])) {
            retired++;
            continue;
        }
        cr_assert_lt(now_ns(), deadline, "task %llu never taken", (unsigned long long)retired);
        for (int k = 0; k < NTAKERS; k++)
            shoal_ring_wake(&waker[k]);
        sched_yield();
    }
    shoal_ring_close(&prod);
    for (int k = 0; k < NTAKERS; k++)
        shoal_ring_wake(&waker[k]);
    int per[NTAKERS] = {0};
    for (int k = 0; k < NTAKERS; k++) {
        int st;
        waitpid(pids[k], &st, 0);
        cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "taker %d: status %d", k, st);
    }
    for (uint64_t i = 0; i < NTASKS; i++) {
        uint32_t w = atomic_load(&sp->taken_by[i]);
        cr_assert(w >= 1 && w <= NTAKERS, "task %llu", (unsigned long long)i);
        per[w - 1]++;
    }
    cr_log_info("tasks per taker: %d %d %d", per[0], per[1], per[2]);
    munmap(sp, sizeof *sp);
}
