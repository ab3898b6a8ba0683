/*
 * shm/arena.c - the multi-process allocator behind shoal's shared memory.
 *
 * The arena is a memfd mapped once by every process on a node. Its heap is
 * tiled by blocks with boundary tags (each header knows its own size and the
 * size of the block below), free blocks sit in power-of-two size classes, and
 * freed neighbours coalesce. All metadata changes happen under one
 * process-shared robust mutex. Because a process may be killed anywhere,
 * including inside that critical section, every change to a block header or
 * a holder record is preceded by saving the old bytes in an undo log kept in
 * the arena header; whoever next takes the lock and gets EOWNERDEAD rolls the
 * log back and rebuilds the free lists and counters from a walk of the heap.
 * The free lists and counters are never logged: they are derived data.
 *
 * Memory is committed lazily. The memfd is sparse; chunks of 2 MiB change
 * state as blocks are handed out (faulted in by the allocating process) and,
 * past the retain budget, freed chunks are punched out and given back.
 */
#define _GNU_SOURCE
#include <shoal/arena.h>

#include "arena_layout.h"

#include "cpu.h"
#include "memlimit.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

_Static_assert(offsetof(struct arena_hdr, lock) == 256, "lock at 256");
_Static_assert(offsetof(struct arena_hdr, bins) == 512, "bins at 512");
_Static_assert(offsetof(struct arena_hdr, undo_n) == 1024, "undo log at 1024");

/* Called at a few points inside critical sections by the crash tests; NULL
 * in normal use. */
void (*shoal__arena_test_hook)(const char *where);

#define TEST_POINT(name)                                                                 \
    do {                                                                                 \
        if (shoal__arena_test_hook)                                                      \
            shoal__arena_test_hook(name);                                                \
    } while (0)

/*
 * The process-private index of this holder's ref table: block offset to the
 * entry's slot. Only the owning process changes its own table, so the index
 * stays in step with it; it lives in private memory and needs no logging.
 */
struct ref_index {
    uint64_t *keys; /* block offset, 0 = empty */
    uint32_t *slots;
    uint32_t cap; /* power of two */
    uint32_t used;
};

struct shoal_arena {
    int fd;
    uint8_t *base;
    size_t map_size;
    struct arena_hdr *hdr;
    uint32_t holder; /* our holder record */
    uint64_t fork_gen; /* fork generation at attach */
    struct ref_index idx;
    uint32_t flags;
    pthread_t prefault_thread;
    _Atomic int prefault_stop;
    bool prefault_running;
};

/* ---- fork detection ------------------------------------------------------ */

static _Atomic uint64_t fork_generation;
static pthread_once_t fork_once = PTHREAD_ONCE_INIT;

static void on_fork_child(void)
{
    atomic_fetch_add(&fork_generation, 1);
}

static void install_fork_handler(void)
{
    pthread_atfork(NULL, NULL, on_fork_child);
}

static int check_process(const shoal_arena *a)
{
    return atomic_load_explicit(&fork_generation, memory_order_relaxed) == a->fork_gen ? 0 : -ECHILD;
}

/* ---- small helpers -------------------------------------------------------- */

static inline uint64_t align_up(uint64_t v, uint64_t a)
{
    return (v + a - 1) & ~(a - 1);
}

static inline struct block_hdr *blk(const shoal_arena *a, uint64_t off)
{
    return (struct block_hdr *)(a->base + off);
}

static inline struct holder *holder_at(const shoal_arena *a, uint32_t i)
{
    return (struct holder *)(a->base + a->hdr->holders_off) + i;
}

static inline struct ref_entry *refs_of(const shoal_arena *a, uint32_t i)
{
    return (struct ref_entry *)(a->base + a->hdr->refs_off) + (uint64_t)i * a->hdr->max_refs;
}

static inline uint8_t *chunk_states(const shoal_arena *a)
{
    return a->base + a->hdr->chunks_off;
}

static inline uint64_t heap_end(const struct arena_hdr *h)
{
    return h->heap_off + h->heap_size;
}

/* Size class of a block: floor(log2(size)) - 7, so 128..255 bytes is bin 0. */
static inline unsigned bin_of(uint64_t size)
{
    unsigned b = 63u - (unsigned)__builtin_clzll(size) - 7u;
    return b < ARENA_NBINS ? b : ARENA_NBINS - 1;
}

enum { PROC_DEAD = 0, PROC_ALIVE = 1 };

/*
 * Whether process pid is alive, from /proc/pid/stat, and if so its start time
 * in clock ticks since boot (field 22), which tells a reused pid. Dead means
 * gone, or a zombie with no thread left: a zombie thread-group leader whose
 * other threads still run (field 20, num_threads, above 1) is alive. Any
 * other failure to read (no /proc, EMFILE, hidepid) is not evidence of death:
 * it returns a negative errno, and callers must then treat the process as
 * alive.
 */
static int proc_state(pid_t pid, uint64_t *starttime)
{
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return errno == ENOENT || errno == ESRCH ? PROC_DEAD : -errno;
    ssize_t n;
    do {
        n = read(fd, buf, sizeof buf - 1);
    } while (n < 0 && errno == EINTR);
    int e = errno;
    close(fd);
    if (n < 0)
        return e == ESRCH ? PROC_DEAD : -e;
    buf[n] = '\0';
    /* The command name may hold spaces and parentheses: parse after the last ')'. */
    char *p = strrchr(buf, ')');
    if (!p || p[1] != ' ')
        return -EPROTO;
    p += 2;
    char state = *p;
    unsigned long long threads = 0, st = 0;
    int field = 3;
    while (field < 22 && *p) {
        if (*p++ == ' ') {
            field++;
            if (field == 20 && sscanf(p, "%llu", &threads) != 1)
                return -EPROTO;
        }
    }
    if (field != 22 || sscanf(p, "%llu", &st) != 1)
        return -EPROTO;
    if ((state == 'Z' || state == 'X') && threads <= 1)
        return PROC_DEAD;
    *starttime = st;
    return PROC_ALIVE;
}

/* Whether the process behind a holder record may still use it. When in
 * doubt, yes: reclaiming a live process's references would free memory it
 * uses. */
static bool holder_alive(const struct holder *hd)
{
    if (hd->pid == (int32_t)getpid())
        return true;
    uint64_t st = 0;
    int r = proc_state(hd->pid, &st);
    if (r < 0)
        return true;
    return r == PROC_ALIVE && (hd->starttime == 0 || st == hd->starttime);
}

/* ---- the undo log -------------------------------------------------------- */

/*
 * Saves the current bytes of [off, off+len) before the caller changes them.
 * The record's bytes are written before undo_n is published with a release
 * store, so a rollback never restores a half-written record: a crash while
 * saving leaves the record unpublished and the target still unchanged.
 */
static void undo_save(shoal_arena *a, uint64_t off, uint32_t len)
{
    struct arena_hdr *h = a->hdr;
    uint32_t n = atomic_load_explicit(&h->undo_n, memory_order_relaxed);
    /* Our own operations log at most a handful of ranges: exceeding the
     * log is a bug in this file, not bad input. */
    if (n >= ARENA_UNDO_MAX || len > ARENA_UNDO_BYTES)
        abort();
    h->undo[n].off = off;
    h->undo[n].len = len;
    memcpy(h->undo[n].data, a->base + off, len);
    atomic_store_explicit(&h->undo_n, n + 1, memory_order_release);
}

