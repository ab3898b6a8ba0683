/*
 * shoal/ring.h - single-producer, single-consumer rings of 64-byte slots in
 * shared memory, with a doorbell.
 *
 * The node agent gives each engine two rings in the arena: a submission ring
 * (agent -> engine: task descriptors) and a completion ring (engine -> agent).
 * A slot is 64 bytes of the caller's choosing, typically a descriptor that
 * names an arena block holding the message, so that a message fanned out to
 * many engines is written once.
 *
 * Waking a sleeping consumer: the consumer spins briefly, then announces that
 * it sleeps and waits on a futex in the ring (shoal_ring_wait) or, for a
 * consumer that waits on many things at once (the agent's event loop), on an
 * eventfd that the producer was given (shoal_ring_set_notify_fd). A producer
 * only pays for a wake-up when the consumer sleeps.
 *
 * Safety: one producer and one consumer at a time, in any processes; the
 * ring's memory is input (another process may scribble on it), so indices are
 * checked before use and a ring whose indices make no sense reports -EUCLEAN
 * instead of reading out of bounds.
 */
#ifndef SHOAL_RING_H
#define SHOAL_RING_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SHOAL_RING_SLOT 64u

/* A consumer's doorbell: 8 bytes of shared memory, 4-byte aligned. Every
 * ring has one of its own (at SHOAL_RING_BELL_OFFSET in its header); a
 * consumer of many rings points them all at one doorbell and waits on it
 * with shoal_doorbell_wait. */
typedef struct shoal_doorbell shoal_doorbell;
#define SHOAL_RING_BELL_OFFSET 192u
#define SHOAL_DOORBELL_SIZE 8u

/* A process's view of a ring: where it is mapped and how to wake its
 * consumer. Plain data, owned by the caller; nothing to free. */
typedef struct shoal_ring {
    struct shoal_ring_shared *shared;
    uint8_t *slots;
    uint32_t nslots;
    int notify_fd;      /* -1: wake the consumer by futex */
    shoal_doorbell *db; /* the consumer's doorbell: the ring's own unless redirected */
} shoal_ring;

/* Bytes a ring of nslots slots needs (nslots a power of two, 2..2^20). */
size_t shoal_ring_size(uint32_t nslots);

/*
 * Formats an empty ring of nslots slots in mem (len bytes, 64-byte aligned)
 * and opens it into *r. Returns 0, or -EINVAL (nslots not a power of two in
 * range, mem misaligned or len too small).
 */
int shoal_ring_init(void *mem, size_t len, uint32_t nslots, shoal_ring *r);

/*
 * Opens a ring that another process formatted in mem: checks its magic,
 * version and size against len. Returns 0 or -EPROTO.
 */
int shoal_ring_open(void *mem, size_t len, shoal_ring *r);

/* Producer: wake the consumer through this eventfd instead of the futex
 * (-1 to go back to the futex). The consumer must then wait on the fd. */
void shoal_ring_set_notify_fd(shoal_ring *r, int fd);

/*
 * Producer: appends up to n slots (n * 64 bytes from src) and publishes them
 * together, with at most one wake-up. Returns how many were appended (0 when
 * full), -EPIPE if the ring was closed, or -EUCLEAN.
 */
int shoal_ring_push(shoal_ring *r, const void *src, uint32_t n);

/*
 * Producer of many rings at once: pushes like shoal_ring_push but wakes
 * nobody; shoal_ring_wake then wakes the consumer if it sleeps. Pushing to
 * every ring first and waking after keeps a woken consumer from delaying
 * the pushes that follow. shoal_ring_wake returns 1 if the consumer slept
 * (and was woken), else 0.
 */
int shoal_ring_push_nowake(shoal_ring *r, const void *src, uint32_t n);
int shoal_ring_wake(shoal_ring *r);

/*
 * Consumer: takes up to max slots into dst. Returns how many (0 when empty),
 * -EPIPE if the ring is closed and empty, or -EUCLEAN.
 */
int shoal_ring_pop(shoal_ring *r, void *dst, uint32_t max);

/*
 * Consumer: waits until the ring is not empty or closed: spins for about
 * spin_ns, then sleeps on the ring's futex. timeout_ns < 0 waits for ever.
 * Returns 0 (something to pop), -EPIPE (closed and empty), -ETIMEDOUT.
 */
int shoal_ring_wait(shoal_ring *r, int64_t spin_ns, int64_t timeout_ns);

/*
 * Consumer that waits elsewhere (on the eventfd given to the producer):
 * announces that it is about to sleep. Returns 1 if it may sleep (the ring
 * is empty, and any later push will notify), 0 if something arrived
 * meanwhile (pop it first). Call shoal_ring_awake when it wakes.
 */
int shoal_ring_prepare_sleep(shoal_ring *r);
void shoal_ring_awake(shoal_ring *r);

