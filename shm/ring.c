/*
 * shm/ring.c - SPSC rings of 64-byte slots in shared memory, with a doorbell.
 *
 * Layout (docs/rings.md has the byte table): a 256-byte header of four cache
 * lines - constants; the producer's tail; the consumer's head; the sleep
 * handshake - then nslots slots. Head and tail count slots ever popped and
 * pushed (64-bit, never wrap); slot i lives at i & (nslots - 1).
 *
 * The sleep handshake is Dekker's: the consumer stores `sleeping` then loads
 * `tail`; the producer stores `tail` then loads `sleeping`; all four are
 * sequentially consistent, so at least one side sees the other's store:
 * either the consumer sees the new slots and does not sleep, or the producer
 * sees the sleeper and rings the bell. The bell is a futex word bumped before
 * every wake-up, so a wait that starts after the bump returns at once.
 */
#define _GNU_SOURCE
#include <shoal/ring.h>

#include "cpu.h"

#include <errno.h>
#include <limits.h>
#include <sched.h>
#include <stddef.h>
#include <linux/futex.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define RING_MAGIC 0x474e4952u /* "RING" */
#define RING_VERSION 1u
#define RING_HDR 256u
#define RING_POOL 1u

/* A pool slot's claim word (its last 8 bytes): the low 32 bits of the slot's
 * position, then its state. */
#define CLAIM_OFFSET 56u
#define ST_WAITING 0u
#define ST_WITHDRAWN 0xfffffffeu
#define ST_FREE 0xffffffffu
#define CLAIM(pos, st) ((uint64_t)(uint32_t)(pos) << 32 | (uint32_t)(st))
#define CLAIM_SEQ(w) ((uint32_t)((w) >> 32))
#define CLAIM_ST(w) ((uint32_t)(w))

struct shoal_ring_shared {
    /* Line 0: written once by init. */
    uint32_t magic;
    uint32_t version;
    uint32_t nslots;
    uint32_t slot_size;
    _Atomic uint32_t closed;
    uint32_t flags; /* RING_POOL: a pool (many consumers), see shoal_pool_* */
    uint8_t pad0[64 - 24];
    /* Line 1: the producer's. */
    _Atomic uint64_t tail;
    uint8_t pad1[56];
    /* Line 2: the consumer's. */
    _Atomic uint64_t head;
    uint8_t pad2[56];
    /* Line 3: the sleep handshake, touched by both only around sleeping. */
    _Atomic uint32_t sleeping;
    _Atomic uint32_t bell;
    uint8_t pad3[56];
};

_Static_assert(sizeof(struct shoal_ring_shared) == RING_HDR, "ring header is four cache lines");

/* The sleep handshake's two words. A ring's own live in its line 3; a
 * consumer of many rings points them at one of its own. */
struct shoal_doorbell {
    _Atomic uint32_t sleeping;
    _Atomic uint32_t bell;
};
_Static_assert(offsetof(struct shoal_ring_shared, sleeping) == SHOAL_RING_BELL_OFFSET, "docs/rings.md");
_Static_assert(sizeof(struct shoal_doorbell) == SHOAL_DOORBELL_SIZE, "docs/rings.md");

static int64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static int futex_wait(_Atomic uint32_t *addr, uint32_t val, int64_t timeout_ns)
{
    struct timespec ts, *tsp = NULL;
    if (timeout_ns >= 0) {
        ts.tv_sec = (time_t)(timeout_ns / 1000000000);
        ts.tv_nsec = (long)(timeout_ns % 1000000000);
        tsp = &ts;
    }
    /* Not FUTEX_PRIVATE: the word is shared between processes. */
    return (int)syscall(SYS_futex, addr, FUTEX_WAIT, val, tsp, NULL, 0);
}