/* Ends an operation: its changes are all made, so the log is dropped. The
 * release store orders every change before the log disappears. */
static void undo_commit(shoal_arena *a)
{
    atomic_store_explicit(&a->hdr->undo_n, 0, memory_order_release);
}

/* Restores every saved range, newest first. Idempotent: a rollback that is
 * itself interrupted is simply done again by the next lock owner. */
static void undo_rollback(shoal_arena *a)
{
    struct arena_hdr *h = a->hdr;
    uint32_t n = atomic_load_explicit(&h->undo_n, memory_order_acquire);
    if (n > ARENA_UNDO_MAX)
        n = ARENA_UNDO_MAX;
    for (uint32_t i = n; i-- > 0;) {
        const struct undo_rec *r = &h->undo[i];
        if (r->len <= ARENA_UNDO_BYTES && r->off >= ARENA_HDR_SIZE && r->off <= h->size - r->len)
            memcpy(a->base + r->off, r->data, r->len);
    }
    undo_commit(a);
}

/* ---- free lists ------------------------------------------------------------ */

static void freelist_push(shoal_arena *a, uint64_t off)
{
    struct arena_hdr *h = a->hdr;
    struct block_hdr *b = blk(a, off);
    unsigned bin = bin_of(b->size);
    b->prev_free = 0;
    b->next_free = h->bins[bin];
    if (b->next_free)
        blk(a, b->next_free)->prev_free = off;
    h->bins[bin] = off;
    h->bin_map |= 1ull << bin;
    h->free_bytes += b->size;
    h->free_blocks++;
}

static void freelist_remove(shoal_arena *a, uint64_t off)
{
    struct arena_hdr *h = a->hdr;
    struct block_hdr *b = blk(a, off);
    unsigned bin = bin_of(b->size);
    if (b->prev_free)
        blk(a, b->prev_free)->next_free = b->next_free;
    else
        h->bins[bin] = b->next_free;
    if (b->next_free)
        blk(a, b->next_free)->prev_free = b->prev_free;
    if (!h->bins[bin])
        h->bin_map &= ~(1ull << bin);
    h->free_bytes -= b->size;
    h->free_blocks--;
}

/*
 * Walks the heap and rebuilds the free lists and counters from the block
 * headers, merging free neighbours if any were left unmerged. Used after
 * EOWNERDEAD, once the undo log has restored the headers. Returns 0 or
 * -EUCLEAN if the headers do not tile the heap.
 */
static int rebuild(shoal_arena *a)
{
    struct arena_hdr *h = a->hdr;
    memset(h->bins, 0, sizeof h->bins);
    h->bin_map = 0;
    h->free_bytes = h->free_blocks = h->used_bytes = h->used_blocks = 0;
    uint64_t off = h->heap_off, end = heap_end(h), prev = 0;
    while (off < end) {
        struct block_hdr *b = blk(a, off);
        uint32_t magic = atomic_load_explicit(&b->magic, memory_order_relaxed);
        if ((magic != BLOCK_USED && magic != BLOCK_FREE) || b->size < BLOCK_MIN ||
            b->size % SHOAL_ARENA_ALIGN || b->size > end - off)
            return -EUCLEAN;
        b->prev_size = prev ? off - prev : 0;
        if (magic == BLOCK_FREE && prev && atomic_load(&blk(a, prev)->magic) == BLOCK_FREE) {
            /* Merge into the free block below, which is already listed. */
            struct block_hdr *p = blk(a, prev);
            freelist_remove(a, prev);
            p->size += b->size;
            atomic_store(&b->magic, 0);
            freelist_push(a, prev);
            off = prev + p->size;
            continue;
        }
        if (magic == BLOCK_FREE) {
            freelist_push(a, off);
        } else {
            h->used_bytes += b->size;
            h->used_blocks++;
        }
        prev = off;
        off += b->size;
    }
    if (off != end)
        return -EUCLEAN;
    uint64_t committed = 0;
    for (uint64_t c = 0; c < h->nchunks; c++) {
        uint8_t s = chunk_states(a)[c];
        /* A PREFAULTING chunk counts as committed: its thread may still be
         * faulting it in, in a process that did not die. */
        if (s == CHUNK_COMMITTED || s == CHUNK_PREFAULTING)
            committed += SHOAL_ARENA_CHUNK;
    }
    h->committed_bytes = committed;
    return 0;
}

/* ---- the lock ------------------------------------------------------------- */

static int arena_lock(shoal_arena *a)
{
    struct arena_hdr *h = a->hdr;
    /* Critical sections are short (about 50 ns), so spin a little before
     * sleeping in the kernel: a robust mutex never spins by itself, and a
     * futex round trip costs far more than the wait. */
    int rc = EBUSY;
    for (int spin = 0; spin < 64 && rc == EBUSY; spin++) {
        rc = pthread_mutex_trylock(&h->lock);
        if (rc == EBUSY)
            cpu_relax();
    }
    if (rc == EBUSY)
        rc = pthread_mutex_lock(&h->lock);
    if (rc == EOWNERDEAD) {
        /* The previous owner died inside its critical section: undo its
         * unfinished change, re-derive everything else, then mark the mutex
         * usable again. If we die during this, the next owner repeats it. */
        undo_rollback(a);
        if (rebuild(a) < 0)
            h->broken = 1;
        atomic_fetch_add(&h->recoveries, 1);
        pthread_mutex_consistent(&h->lock);
        rc = 0;
    }
    if (rc)
        return -rc;
    if (h->broken) {
        pthread_mutex_unlock(&h->lock);
        return -EUCLEAN;
    }
    return 0;
}

static void arena_unlock(shoal_arena *a)
{
    pthread_mutex_unlock(&a->hdr->lock);
}

/* ---- the private ref index ------------------------------------------------ */

static uint32_t idx_hash(uint64_t key, uint32_t cap)
{
    return (uint32_t)((key >> 6) * 0x9E3779B97F4A7C15ull >> 32) & (cap - 1);
}

static int idx_grow(struct ref_index *x)
{
    uint32_t ncap = x->cap ? x->cap * 2 : 64;
    uint64_t *nk = calloc(ncap, sizeof *nk);
    uint32_t *ns = calloc(ncap, sizeof *ns);
    if (!nk || !ns) {
        free(nk);
        free(ns);
        return -ENOMEM;
    }
    for (uint32_t i = 0; i < x->cap; i++) {
        if (!x->keys[i])
            continue;
        uint32_t j = idx_hash(x->keys[i], ncap);
        while (nk[j])
            j = (j + 1) & (ncap - 1);
        nk[j] = x->keys[i];
        ns[j] = x->slots[i];
    }
    free(x->keys);
    free(x->slots);
    x->keys = nk;
    x->slots = ns;
    x->cap = ncap;
    return 0;
}

/* Position of key in the table, or of the empty slot where it would go. */
static uint32_t idx_find(const struct ref_index *x, uint64_t key)
{
    uint32_t j = idx_hash(key, x->cap);
    while (x->keys[j] && x->keys[j] != key)
        j = (j + 1) & (x->cap - 1);
    return j;
}