/*
 * Both sides of a ring must agree on its doorbell: the consumer of many rings
 * points each of them (producer's view and consumer's view alike) at one
 * doorbell in shared memory (db, SHOAL_DOORBELL_SIZE bytes, 4-byte aligned,
 * zeroed before first use; NULL goes back to the ring's own). A push then
 * wakes that consumer whichever of its rings it lands in.
 */
void shoal_ring_set_doorbell(shoal_ring *r, void *db);

/*
 * Consumer of n rings that share doorbell db: waits until one of them is not
 * empty, or closed. Spins for about spin_ns, then sleeps on the doorbell's
 * futex; timeout_ns < 0 waits for ever. Returns 0 (look at the rings) or
 * -ETIMEDOUT. A closed ring counts as ready for ever: drop it from the set.
 */
int shoal_doorbell_wait(void *db, shoal_ring *const *rings, size_t n, int64_t spin_ns, int64_t timeout_ns);

/*
 * shoal_doorbell_wait, but once asleep, woken only by the want-th push into
 * the rings (or a close, or the timeout): a consumer that knows it waits for
 * k replies from k producers sleeps through the first k - 1 instead of
 * waking for each. The spin still returns as soon as one ring is ready, and
 * so does the wait when one is ready before it sleeps; want 0 counts as 1.
 */
int shoal_doorbell_wait_n(void *db, shoal_ring *const *rings, size_t n, uint32_t want, int64_t spin_ns,
                          int64_t timeout_ns);

/* Whether the ring was closed (by either side). */
int shoal_ring_closed(const shoal_ring *r);

/* Either side: closes the ring. The consumer can still pop what is in it;
 * pushes fail with -EPIPE; a sleeping consumer is woken. */
void shoal_ring_close(shoal_ring *r);

/* Slots waiting to be popped (a snapshot). */
uint32_t shoal_ring_count(const shoal_ring *r);

/*
 * A third party, once the producer is gone (it died): copies the last slots
 * it pushed, up to max and at most the ring's size, popped or not, into
 * dst; returns how many (-EPROTO for a pool). Their contents are
 * stable only because nobody pushes any more. Used by the agent to keep the
 * replies a dead engine left on a lane until its client has taken them.
 */
int shoal_ring_recent(const shoal_ring *r, void *dst, uint32_t max);

/*
 * Pools: one producer, many consumers (a client's load-balanced tasks, which
 * whichever engine is idle takes). A pool is a ring - same layout, same
 * doorbell handshake, each consumer's view pointed at its own doorbell - but
 * the last 8 bytes of each slot are the pool's claim word, so a slot carries
 * 56 bytes of the caller's. shoal_ring_push/pop refuse a pool (-EPROTO) and
 * the pool calls refuse a plain ring. docs/rings.md ("Pools").
 */
#define SHOAL_POOL_WAITING (-1)
#define SHOAL_POOL_GONE (-2)

/* Formats an empty pool (as shoal_ring_init; shoal_ring_open opens it). */
int shoal_pool_init(void *mem, size_t len, uint32_t nslots, shoal_ring *r);

/* Whether the ring is a pool. */
int shoal_ring_is_pool(const shoal_ring *r);

/*
 * Producer: appends one slot (its first 56 bytes) and sets *pos to its
 * position. Returns 1; 0 if the pool is full (nslots waiting, or the task
 * nslots back not yet retired); -EPIPE if closed; -EPROTO if not a pool;
 * -EUCLEAN if its indices make no sense. Wakes nobody: wake the consumers'
 * doorbells (shoal_ring_wake on a ring that uses them).
 */
int shoal_pool_push(shoal_ring *r, const void *slot, uint64_t *pos);

/*
 * Consumer `who` (an id below 2^32 - 3): takes the oldest waiting slot into
 * dst (64 bytes; the last 8 are the claim word) and sets *pos. Returns 1; 0
 * if none waits; -EPIPE if closed and none waits; -EPROTO; -EUCLEAN.
 */
int shoal_pool_take(shoal_ring *r, uint32_t who, void *dst, uint64_t *pos);

/* Producer: takes back the slot at pos if no consumer has it. 1 if it did. */
int shoal_pool_withdraw(shoal_ring *r, uint64_t pos);

/* Who has the slot at pos: the consumer's id, SHOAL_POOL_WAITING if nobody
 * yet, SHOAL_POOL_GONE if pos is withdrawn, retired or not in the pool. */
int64_t shoal_pool_owner(const shoal_ring *r, uint64_t pos);

/* Producer: the task at pos is done with (answered, or its taker is gone);
 * its slot may carry another. 0; -EBUSY if it still waits (withdraw it
 * first); -EINVAL if pos is not taken or withdrawn. */
int shoal_pool_retire(shoal_ring *r, uint64_t pos);

#ifdef __cplusplus
}
#endif

#endif /* SHOAL_RING_H */