static void futex_wake(_Atomic uint32_t *addr)
{
    (void)syscall(SYS_futex, addr, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

size_t shoal_ring_size(uint32_t nslots)
{
    return RING_HDR + (size_t)nslots * SHOAL_RING_SLOT;
}

static int valid_nslots(uint32_t n)
{
    return n >= 2 && n <= (1u << 20) && (n & (n - 1)) == 0;
}

static void attach(void *mem, uint32_t nslots, shoal_ring *r)
{
    r->shared = mem;
    r->slots = (uint8_t *)mem + RING_HDR;
    r->nslots = nslots;
    r->notify_fd = -1;
    r->db = (shoal_doorbell *)&r->shared->sleeping;
}

int shoal_ring_init(void *mem, size_t len, uint32_t nslots, shoal_ring *r)
{
    if (!valid_nslots(nslots) || (uintptr_t)mem % 64 || len < shoal_ring_size(nslots))
        return -EINVAL;
    struct shoal_ring_shared *s = mem;
    memset(s, 0, RING_HDR);
    s->nslots = nslots;
    s->slot_size = SHOAL_RING_SLOT;
    s->version = RING_VERSION;
    /* Release: whoever sees the magic sees a formatted ring. */
    atomic_store_explicit((_Atomic uint32_t *)&s->magic, RING_MAGIC, memory_order_release);
    attach(mem, nslots, r);
    return 0;
}

int shoal_ring_open(void *mem, size_t len, shoal_ring *r)
{
    if ((uintptr_t)mem % 64 || len < RING_HDR)
        return -EPROTO;
    struct shoal_ring_shared *s = mem;
    uint32_t magic = atomic_load_explicit((_Atomic uint32_t *)&s->magic, memory_order_acquire);
    uint32_t n = s->nslots;
    if (magic != RING_MAGIC || s->version != RING_VERSION || s->slot_size != SHOAL_RING_SLOT ||
        !valid_nslots(n) || len < shoal_ring_size(n))
        return -EPROTO;
    attach(mem, n, r);
    return 0;
}

void shoal_ring_set_notify_fd(shoal_ring *r, int fd)
{
    r->notify_fd = fd;
}

void shoal_ring_set_doorbell(shoal_ring *r, void *db)
{
    r->db = db ? db : (shoal_doorbell *)&r->shared->sleeping;
}

int shoal_ring_closed(const shoal_ring *r)
{
    return (int)atomic_load_explicit(&r->shared->closed, memory_order_acquire);
}

/* The producer half of the handshake, after storing tail (sequentially
 * consistent): if the consumer sleeps, claim the wake-up - clear `sleeping`
 * with a compare-and-swap, so that of several producers only one pays for
 * the syscall (and a waker of many consumers can count who it woke). The
 * consumer sets `sleeping` again before it next sleeps and looks at every
 * tail after that, so a producer that finds it cleared is still seen. */
static int claim_sleeper(shoal_doorbell *db)
{
    /* `sleeping` is how many more pushes the consumer waits for (usually
     * 1; see shoal_doorbell_wait_n): count ours, and wake it if ours was the
     * last it wanted. */
    uint32_t want = atomic_load_explicit(&db->sleeping, memory_order_seq_cst);
    while (want != 0) {
        if (atomic_compare_exchange_weak_explicit(&db->sleeping, &want, want - 1, memory_order_seq_cst,
                                                  memory_order_seq_cst))
            return want == 1;
    }
    return 0;
}

static void ring_bell(shoal_ring *r)
{
    shoal_doorbell *db = r->db;
    atomic_fetch_add_explicit(&db->bell, 1, memory_order_seq_cst);
    if (r->notify_fd >= 0) {
        uint64_t one = 1;
        ssize_t n;
        do {
            n = write(r->notify_fd, &one, sizeof one);
        } while (n < 0 && errno == EINTR);
        /* EAGAIN: the counter is saturated, so the consumer is awake anyway. */
    } else {
        futex_wake(&db->bell);
    }
}

static int push(shoal_ring *r, const void *src, uint32_t n, int wake)
{
    struct shoal_ring_shared *s = r->shared;
    if (s->flags & RING_POOL)
        return -EPROTO;
    if (atomic_load_explicit(&s->closed, memory_order_acquire))
        return -EPIPE;
    /* Only we write tail; head comes from the consumer: acquire, so that the
     * slots it freed are really free before we overwrite them. */
    uint64_t tail = atomic_load_explicit(&s->tail, memory_order_relaxed);
    uint64_t head = atomic_load_explicit(&s->head, memory_order_acquire);
    if (head > tail || tail - head > r->nslots)
        return -EUCLEAN;
    uint64_t room = r->nslots - (tail - head);
    uint32_t k = n < room ? n : (uint32_t)room;
    for (uint32_t i = 0; i < k; i++)
        memcpy(r->slots + ((tail + i) & (r->nslots - 1)) * SHOAL_RING_SLOT,
               (const uint8_t *)src + (size_t)i * SHOAL_RING_SLOT, SHOAL_RING_SLOT);
    if (k == 0)
        return 0;
    /* Sequentially consistent store then load: the producer half of the
     * sleep handshake (see the top of this file). It also releases the slot
     * contents to the consumer. */
    atomic_store_explicit(&s->tail, tail + k, memory_order_seq_cst);
    if (wake && claim_sleeper(r->db))
        ring_bell(r);
    return (int)k;
}

int shoal_ring_push(shoal_ring *r, const void *src, uint32_t n)
{
    return push(r, src, n, 1);
}

int shoal_ring_push_nowake(shoal_ring *r, const void *src, uint32_t n)
{
    return push(r, src, n, 0);
}

int shoal_ring_wake(shoal_ring *r)
{
    /* The producer half of the handshake, completed: the push stored the tail. */
    if (!claim_sleeper(r->db))
        return 0;
    ring_bell(r);
    return 1;
}

int shoal_ring_pop(shoal_ring *r, void *dst, uint32_t max)
{
    struct shoal_ring_shared *s = r->shared;
    if (s->flags & RING_POOL)
        return -EPROTO;
    uint64_t head = atomic_load_explicit(&s->head, memory_order_relaxed);
    /* Acquire: the slots up to tail are written before we read them. */
    uint64_t tail = atomic_load_explicit(&s->tail, memory_order_acquire);
    if (head > tail || tail - head > r->nslots)
        return -EUCLEAN;
    uint64_t avail = tail - head;
    if (avail == 0)
        return atomic_load_explicit(&s->closed, memory_order_acquire) ? -EPIPE : 0;
    uint32_t k = max < avail ? max : (uint32_t)avail;
    for (uint32_t i = 0; i < k; i++)
        memcpy((uint8_t *)dst + (size_t)i * SHOAL_RING_SLOT,
               r->slots + ((head + i) & (r->nslots - 1)) * SHOAL_RING_SLOT, SHOAL_RING_SLOT);
    /* Release: our reads of the slots finish before the producer may reuse them. */
    atomic_store_explicit(&s->head, head + k, memory_order_release);
    return (int)k;
}

int shoal_ring_recent(const shoal_ring *r, void *dst, uint32_t max)
{
    const struct shoal_ring_shared *s = r->shared;
    if (s->flags & RING_POOL)
        return -EPROTO;
    /* Acquire: the slots up to tail were written before it was. */
    uint64_t tail = atomic_load_explicit(&s->tail, memory_order_acquire);
    uint64_t k = tail < r->nslots ? tail : r->nslots;
    if (k > max)
        k = max;
    for (uint64_t i = 0; i < k; i++)
        memcpy((uint8_t *)dst + (size_t)i * SHOAL_RING_SLOT,
               r->slots + ((tail - k + i) & (r->nslots - 1)) * SHOAL_RING_SLOT, SHOAL_RING_SLOT);
    return (int)k;
}

static int ready(const struct shoal_ring_shared *s)
{
    return atomic_load_explicit(&s->tail, memory_order_acquire) !=
               atomic_load_explicit(&s->head, memory_order_relaxed) ||
           atomic_load_explicit(&s->closed, memory_order_acquire);
}

int shoal_ring_prepare_sleep(shoal_ring *r)
{
    struct shoal_ring_shared *s = r->shared;
    /* The consumer half of the handshake: store sleeping, then load tail. */
    atomic_store_explicit(&r->db->sleeping, 1, memory_order_seq_cst);
    if (atomic_load_explicit(&s->tail, memory_order_seq_cst) != atomic_load_explicit(&s->head, memory_order_relaxed) ||
        atomic_load_explicit(&s->closed, memory_order_seq_cst)) {
        atomic_store_explicit(&r->db->sleeping, 0, memory_order_relaxed);
        return 0;
    }
    return 1;
}

void shoal_ring_awake(shoal_ring *r)
{
    atomic_store_explicit(&r->db->sleeping, 0, memory_order_relaxed);
}

/* A spinning consumer looks at the clock every 64 turns, and every
 * SPIN_YIELD_NS gives its core away (sched_yield): on a machine with fewer
 * cores than busy processes, the one it waits for may share its core, and
 * must not wait for the spin to end before it runs. Returns 1 once spin_ns
 * have passed since start. */
#define SPIN_YIELD_NS 20000
static int spin_over(uint32_t turn, int64_t start, int64_t spin_ns, int64_t *yielded)
{
    if ((turn & 63) != 63)
        return 0;
    int64_t t = now_ns();
    if (t - start >= spin_ns)
        return 1;
    if (t - *yielded >= SPIN_YIELD_NS) {
        sched_yield();
        *yielded = t;
    }
    return 0;
}

int shoal_ring_wait(shoal_ring *r, int64_t spin_ns, int64_t timeout_ns)
{
    struct shoal_ring_shared *s = r->shared;
    int64_t start = now_ns(), yielded = start;
    /* Spin first: a round trip through the kernel costs 17-28 us here, a
     * spinning hand-off about 0.1 us. */
    for (uint32_t i = 0; spin_ns > 0; i++) {
        if (ready(s))
            goto done;
        if (spin_over(i, start, spin_ns, &yielded))
            break;
        cpu_relax();
    }
    for (;;) {
        uint32_t bell = atomic_load_explicit(&r->db->bell, memory_order_acquire);
        if (!shoal_ring_prepare_sleep(r))
            goto done;
        int64_t left = -1;
        if (timeout_ns >= 0) {
            left = timeout_ns - (now_ns() - start);
            if (left <= 0) {
                shoal_ring_awake(r);
                return ready(s) ? 0 : -ETIMEDOUT;
            }
        }
        futex_wait(&r->db->bell, bell, left);
        shoal_ring_awake(r);
        if (ready(s))
            goto done;
    }
done:
    if (atomic_load_explicit(&s->tail, memory_order_acquire) == atomic_load_explicit(&s->head, memory_order_relaxed))
        return -EPIPE; /* ready but empty: closed */
    return 0;
}

static int any_ready(shoal_ring *const *rings, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (ready(rings[i]->shared))
            return 1;
    return 0;
}

int shoal_doorbell_wait(void *dbp, shoal_ring *const *rings, size_t n, int64_t spin_ns, int64_t timeout_ns)
{
    return shoal_doorbell_wait_n(dbp, rings, n, 1, spin_ns, timeout_ns);
}

int shoal_doorbell_wait_n(void *dbp, shoal_ring *const *rings, size_t n, uint32_t want, int64_t spin_ns,
                          int64_t timeout_ns)
{
    shoal_doorbell *db = dbp;
    if (want == 0)
        want = 1;
    int64_t start = now_ns(), yielded = start;
    for (uint32_t i = 0; spin_ns > 0; i++) {
        if (any_ready(rings, n))
            return 0;
        if (spin_over(i, start, spin_ns, &yielded))
            break;
        cpu_relax();
    }
    for (;;) {
        uint32_t bell = atomic_load_explicit(&db->bell, memory_order_acquire);
        /* The consumer half of the handshake, once for all the rings: store
         * sleeping (the pushes we wait for), then load every tail (ready()
         * loads with acquire; the fence makes the store-then-loads
         * sequentially consistent). A push before the store is seen here;
         * each push after it counts down, and the want-th wakes us. */
        atomic_store_explicit(&db->sleeping, want, memory_order_seq_cst);
        atomic_thread_fence(memory_order_seq_cst);
        if (any_ready(rings, n))
            break;
        int64_t left = -1;
        if (timeout_ns >= 0) {
            left = timeout_ns - (now_ns() - start);
            if (left <= 0) {
                atomic_store_explicit(&db->sleeping, 0, memory_order_relaxed);
                return any_ready(rings, n) ? 0 : -ETIMEDOUT;
            }
        }
        futex_wait(&db->bell, bell, left);
        atomic_store_explicit(&db->sleeping, 0, memory_order_relaxed);
        if (any_ready(rings, n))
            return 0;
    }
    atomic_store_explicit(&db->sleeping, 0, memory_order_relaxed);
    return 0;
}

void shoal_ring_close(shoal_ring *r)
{
    atomic_store_explicit(&r->shared->closed, 1, memory_order_seq_cst);
    ring_bell(r);
}

uint32_t shoal_ring_count(const shoal_ring *r)
{
    uint64_t tail = atomic_load_explicit(&r->shared->tail, memory_order_acquire);
    uint64_t head = atomic_load_explicit(&r->shared->head, memory_order_acquire);
    return tail >= head && tail - head <= r->nslots ? (uint32_t)(tail - head) : 0;
}

/* ---- pools: one producer, many consumers ------------------------------------
 *
 * A pool is a ring (same header, same doorbell handshake per consumer) whose
 * consumers race for each slot. The last 8 bytes of every slot are its claim
 * word: the low 32 bits of the slot's position and its state (waiting,
 * taken by consumer `who`, withdrawn by the producer, free). A consumer takes
 * the slot at head by swapping the claim word from waiting to its own id
 * with one compare-and-swap, then moves head on (anyone who finds the slot at
 * head taken moves head on for it, so a consumer dying between the two
 * stalls nobody). Who holds which task is thus in the pool itself, written in
 * the same instruction that takes it: the producer can ask after a consumer
 * dies. The producer reuses a slot only once it retires it (its task done
 * with), and never lets tail run more than nslots ahead of head.
 */

static _Atomic uint64_t *claim_word(const shoal_ring *r, uint64_t pos)
{
    return (_Atomic uint64_t *)(r->slots + (pos & (r->nslots - 1)) * SHOAL_RING_SLOT + CLAIM_OFFSET);
}

int shoal_pool_init(void *mem, size_t len, uint32_t nslots, shoal_ring *r)
{
    int rc = shoal_ring_init(mem, len, nslots, r);
    if (rc < 0)
        return rc;
    r->shared->flags = RING_POOL;
    for (uint32_t i = 0; i < nslots; i++)
        atomic_store_explicit(claim_word(r, i), CLAIM(i, ST_FREE), memory_order_relaxed);
    /* Published with the magic, which a peer's open reads with acquire: init
     * stored it before the flags and claim words, so store it again. */
    atomic_store_explicit((_Atomic uint32_t *)&r->shared->magic, RING_MAGIC, memory_order_release);
    return 0;
}

int shoal_ring_is_pool(const shoal_ring *r)
{
    return (r->shared->flags & RING_POOL) != 0;
}

/* Moves head past h (a position below tail) if the slot there is no longer
 * waiting: taken, withdrawn, or even retired already. */
static void step_over(shoal_ring *r, uint64_t h)
{
    uint64_t w = atomic_load_explicit(claim_word(r, h), memory_order_acquire);
    if (CLAIM_SEQ(w) == (uint32_t)h && CLAIM_ST(w) != ST_WAITING)
        atomic_compare_exchange_strong_explicit(&r->shared->head, &h, h + 1, memory_order_acq_rel,
                                                memory_order_relaxed);
}

int shoal_pool_push(shoal_ring *r, const void *slot, uint64_t *pos)
{
    struct shoal_ring_shared *s = r->shared;
    if (!(s->flags & RING_POOL))
        return -EPROTO;
    if (atomic_load_explicit(&s->closed, memory_order_acquire))
        return -EPIPE;
    uint64_t tail = atomic_load_explicit(&s->tail, memory_order_relaxed);
    uint64_t head = atomic_load_explicit(&s->head, memory_order_acquire);
    if (head > tail || tail - head > r->nslots)
        return -EUCLEAN;
    if (tail - head == r->nslots) {
        step_over(r, head); /* a consumer may have died between its take and moving head */
        head = atomic_load_explicit(&s->head, memory_order_acquire);
        if (tail - head >= r->nslots)
            return 0;
    }
    _Atomic uint64_t *w = claim_word(r, tail);
    if (CLAIM_ST(atomic_load_explicit(w, memory_order_acquire)) != ST_FREE)
        return 0; /* the task nslots back is still out */
    memcpy(r->slots + (tail & (r->nslots - 1)) * SHOAL_RING_SLOT, slot, CLAIM_OFFSET);
    atomic_store_explicit(w, CLAIM(tail, ST_WAITING), memory_order_release);
    /* As push(): the producer half of each consumer's sleep handshake. */
    atomic_store_explicit(&s->tail, tail + 1, memory_order_seq_cst);
    *pos = tail;
    return 1;
}

int shoal_pool_take(shoal_ring *r, uint32_t who, void *dst, uint64_t *pos)
{
    struct shoal_ring_shared *s = r->shared;
    if (!(s->flags & RING_POOL) || who >= ST_WITHDRAWN - 1)
        return -EPROTO;
    /* Bounded: every turn but a lost race moves head on, and the pool is
     * shared memory that a broken peer may have scribbled on. */
    for (uint32_t turn = 0; turn < 4 * r->nslots + 1024; turn++) {
        uint64_t h = atomic_load_explicit(&s->head, memory_order_acquire);
        /* Acquire: the claim words of the slots up to tail are written. */
        uint64_t t = atomic_load_explicit(&s->tail, memory_order_acquire);
        if (atomic_load_explicit(&s->closed, memory_order_acquire))
            return -EPIPE; /* unlike a ring's: what waits in a closed pool is not to be taken */
        if (h > t)
            return -EUCLEAN;
        if (t - h > r->nslots)
            continue; /* head moved on, and tail with it, between our two loads */
        if (h == t)
            return 0;
        _Atomic uint64_t *w = claim_word(r, h);
        uint64_t cur = atomic_load_explicit(w, memory_order_acquire);
        if (CLAIM_SEQ(cur) != (uint32_t)h)
            continue; /* head has moved on since we read it */
        if (CLAIM_ST(cur) == ST_WAITING) {
            if (!atomic_compare_exchange_strong_explicit(w, &cur, CLAIM(h, who + 1), memory_order_acq_rel,
                                                         memory_order_acquire))
                continue;
            uint64_t expect = h; /* a failed exchange writes what it found there */
            atomic_compare_exchange_strong_explicit(&s->head, &expect, h + 1, memory_order_acq_rel,
                                                    memory_order_relaxed);
            /* Ours now: the producer rewrites it only after we are done. */
            uint64_t mine = CLAIM(h, who + 1);
            memcpy(dst, r->slots + (h & (r->nslots - 1)) * SHOAL_RING_SLOT, CLAIM_OFFSET);
            memcpy((uint8_t *)dst + CLAIM_OFFSET, &mine, sizeof mine);
            *pos = h;
            return 1;
        }
        step_over(r, h);
    }
    return -EUCLEAN;
}

/* Whether pos is a position the producer has pushed and not yet reused. */
static int in_pool(const shoal_ring *r, uint64_t pos)
{
    uint64_t t = atomic_load_explicit(&r->shared->tail, memory_order_acquire);
    return pos < t && t - pos <= r->nslots;
}

int shoal_pool_withdraw(shoal_ring *r, uint64_t pos)
{
    if (!(r->shared->flags & RING_POOL) || !in_pool(r, pos))
        return 0;
    uint64_t want = CLAIM(pos, ST_WAITING);
    return atomic_compare_exchange_strong_explicit(claim_word(r, pos), &want, CLAIM(pos, ST_WITHDRAWN),
                                                   memory_order_acq_rel, memory_order_acquire);
}

int64_t shoal_pool_owner(const shoal_ring *r, uint64_t pos)
{
    if (!(r->shared->flags & RING_POOL) || !in_pool(r, pos))
        return SHOAL_POOL_GONE;
    uint64_t w = atomic_load_explicit(claim_word(r, pos), memory_order_acquire);
    if (CLAIM_SEQ(w) != (uint32_t)pos || CLAIM_ST(w) == ST_FREE || CLAIM_ST(w) == ST_WITHDRAWN)
        return SHOAL_POOL_GONE;
    if (CLAIM_ST(w) == ST_WAITING)
        return SHOAL_POOL_WAITING;
    return (int64_t)CLAIM_ST(w) - 1;
}

int shoal_pool_retire(shoal_ring *r, uint64_t pos)
{
    if (!(r->shared->flags & RING_POOL) || !in_pool(r, pos))
        return -EINVAL;
    _Atomic uint64_t *w = claim_word(r, pos);
    uint64_t cur = atomic_load_explicit(w, memory_order_acquire);
    if (CLAIM_SEQ(cur) != (uint32_t)pos || CLAIM_ST(cur) == ST_FREE)
        return -EINVAL;
    if (CLAIM_ST(cur) == ST_WAITING)
        return -EBUSY; /* withdraw it first */
    /* Only a waiting word changes under us (a take): this one is not. */
    atomic_store_explicit(w, CLAIM(pos, ST_FREE), memory_order_release);
    if (atomic_load_explicit(&r->shared->head, memory_order_acquire) == pos)
        step_over(r, pos); /* its taker died before moving head on */
    return 0;
}