static int idx_lookup(const struct ref_index *x, uint64_t key, uint32_t *slot)
{
    if (!x->cap)
        return -ENOENT;
    uint32_t j = idx_find(x, key);
    if (!x->keys[j])
        return -ENOENT;
    *slot = x->slots[j];
    return 0;
}

static void idx_set(struct ref_index *x, uint64_t key, uint32_t slot)
{
    uint32_t j = idx_find(x, key);
    if (!x->keys[j])
        x->used++;
    x->keys[j] = key;
    x->slots[j] = slot;
}

/* Removes key, shifting later members of its probe run back (no tombstones). */
static void idx_del(struct ref_index *x, uint64_t key)
{
    uint32_t j = idx_find(x, key);
    if (!x->keys[j])
        return;
    x->keys[j] = 0;
    x->used--;
    uint32_t i = j;
    for (;;) {
        i = (i + 1) & (x->cap - 1);
        if (!x->keys[i])
            break;
        uint32_t home = idx_hash(x->keys[i], x->cap);
        /* Move i back to j unless its home lies cyclically in (j, i]. */
        bool stays = (j < i) ? (home > j && home <= i) : (home > j || home <= i);
        if (stays)
            continue;
        x->keys[j] = x->keys[i];
        x->slots[j] = x->slots[i];
        x->keys[i] = 0;
        j = i;
    }
}

/* ---- handle validation ---------------------------------------------------- */

/*
 * Checks a handle against the heap's bounds and the block's header. Safe
 * without the lock (it only reads); under the lock its answer is final.
 */
static int validate(const shoal_arena *a, shoal_handle hd, struct block_hdr **out)
{
    const struct arena_hdr *h = a->hdr;
    if (hd.generation == 0 || hd.offset % SHOAL_ARENA_ALIGN)
        return -EINVAL;
    if (hd.offset < h->heap_off + BLOCK_HDR || hd.offset >= heap_end(h) ||
        hd.length > heap_end(h) - hd.offset)
        return -ERANGE;
    uint64_t boff = hd.offset - BLOCK_HDR;
    struct block_hdr *b = blk(a, boff);
    /* The header is shared memory: its size and boundary tag must make
     * sense before anything (free_block above all) trusts them. */
    uint64_t size = b->size, prev = b->prev_size;
    if (size < BLOCK_MIN || size % SHOAL_ARENA_ALIGN || size > heap_end(h) - boff ||
        prev % SHOAL_ARENA_ALIGN || prev > boff - h->heap_off)
        return -ESTALE;
    if (atomic_load_explicit(&b->magic, memory_order_acquire) != BLOCK_USED ||
        atomic_load_explicit(&b->generation, memory_order_acquire) != hd.generation ||
        atomic_load_explicit(&b->refcount, memory_order_acquire) == 0 || (b->flags & BLOCK_DYING))
        return -ESTALE;
    if (hd.length > b->length || b->length > size - BLOCK_HDR)
        return -ERANGE;
    *out = b;
    return 0;
}

/* ---- commit, populate, release ------------------------------------------- */

/*
 * Marks the chunks under [off, off+len) committed. Returns through lo and hi the
 * range covering the whole chunks that were not committed before (lo == hi if
 * none), for the caller to fault in after it drops the lock. Whole chunks,
 * not just the block's bytes: the blocks handed out later from the rest of a
 * chunk find it committed and so must find its pages there too.
 */
static void commit_range(shoal_arena *a, uint64_t off, uint64_t len, uint64_t *lo, uint64_t *hi)
{
    struct arena_hdr *h = a->hdr;
    uint64_t c0 = (off - h->heap_off) / SHOAL_ARENA_CHUNK;
    uint64_t c1 = (off + len - 1 - h->heap_off) / SHOAL_ARENA_CHUNK;
    uint8_t *cs = chunk_states(a);
    *lo = *hi = 0;
    for (uint64_t c = c0; c <= c1; c++) {
        if (cs[c] == CHUNK_NEVER || cs[c] == CHUNK_RELEASED) {
            cs[c] = CHUNK_COMMITTED;
            h->committed_bytes += SHOAL_ARENA_CHUNK;
            if (*lo == *hi)
                *lo = h->heap_off + c * SHOAL_ARENA_CHUNK;
            *hi = h->heap_off + (c + 1) * SHOAL_ARENA_CHUNK;
        }
    }
    uint64_t top = off + len - h->heap_off;
    if (top > atomic_load_explicit(&h->high_water, memory_order_relaxed))
        atomic_store_explicit(&h->high_water, top, memory_order_relaxed);
}

/*
 * Faults in [lo, hi) of this process's mapping, writable, in one call. It does
 * not change the bytes, so it is safe while other processes use them. Returns
 * -ENOMEM when the memory cannot be had (a memory cgroup's limit, a full
 * system): better an allocation that fails than a SIGBUS or an OOM kill at
 * the first touch. Kernels without MADV_POPULATE_WRITE (before 5.14) fault
 * on first touch instead, as if SHOAL_ARENA_NO_POPULATE were set.
 */
static int populate(shoal_arena *a, uint64_t lo, uint64_t hi)
{
    while (madvise(a->base + lo, hi - lo, MADV_POPULATE_WRITE) < 0) {
        if (errno == EINTR)
            continue;
        return errno == ENOMEM || errno == EFAULT ? -ENOMEM : 0;
    }
    return 0;
}

/* ---- alloc and free, under the lock --------------------------------------- */

/* Finds a free block of at least need bytes: the best fit in need's own
 * class (of the first 16 blocks looked at, or more until one holds it:
 * the list is walked under the lock),
 * else a block of a higher class (which always fits): for a request of a
 * chunk or more, the first of the next non-empty class; for a smaller one,
 * the largest of the highest class, the top of the heap as a rule. Small
 * blocks (messages, replies) come and go all the time: split off the
 * smallest larger block, they would nibble at a freed large block, which
 * then no longer holds the next array of its size, and that array would go
 * to fresh memory above (a 1 GiB gather: 0.07 s in the freed block's pages,
 * 0.3-2.4 s in fresh ones, docs/arena.md). */
static uint64_t find_free(shoal_arena *a, uint64_t need)
{
    struct arena_hdr *h = a->hdr;
    unsigned bin = bin_of(need);
    uint64_t fit = 0; /* the smallest block of need's class that holds it, of the first 16 looked at */
    unsigned seen = 0;
    for (uint64_t off = h->bins[bin]; off && (!fit || seen < 16); off = blk(a, off)->next_free, seen++) {
        uint64_t size = blk(a, off)->size;
        if (size >= need && (!fit || size < blk(a, fit)->size)) {
            fit = off;
            if (size == need)
                break;
        }
    }
    if (fit)
        return fit;
    uint64_t higher = bin + 1 < 64 ? h->bin_map & (~0ull << (bin + 1)) : 0;
    if (!higher)
        return 0;
    if (need >= SHOAL_ARENA_CHUNK)
        return h->bins[__builtin_ctzll(higher)];
    uint64_t best = 0; /* the largest block of the highest class (a few, as a rule), of the first 16 */
    unsigned looked = 0;
    for (uint64_t off = h->bins[63u - (unsigned)__builtin_clzll(higher)]; off && looked < 16;
         off = blk(a, off)->next_free, looked++)
        if (!best || blk(a, off)->size > blk(a, best)->size)
            best = off;
    return best;
}

/*
 * Takes a free block of at least need bytes off the free lists, splitting off
 * the rest as a new free block when it is large enough, and marks it used with
 * refcount 1. Returns the header offset or 0. The caller logs nothing: this
 * function saves every header it changes.
 */
static uint64_t take_block(shoal_arena *a, uint64_t need, uint64_t length)
{
    struct arena_hdr *h = a->hdr;
    uint64_t off = find_free(a, need);
    if (!off)
        return 0;
    struct block_hdr *b = blk(a, off);
    freelist_remove(a, off);
    undo_save(a, off, BLOCK_HDR);
    if (b->size - need >= BLOCK_MIN) {
        uint64_t roff = off + need, rsize = b->size - need, next = off + b->size;
        if (next < heap_end(h)) {
            undo_save(a, next, BLOCK_HDR);
            blk(a, next)->prev_size = rsize;
        }
        struct block_hdr *r = blk(a, roff);
        r->size = rsize;
        r->prev_size = need;
        r->flags = 0;
        r->length = 0;
        atomic_store_explicit(&r->generation, 0, memory_order_relaxed);
        atomic_store_explicit(&r->refcount, 0, memory_order_relaxed);
        atomic_store_explicit(&r->magic, BLOCK_FREE, memory_order_relaxed);
        b->size = need;
        TEST_POINT("alloc-split");
        freelist_push(a, roff);
    }
    b->length = length;
    b->flags = 0;
    atomic_store_explicit(&b->refcount, 1, memory_order_relaxed);
    atomic_store_explicit(&b->generation, atomic_fetch_add(&h->alloc_seq, 1) + 1,
                          memory_order_relaxed);
    /* Release: a process that sees BLOCK_USED also sees the fields above. */
    atomic_store_explicit(&b->magic, BLOCK_USED, memory_order_release);
    h->used_bytes += b->size;
    h->used_blocks++;
    return off;
}

/* Frees a used block whose refcount has reached zero and merges it with free
 * neighbours. Saves every header it changes. */
static void free_block(shoal_arena *a, uint64_t off)
{
    struct arena_hdr *h = a->hdr;
    struct block_hdr *b = blk(a, off);
    undo_save(a, off, BLOCK_HDR);
    h->used_bytes -= b->size;
    h->used_blocks--;
    atomic_store_explicit(&b->generation, 0, memory_order_relaxed);
    atomic_store_explicit(&b->magic, BLOCK_FREE, memory_order_release);
    TEST_POINT("free-mark");

    uint64_t next = off + b->size;
    if (next < heap_end(h) && atomic_load(&blk(a, next)->magic) == BLOCK_FREE) {
        struct block_hdr *n = blk(a, next);
        freelist_remove(a, next);
        undo_save(a, next, BLOCK_HDR);
        b->size += n->size;
        atomic_store_explicit(&n->magic, 0, memory_order_relaxed);
        TEST_POINT("free-merge-next");
    }
    if (b->prev_size) {
        uint64_t prev = off - b->prev_size;
        struct block_hdr *p = blk(a, prev);
        if (atomic_load(&p->magic) == BLOCK_FREE) {
            freelist_remove(a, prev);
            undo_save(a, prev, BLOCK_HDR);
            p->size += b->size;
            atomic_store_explicit(&b->magic, 0, memory_order_relaxed);
            off = prev;
            b = p;
            TEST_POINT("free-merge-prev");
        }
    }
    uint64_t after = off + b->size;
    if (after < heap_end(h)) {
        undo_save(a, after, BLOCK_HDR);
        blk(a, after)->prev_size = b->size;
    }
    freelist_push(a, off);
}

/* ---- holder ref tables, under the lock ------------------------------------ */

/* Adds one reference to block `boff` to our holder record. Logs its changes. */
static int holder_add(shoal_arena *a, uint64_t boff)
{
    struct holder *hd = holder_at(a, a->holder);
    struct ref_entry *t = refs_of(a, a->holder);
    uint32_t slot;
    if (idx_lookup(&a->idx, boff, &slot) == 0) {
        undo_save(a, (uint64_t)((uint8_t *)&t[slot] - a->base), sizeof t[slot]);
        t[slot].count++;
        return 0;
    }
    if (hd->nrefs >= a->hdr->max_refs)
        return -ENOSPC;
    if ((a->idx.used + 1) * 2 > a->idx.cap && idx_grow(&a->idx) < 0)
        return -ENOMEM;
    slot = (uint32_t)hd->nrefs;
    undo_save(a, (uint64_t)((uint8_t *)&t[slot] - a->base), sizeof t[slot]);
    undo_save(a, (uint64_t)((uint8_t *)hd - a->base), sizeof *hd);
    t[slot].block = boff;
    t[slot].count = 1;
    hd->nrefs++;
    idx_set(&a->idx, boff, slot);
    return 0;
}

/*
 * Drops `count` references of holder i's entry at `slot`, removing the entry
 * (swap with the last) when it reaches zero. `x` is the holder's private index
 * when it is our own holder, NULL when reclaiming a dead one. Logs its changes.
 */
static void holder_drop(shoal_arena *a, uint32_t i, uint32_t slot, uint64_t count, struct ref_index *x)
{
    struct holder *hd = holder_at(a, i);
    struct ref_entry *t = refs_of(a, i);
    undo_save(a, (uint64_t)((uint8_t *)&t[slot] - a->base), sizeof t[slot]);
    if (t[slot].count > count) {
        t[slot].count -= count;
        return;
    }
    uint32_t last = (uint32_t)hd->nrefs - 1;
    uint64_t gone = t[slot].block;
    undo_save(a, (uint64_t)((uint8_t *)hd - a->base), sizeof *hd);
    if (slot != last) {
        t[slot] = t[last];
        if (x)
            idx_set(x, t[slot].block, slot);
    }
    hd->nrefs--;
    if (x)
        idx_del(x, gone);
}

/* Drops `count` references to the block at boff; frees it at zero. Returns
 * whether the block is now free. Logs its changes. */
static bool block_unref(shoal_arena *a, uint64_t boff, uint64_t count)
{
    struct block_hdr *b = blk(a, boff);
    uint32_t rc = atomic_load_explicit(&b->refcount, memory_order_relaxed);
    if (rc > count) {
        undo_save(a, boff, BLOCK_HDR);
        atomic_store_explicit(&b->refcount, rc - (uint32_t)count, memory_order_release);
        return false;
    }
    undo_save(a, boff, BLOCK_HDR);
    atomic_store_explicit(&b->refcount, 0, memory_order_release);
    free_block(a, boff);
    return true;
}

/*
 * The chunks wholly inside a block's payload that are committed, as a heap
 * range [*lo, *hi); empty unless freeing it would take the free committed
 * memory over the retain budget.
 */
static void releasable(shoal_arena *a, uint64_t boff, uint64_t *lo, uint64_t *hi)
{
    struct arena_hdr *h = a->hdr;
    struct block_hdr *b = blk(a, boff);
    *lo = *hi = 0;
    uint64_t free_committed = h->committed_bytes > h->used_bytes ? h->committed_bytes - h->used_bytes : 0;
    /* The prefault window above the high-water mark is not counted: it is
     * committed on purpose, ahead of use. */
    if (free_committed + b->size <= h->retain_bytes + h->prefault_ahead)
        return;
    uint64_t s = align_up(boff + BLOCK_HDR - h->heap_off, SHOAL_ARENA_CHUNK);
    uint64_t e = (boff + b->size - h->heap_off) & ~(uint64_t)(SHOAL_ARENA_CHUNK - 1);
    if (e <= s)
        return;
    /* A chunk the prefault thread is working on must not be punched under
     * it; such a block simply keeps its memory this time. */
    for (uint64_t c = s / SHOAL_ARENA_CHUNK; c < e / SHOAL_ARENA_CHUNK; c++)
        if (chunk_states(a)[c] == CHUNK_PREFAULTING)
            return;
    *lo = h->heap_off + s;
    *hi = h->heap_off + e;
}

/* Marks [lo, hi) released, counting only chunks that were committed. */
static void mark_released(shoal_arena *a, uint64_t lo, uint64_t hi)
{
    struct arena_hdr *h = a->hdr;
    uint8_t *cs = chunk_states(a);
    for (uint64_t c = (lo - h->heap_off) / SHOAL_ARENA_CHUNK; c < (hi - h->heap_off) / SHOAL_ARENA_CHUNK; c++) {
        if (cs[c] == CHUNK_COMMITTED) {
            cs[c] = CHUNK_RELEASED;
            h->committed_bytes -= SHOAL_ARENA_CHUNK;
            h->released_bytes += SHOAL_ARENA_CHUNK;
        }
    }
}

/* ---- creation and attachment ---------------------------------------------- */

uint64_t shoal_arena_default_heap_size(void)
{
    uint64_t half = shoal__usable_memory() / 2 / SHOAL_ARENA_CHUNK * SHOAL_ARENA_CHUNK;
    return half ? half : SHOAL_ARENA_CHUNK;
}

static uint64_t default_heap_size(void)
{
    return shoal_arena_default_heap_size();
}

/* Takes a free holder record for this process. Under the lock. */
static int take_holder(shoal_arena *a)
{
    struct arena_hdr *h = a->hdr;
    /* Without a readable /proc the start time stays 0: such a holder is
     * never taken for dead by pid reuse, only by its pid vanishing. */
    uint64_t st = 0;
    (void)proc_state(getpid(), &st);
    for (uint32_t i = 0; i < h->max_holders; i++) {
        struct holder *hd = holder_at(a, i);
        if (atomic_load(&hd->state) != HOLDER_FREE)
            continue;
        undo_save(a, (uint64_t)((uint8_t *)hd - a->base), sizeof *hd);
        hd->pid = (int32_t)getpid();
        hd->starttime = st;
        hd->nrefs = 0;
        atomic_store(&hd->state, HOLDER_LIVE);
        a->holder = i;
        return 0;
    }
    return -ENOSPC;
}

static int reclaim_holder(shoal_arena *a, uint32_t i);

/*
 * Maps the whole arena once. The heap is marked MADV_HUGEPAGE: where the
 * administrator allows huge pages for shared memory
 * (/sys/kernel/mm/transparent_hugepage/shmem_enabled set to advise), a first
 * touch then costs one fault per 2 MiB instead of one per 4 KiB, measured
 * here as 25x cheaper; where it is off (the default), the advice is ignored.
 */
static int map_arena(int fd, uint64_t size, uint64_t heap_off, shoal_arena **out)
{
    shoal_arena *a = calloc(1, sizeof *a);
    if (!a)
        return -ENOMEM;
    void *m = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (m == MAP_FAILED) {
        int e = -errno;
        free(a);
        return e;
    }
    (void)madvise((uint8_t *)m + heap_off, size - heap_off, MADV_HUGEPAGE);
    a->fd = fd;
    a->holder = UINT32_MAX; /* none yet: take_holder sets it */
    a->base = m;
    a->map_size = size;
    a->hdr = m;
    pthread_once(&fork_once, install_fork_handler);
    a->fork_gen = atomic_load(&fork_generation);
    *out = a;
    return 0;
}

static void unmap_arena(shoal_arena *a)
{
    munmap(a->base, a->map_size);
    close(a->fd);
    free(a->idx.keys);
    free(a->idx.slots);
    free(a);
}

static void *prefault_main(void *arg);

int shoal_arena_create(const shoal_arena_opts *opts, shoal_arena **out)
{
    shoal_arena_opts o = {0};
    if (opts)
        o = *opts;
    if (!o.heap_size)
        o.heap_size = default_heap_size();
    if (!o.max_holders)
        o.max_holders = 256;
    if (!o.max_refs)
        o.max_refs = 16384;
    if (!o.retain_bytes) {
        o.retain_bytes = o.heap_size / 4;
        if (o.retain_bytes < (64u << 20))
            o.retain_bytes = 64u << 20;
    }
    if (!(o.flags & SHOAL_ARENA_PREFAULT_THREAD))
        o.prefault_ahead = 0;
    else if (!o.prefault_ahead)
        o.prefault_ahead = 256u << 20;
    o.heap_size = align_up(o.heap_size, SHOAL_ARENA_CHUNK);
    if (o.heap_size > (1ull << 46) || o.max_holders > (1u << 16) || o.max_refs > (1u << 24))
        return -EINVAL;

    uint64_t holders_off = ARENA_HDR_SIZE;
    uint64_t refs_off = align_up(holders_off + (uint64_t)o.max_holders * sizeof(struct holder), 4096);
    uint64_t nchunks = o.heap_size / SHOAL_ARENA_CHUNK;
    uint64_t chunks_off =
        align_up(refs_off + (uint64_t)o.max_holders * o.max_refs * sizeof(struct ref_entry), 4096);
    uint64_t heap_off = align_up(chunks_off + nchunks, SHOAL_ARENA_CHUNK);
    uint64_t size = heap_off + o.heap_size;

    int fd = memfd_create("shoal-arena", MFD_CLOEXEC);
    if (fd < 0)
        return -errno;
    int rc;
    if (ftruncate(fd, (off_t)size) < 0) {
        rc = -errno;
        goto fail_truncate;
    }
    shoal_arena *a;
    rc = map_arena(fd, size, heap_off, &a);
    if (rc < 0)
        goto fail_truncate;

    /* Every page of the memfd reads as zero, so only non-zero fields need
     * writing; the holder records, ref tables and chunk states start empty. */
    struct arena_hdr *h = a->hdr;
    h->version = SHOAL_ARENA_VERSION;
    h->hdr_size = sizeof *h;
    h->size = size;
    if (getrandom(&h->generation, sizeof h->generation, 0) != sizeof h->generation)
        h->generation = (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32);
    h->holders_off = holders_off;
    h->max_holders = o.max_holders;
    h->max_refs = o.max_refs;
    h->refs_off = refs_off;
    h->chunks_off = chunks_off;
    h->nchunks = nchunks;
    h->heap_off = heap_off;
    h->heap_size = o.heap_size;
    h->retain_bytes = o.retain_bytes;
    h->prefault_ahead = o.prefault_ahead;
    h->layout_end = offsetof(struct arena_hdr, alloc_seq);

    pthread_mutexattr_t ma;
    pthread_mutexattr_init(&ma);
    pthread_mutexattr_setpshared(&ma, PTHREAD_PROCESS_SHARED);
    pthread_mutexattr_setrobust(&ma, PTHREAD_MUTEX_ROBUST);
    rc = -pthread_mutex_init(&h->lock, &ma);
    pthread_mutexattr_destroy(&ma);
    if (rc < 0)
        goto fail_mutex;

    struct block_hdr *b = blk(a, heap_off);
    b->size = o.heap_size;
    atomic_store(&b->magic, BLOCK_FREE);
    freelist_push(a, heap_off);
    a->flags = o.flags;
    rc = take_holder(a);
    undo_commit(a);
    if (rc < 0)
        goto fail_mutex;
    /* Publish the header last: an attacher that sees the magic sees a
     * complete arena. */
    atomic_store_explicit((_Atomic uint64_t *)&h->magic, SHOAL_ARENA_MAGIC, memory_order_release);

    if (o.flags & SHOAL_ARENA_PREFAULT_THREAD) {
        if (pthread_create(&a->prefault_thread, NULL, prefault_main, a) == 0)
            a->prefault_running = true;
    }
    *out = a;
    return 0;

fail_mutex:
    unmap_arena(a);
    return rc;
fail_truncate:
    close(fd);
    return rc;
}

/*
 * Whether a header read from a file describes a layout that fits the file:
 * regions in order, none overlapping the next, all inside `size`, computed
 * without overflow. attach trusts nothing else in the file before this.
 */
static bool layout_ok(const struct arena_hdr *h)
{
    uint64_t end;
    if (h->max_holders == 0 || h->max_holders > (1u << 16) || h->max_refs > (1u << 24) ||
        h->holders_off < ARENA_HDR_SIZE || h->heap_off % SHOAL_ARENA_CHUNK || h->heap_size == 0 ||
        h->heap_size % SHOAL_ARENA_CHUNK || h->nchunks != h->heap_size / SHOAL_ARENA_CHUNK)
        return false;
    if (__builtin_add_overflow(h->holders_off, (uint64_t)h->max_holders * sizeof(struct holder), &end) ||
        end > h->refs_off)
        return false;
    if (__builtin_add_overflow(h->refs_off, (uint64_t)h->max_holders * h->max_refs * sizeof(struct ref_entry),
                               &end) ||
        end > h->chunks_off)
        return false;
    if (__builtin_add_overflow(h->chunks_off, h->nchunks, &end) || end > h->heap_off)
        return false;
    return !__builtin_add_overflow(h->heap_off, h->heap_size, &end) && end == h->size;
}

int shoal_arena_attach(int fd, shoal_arena **out)
{
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0)
        return -EBADF;
    if ((uint64_t)st.st_size < ARENA_HDR_SIZE)
        return -EPROTO;
    struct arena_hdr probe;
    if (pread(fd, &probe, sizeof probe, 0) != (ssize_t)sizeof probe)
        return -EPROTO;
    if (probe.magic != SHOAL_ARENA_MAGIC || probe.version != SHOAL_ARENA_VERSION ||
        probe.hdr_size != sizeof probe || probe.size != (uint64_t)st.st_size || !layout_ok(&probe))
        return -EPROTO;
    int own = fcntl(fd, F_DUPFD_CLOEXEC, 3);
    if (own < 0)
        return -errno;
    shoal_arena *a;
    int rc = map_arena(own, probe.size, probe.heap_off, &a);
    if (rc < 0) {
        close(own);
        return rc;
    }
    rc = arena_lock(a);
    if (rc < 0)
        goto fail;
    rc = take_holder(a);
    if (rc == -ENOSPC) {
        /* Holders of dead processes may be filling the table. */
        for (uint32_t i = 0; i < a->hdr->max_holders; i++) {
            struct holder *hd = holder_at(a, i);
            if (atomic_load(&hd->state) == HOLDER_LIVE && !holder_alive(hd))
                reclaim_holder(a, i);
        }
        rc = take_holder(a);
    }
    undo_commit(a);
    arena_unlock(a);
    if (rc < 0)
        goto fail;
    *out = a;
    return 0;
fail:
    unmap_arena(a);
    return rc;
}

void shoal_arena_close(shoal_arena *a)
{
    if (!a)
        return;
    if (a->prefault_running) {
        atomic_store(&a->prefault_stop, 1);
        pthread_join(a->prefault_thread, NULL);
    }
    if (check_process(a) == 0 && arena_lock(a) == 0) {
        reclaim_holder(a, a->holder);
        arena_unlock(a);
    }
    unmap_arena(a);
}

int shoal_arena_fd(const shoal_arena *a)
{
    return a->fd;
}

void *shoal_arena_base(const shoal_arena *a)
{
    return a->base;
}

/* ---- the public operations ------------------------------------------------ */

int shoal_arena_alloc(shoal_arena *a, uint64_t len, shoal_handle *out)
{
    int rc = check_process(a);
    if (rc < 0)
        return rc;
    if (len == 0 || len > a->hdr->heap_size - BLOCK_HDR)
        return -EINVAL;
    uint64_t need = align_up(len, SHOAL_ARENA_ALIGN) + BLOCK_HDR;
    if (need < BLOCK_MIN)
        need = BLOCK_MIN;
    rc = arena_lock(a);
    if (rc < 0)
        return rc;
    /* Make sure the holder record can take the new reference before taking
     * the block, so that nothing needs undoing afterwards. */
    if (holder_at(a, a->holder)->nrefs >= a->hdr->max_refs)
        rc = -ENOSPC;
    else if ((a->idx.used + 1) * 2 > a->idx.cap)
        rc = idx_grow(&a->idx);
    uint64_t off = rc == 0 ? take_block(a, need, len) : 0;
    if (!off) {
        arena_unlock(a);
        return rc < 0 ? rc : -ENOMEM;
    }
    holder_add(a, off);
    TEST_POINT("alloc-holder");
    struct block_hdr *b = blk(a, off);
    uint64_t lo, hi;
    commit_range(a, off + BLOCK_HDR, b->size - BLOCK_HDR, &lo, &hi);
    shoal_handle hd = {off + BLOCK_HDR, len, atomic_load_explicit(&b->generation, memory_order_relaxed)};
    undo_commit(a);
    arena_unlock(a);
    if (lo != hi && !(a->flags & SHOAL_ARENA_NO_POPULATE) && (rc = populate(a, lo, hi)) < 0) {
        shoal_arena_release(a, hd);
        return rc;
    }
    *out = hd;
    return 0;
}

int shoal_arena_acquire(shoal_arena *a, shoal_handle h)
{
    int rc = check_process(a);
    struct block_hdr *b;
    if (rc < 0 || (rc = arena_lock(a)) < 0)
        return rc;
    /* Validated under the lock, so that the answer still holds when the
     * reference is taken. */
    rc = validate(a, h, &b);
    if (rc == 0 && atomic_load_explicit(&b->refcount, memory_order_relaxed) >= UINT32_MAX - 1)
        rc = -EOVERFLOW;
    if (rc == 0)
        rc = holder_add(a, h.offset - BLOCK_HDR);
    if (rc == 0) {
        undo_save(a, h.offset - BLOCK_HDR, BLOCK_HDR);
        atomic_fetch_add_explicit(&b->refcount, 1, memory_order_relaxed);
    }
    undo_commit(a);
    arena_unlock(a);
    return rc;
}

int shoal_arena_release(shoal_arena *a, shoal_handle h)
{
    int rc = check_process(a);
    struct block_hdr *b;
    if (rc < 0 || (rc = arena_lock(a)) < 0)
        return rc;
    uint64_t boff = h.offset - BLOCK_HDR;
    uint32_t slot = 0;
    rc = validate(a, h, &b);
    if (rc == 0 && idx_lookup(&a->idx, boff, &slot) < 0)
        rc = -ENOENT;
    if (rc < 0) {
        arena_unlock(a);
        return rc;
    }
    uint64_t lo = 0, hi = 0;
    if (atomic_load_explicit(&b->refcount, memory_order_relaxed) == 1)
        releasable(a, boff, &lo, &hi);
    if (lo != hi) {
        /* Giving memory back is slow (about 0.2 s per GiB here), so do it
         * outside the lock while our last reference keeps the block ours:
         * nobody else can be handed these pages meanwhile, and the DYING
         * flag makes the block's handles stale, so nobody can acquire it.
         * If we die during it, reclaiming our holder frees the block. */
        undo_save(a, boff, BLOCK_HDR);
        b->flags |= BLOCK_DYING;
        undo_commit(a);
        arena_unlock(a);
        TEST_POINT("release-punch");
        if (fallocate(a->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)lo, (off_t)(hi - lo)) < 0)
            lo = hi = 0;
        if ((rc = arena_lock(a)) < 0)
            return rc;
        if (lo != hi)
            mark_released(a, lo, hi);
        /* Another thread of ours may have moved our entry meanwhile (a
         * removal swaps the last entry into the hole): look it up again.
         * It is still there: nobody else can drop our last reference. */
        idx_lookup(&a->idx, boff, &slot);
    }
    holder_drop(a, a->holder, slot, 1, &a->idx);
    TEST_POINT("release-holder");
    block_unref(a, boff, 1);
    undo_commit(a);
    arena_unlock(a);
    return 0;
}

int shoal_arena_ptr(shoal_arena *a, shoal_handle h, void **out)
{
    struct block_hdr *b;
    int rc = validate(a, h, &b);
    if (rc < 0)
        return rc;
    *out = a->base + h.offset;
    return 0;
}

/*
 * Releases all of holder i's references, one entry per logged step, then
 * frees the record. A crash between steps leaves a consistent, partly
 * reclaimed holder that a later reclaim finishes. Under the lock. Returns the
 * number of references released.
 */
static int reclaim_holder(shoal_arena *a, uint32_t i)
{
    struct holder *hd = holder_at(a, i);
    struct ref_entry *t = refs_of(a, i);
    struct ref_index *x = i == a->holder ? &a->idx : NULL;
    int released = 0;
    while (hd->nrefs > 0) {
        uint32_t slot = (uint32_t)hd->nrefs - 1;
        uint64_t boff = t[slot].block, count = t[slot].count;
        holder_drop(a, i, slot, count, x);
        TEST_POINT("reclaim-step");
        if (boff >= a->hdr->heap_off && boff < heap_end(a->hdr) &&
            atomic_load(&blk(a, boff)->magic) == BLOCK_USED)
            block_unref(a, boff, count);
        undo_commit(a);
        released += (int)count;
    }
    undo_save(a, (uint64_t)((uint8_t *)hd - a->base), sizeof *hd);
    hd->pid = 0;
    hd->starttime = 0;
    atomic_store(&hd->state, HOLDER_FREE);
    undo_commit(a);
    return released;
}

int shoal_arena_reclaim(shoal_arena *a, pid_t pid)
{
    int rc = check_process(a);
    if (rc < 0 || (rc = arena_lock(a)) < 0)
        return rc;
    int released = 0;
    bool found = false, busy = false;
    for (uint32_t i = 0; i < a->hdr->max_holders; i++) {
        struct holder *hd = holder_at(a, i);
        if (atomic_load(&hd->state) != HOLDER_LIVE || hd->pid != pid)
            continue;
        found = true;
        if (holder_alive(hd)) {
            busy = true;
            continue;
        }
        released += reclaim_holder(a, i);
    }
    arena_unlock(a);
    if (!found)
        return -ESRCH;
    return busy ? -EBUSY : released;
}

int shoal_arena_holder_count(shoal_arena *a, pid_t pid)
{
    int rc = check_process(a);
    if (rc < 0 || (rc = arena_lock(a)) < 0)
        return rc;
    int n = 0;
    for (uint32_t i = 0; i < a->hdr->max_holders; i++) {
        const struct holder *hd = holder_at(a, i);
        n += atomic_load(&hd->state) == HOLDER_LIVE && hd->pid == pid;
    }
    arena_unlock(a);
    return n;
}

int shoal_arena_reclaim_dead(shoal_arena *a)
{
    int rc = check_process(a);
    if (rc < 0 || (rc = arena_lock(a)) < 0)
        return rc;
    int n = 0;
    for (uint32_t i = 0; i < a->hdr->max_holders; i++) {
        struct holder *hd = holder_at(a, i);
        if (atomic_load(&hd->state) == HOLDER_LIVE && !holder_alive(hd)) {
            reclaim_holder(a, i);
            n++;
        }
    }
    arena_unlock(a);
    return n;
}

int shoal_arena_get_stats(shoal_arena *a, shoal_arena_stats *out)
{
    int rc = check_process(a);
    if (rc < 0 || (rc = arena_lock(a)) < 0)
        return rc;
    const struct arena_hdr *h = a->hdr;
    shoal_arena_stats s = {
        .heap_size = h->heap_size,
        .used_bytes = h->used_bytes,
        .used_blocks = h->used_blocks,
        .free_bytes = h->free_bytes,
        .free_blocks = h->free_blocks,
        .committed_bytes = h->committed_bytes,
        .released_bytes = h->released_bytes,
        .high_water = atomic_load(&h->high_water),
        .recoveries = atomic_load(&h->recoveries),
    };
    if (h->bin_map) {
        unsigned top = 63u - (unsigned)__builtin_clzll(h->bin_map);
        for (uint64_t off = h->bins[top]; off; off = blk(a, off)->next_free)
            if (blk(a, off)->size > s.largest_free)
                s.largest_free = blk(a, off)->size;
        s.largest_free = s.largest_free > BLOCK_HDR ? s.largest_free - BLOCK_HDR : 0;
    }
    for (uint32_t i = 0; i < h->max_holders; i++)
        s.holders += atomic_load(&holder_at(a, i)->state) == HOLDER_LIVE;
    arena_unlock(a);
    *out = s;
    return 0;
}

/* ---- the invariant check -------------------------------------------------- */

static int cmp_u64(const void *x, const void *y)
{
    uint64_t a = *(const uint64_t *)x, b = *(const uint64_t *)y;
    return a < b ? -1 : a > b;
}

#define CHECK(cond, ...)                                                                 \
    do {                                                                                 \
        if (!(cond)) {                                                                   \
            if (msg && msglen)                                                           \
                snprintf(msg, msglen, __VA_ARGS__);                                      \
            rc = -EUCLEAN;                                                               \
            goto out;                                                                    \
        }                                                                                \
    } while (0)

int shoal_arena_check(shoal_arena *a, char *msg, size_t msglen)
{
    int rc = check_process(a);
    if (rc < 0 || (rc = arena_lock(a)) < 0)
        return rc;
    const struct arena_hdr *h = a->hdr;
    uint64_t *held = NULL; /* pairs (block, count) from all holders, sorted */
    uint64_t nheld = 0;
    if (msg && msglen)
        msg[0] = '\0';

    /* 1. Blocks tile the heap; no two free neighbours; counters match. */
    uint64_t off = h->heap_off, prev = 0, used = 0, nused = 0, fr = 0, nfree = 0;
    while (off < heap_end(h)) {
        const struct block_hdr *b = blk(a, off);
        uint32_t m = atomic_load(&b->magic);
        CHECK(m == BLOCK_USED || m == BLOCK_FREE, "bad magic %#x at %" PRIu64, m, off);
        CHECK(b->size >= BLOCK_MIN && b->size % SHOAL_ARENA_ALIGN == 0 && b->size <= heap_end(h) - off,
              "bad size %" PRIu64 " at %" PRIu64, b->size, off);
        CHECK(b->prev_size == (prev ? off - prev : 0), "bad prev_size at %" PRIu64, off);
        if (m == BLOCK_FREE) {
            CHECK(!prev || atomic_load(&blk(a, prev)->magic) != BLOCK_FREE, "free neighbours at %" PRIu64,
                  off);
            fr += b->size;
            nfree++;
        } else {
            CHECK(atomic_load(&b->refcount) > 0, "used block at %" PRIu64 " has refcount 0", off);
            CHECK(b->length <= b->size - BLOCK_HDR, "block at %" PRIu64 " longer than itself", off);
            used += b->size;
            nused++;
        }
        prev = off;
        off += b->size;
    }
    CHECK(off == heap_end(h), "blocks overrun the heap");
    CHECK(used == h->used_bytes && nused == h->used_blocks, "used counters %" PRIu64 "/%" PRIu64
          " but walk finds %" PRIu64 "/%" PRIu64, h->used_bytes, h->used_blocks, used, nused);
    CHECK(fr == h->free_bytes && nfree == h->free_blocks, "free counters disagree with the walk");

    /* 2. The free lists hold exactly the free blocks, each in its class. */
    uint64_t listed = 0;
    for (unsigned bin = 0; bin < ARENA_NBINS; bin++) {
        CHECK(!!h->bins[bin] == !!(h->bin_map & (1ull << bin)), "bin map wrong for bin %u", bin);
        uint64_t p = 0;
        for (uint64_t f = h->bins[bin]; f; f = blk(a, f)->next_free) {
            CHECK(f >= h->heap_off && f < heap_end(h), "free list leaves the heap");
            CHECK(atomic_load(&blk(a, f)->magic) == BLOCK_FREE, "used block on a free list");
            CHECK(bin_of(blk(a, f)->size) == bin, "block in the wrong class");
            CHECK(blk(a, f)->prev_free == p, "broken back link");
            CHECK(++listed <= nfree, "free lists are longer than the free blocks (a cycle?)");
            p = f;
        }
    }
    CHECK(listed == nfree, "%" PRIu64 " free blocks but %" PRIu64 " listed", nfree, listed);

    /* 3. Each used block's refcount is the sum of the holders' counts. */
    for (uint32_t i = 0; i < h->max_holders; i++) {
        const struct holder *hd = holder_at(a, i);
        if (atomic_load(&hd->state) == HOLDER_LIVE)
            nheld += hd->nrefs;
        else
            CHECK(hd->nrefs == 0, "free holder %u has refs", i);
    }
    held = malloc((nheld + 1) * 2 * sizeof *held);
    CHECK(held, "out of memory");
    uint64_t k = 0;
    for (uint32_t i = 0; i < h->max_holders; i++) {
        const struct holder *hd = holder_at(a, i);
        if (atomic_load(&hd->state) != HOLDER_LIVE)
            continue;
        const struct ref_entry *t = refs_of(a, i);
        CHECK(hd->nrefs <= h->max_refs, "holder %u overflows its table", i);
        for (uint64_t j = 0; j < hd->nrefs; j++) {
            CHECK(t[j].count > 0, "holder %u has an empty entry", i);
            held[2 * k] = t[j].block;
            held[2 * k + 1] = t[j].count;
            k++;
        }
    }
    qsort(held, nheld, 2 * sizeof *held, cmp_u64);
    uint64_t j = 0;
    for (off = h->heap_off; off < heap_end(h); off += blk(a, off)->size) {
        const struct block_hdr *b = blk(a, off);
        uint64_t sum = 0;
        while (j < nheld && held[2 * j] < off) {
            CHECK(0, "a holder references %" PRIu64 ", which is not a block", held[2 * j]);
        }
        while (j < nheld && held[2 * j] == off)
            sum += held[2 * j++ + 1];
        if (atomic_load(&b->magic) == BLOCK_USED)
            CHECK(sum == atomic_load(&b->refcount),
                  "block at %" PRIu64 " has refcount %u but holders hold %" PRIu64, off,
                  (unsigned)atomic_load(&b->refcount), sum);
        else
            CHECK(sum == 0, "holders reference free block at %" PRIu64, off);
    }
    CHECK(j == nheld, "a holder references something past the heap");
    rc = 0;
out:
    free(held);
    arena_unlock(a);
    return rc;
}

/* ---- the prefault thread -------------------------------------------------- */

/*
 * Faults in never-used chunks just above the highest memory handed out, up
 * to prefault_ahead bytes past it, so that the first use of fresh memory finds
 * its pages present. A chunk it works on is marked PREFAULTING, so the
 * give-back path never punches it meanwhile; the allocator may hand it out
 * all the same, since faulting in does not change bytes.
 */
static void *prefault_main(void *arg)
{
    shoal_arena *a = arg;
    struct arena_hdr *h = a->hdr;
    uint8_t *cs = chunk_states(a);
    struct sched_param prio = {0};
    while (!atomic_load(&a->prefault_stop)) {
        if (arena_lock(a) < 0)
            break;
        uint64_t target = atomic_load(&h->high_water) + h->prefault_ahead;
        uint64_t c = h->prefault_next, found = UINT64_MAX;
        while (c < h->nchunks && c * SHOAL_ARENA_CHUNK < target) {
            if (cs[c] == CHUNK_NEVER) {
                found = c;
                cs[c] = CHUNK_PREFAULTING;
                h->committed_bytes += SHOAL_ARENA_CHUNK;
                break;
            }
            c++;
        }
        h->prefault_next = c;
        arena_unlock(a);
        if (found == UINT64_MAX) {
            struct timespec ts = {0, 5 * 1000 * 1000};
            nanosleep(&ts, NULL);
            continue;
        }
        uint64_t s = h->heap_off + found * SHOAL_ARENA_CHUNK;
        /* Background work: faulting in runs when a core has nothing else to
         * do, so it never delays the tasks it prepares for. Only outside the
         * lock: a starved holder would stall every process's allocations. */
        (void)pthread_setschedparam(pthread_self(), SCHED_IDLE, &prio);
        (void)madvise(a->base + s, SHOAL_ARENA_CHUNK, MADV_POPULATE_WRITE);
        (void)pthread_setschedparam(pthread_self(), SCHED_OTHER, &prio);
        if (arena_lock(a) < 0)
            break;
        if (cs[found] == CHUNK_PREFAULTING)
            cs[found] = CHUNK_COMMITTED;
        h->prefault_next = found + 1;
        arena_unlock(a);
    }
    return NULL;
}
