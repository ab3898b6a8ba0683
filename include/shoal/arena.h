/*
 * shoal/arena.h - the node's shared-memory arena.
 *
 * An arena is one memfd that every process on a node maps once. It holds a
 * multi-process allocator of 64-byte-aligned blocks; each block carries an
 * atomic refcount and a generation, and every attached process has a holder
 * record of the references it holds, so that the references of a process
 * that dies (even inside the allocator's critical section) can be released
 * by whoever notices the death. docs/arena.md gives the byte layout and the
 * lifetime rules.
 *
 * Conventions: functions return 0 (or a non-negative count) on success and a
 * negative errno on failure. Constructors write through an out-parameter and
 * leave it untouched on failure. shoal_arena_close accepts NULL.
 *
 * Threads and processes: every function on one shoal_arena object is safe to
 * call from several threads of the process that created or attached it; the
 * object must not be used in a child after fork() (calls return -ECHILD there:
 * attach again from the inherited fd). Any number of processes may work on
 * one arena at once.
 */
#ifndef SHOAL_ARENA_H
#define SHOAL_ARENA_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct shoal_arena shoal_arena;

/*
 * A reference to one block, as it travels between processes: where the
 * block's payload starts (an offset from the arena's base), how many bytes of
 * it are meant, and the generation the block had when it was allocated. A
 * handle carries no reference by itself; shoal_arena_acquire takes one.
 */
typedef struct shoal_handle {
    uint64_t offset;
    uint64_t length;
    uint64_t generation;
} shoal_handle;

/* Blocks and their payloads are aligned to this many bytes. */
#define SHOAL_ARENA_ALIGN 64u
/* Memory is committed, prefaulted and given back in chunks of this size. */
#define SHOAL_ARENA_CHUNK (2u * 1024u * 1024u)

/* Flags for shoal_arena_opts.flags. */
enum {
    /*
     * Start a background thread in the creating process that faults in the
     * memory just above what the allocator has handed out so far, so that
     * allocations of never-used memory find their pages already there.
     */
    SHOAL_ARENA_PREFAULT_THREAD = 1u << 0,
    /*
     * Do not fault in a block's never-used pages when the allocator hands it
     * out (by default it does, in the allocating process, outside the lock).
     */
    SHOAL_ARENA_NO_POPULATE = 1u << 1,
};

/* Options for shoal_arena_create; zero fields take their defaults. */
typedef struct shoal_arena_opts {
    /* Bytes available for blocks. Default: half of physical memory. */
    uint64_t heap_size;
    /*
     * Free memory the arena keeps committed for reuse; freed blocks above
     * this amount have their whole chunks given back to the OS.
     * Default: a quarter of heap_size (at least 64 MiB).
     */
    uint64_t retain_bytes;
    /* How far ahead of use the prefault thread runs. Default: 256 MiB. */
    uint64_t prefault_ahead;
    /* Processes (holder records) that can be attached at once. Default 256. */
    uint32_t max_holders;
    /* Distinct blocks one holder can reference at once. Default 16384. */
    uint32_t max_refs;
    /* SHOAL_ARENA_* flags. */
    uint32_t flags;
} shoal_arena_opts;

/* A snapshot of the arena's accounting (taken under its lock). */
typedef struct shoal_arena_stats {
    uint64_t heap_size;       /* bytes available for blocks */
    uint64_t used_bytes;      /* bytes in allocated blocks, headers included */
    uint64_t used_blocks;     /* allocated blocks */
    uint64_t free_bytes;      /* bytes in free blocks, headers included */
    uint64_t free_blocks;     /* free blocks */
    uint64_t largest_free;    /* the largest allocation that can succeed now */
    uint64_t committed_bytes; /* heap memory faulted in (chunks) */
    uint64_t released_bytes;  /* total given back to the OS since creation */
    uint64_t high_water;      /* highest heap offset ever handed out */
    uint32_t holders;         /* attached processes (holder records in use) */
    uint32_t recoveries;      /* times a dead lock owner's state was repaired */
} shoal_arena_stats;

/*
 * The heap size an arena gets by default: half of the memory this process
 * may use, which is the lower of the host's RAM and the limit of its memory
 * cgroup (cgroup v2 memory.max, v1 memory.limit_in_bytes; the lowest of its
 * cgroup and their ancestors), rounded down to 2 MiB (at least 2 MiB).
 * Reads /proc and /sys/fs/cgroup on each call. Thread-safe.
 */
uint64_t shoal_arena_default_heap_size(void);

/*
 * Creates an arena: a memfd of the metadata plus opts->heap_size bytes
 * (sparse: nothing is committed yet), mapped into this process, which becomes
 * its first holder. opts may be NULL for all defaults.
 * Returns 0 and *out, or -EINVAL (bad options), -ENOMEM, or the errno of a
 * failed memfd_create/ftruncate/mmap. The caller owns *out.
 */
int shoal_arena_create(const shoal_arena_opts *opts, shoal_arena **out);

/*
 * Attaches to the arena behind fd (for example one inherited across exec):
 * checks the header, maps the arena once and takes a holder record. The
 * caller keeps fd; the arena keeps a duplicate of its own.
 * Returns 0 and *out, -EBADF, -EPROTO (not an arena, or another version),
 * -ENOSPC (no free holder record), or an mmap errno.
 */
int shoal_arena_attach(int fd, shoal_arena **out);

/*
 * Releases every reference this process holds through a, frees its holder
 * record, unmaps the arena and closes its fd. Stops the prefault thread.
 * Blocks whose last reference goes away are freed. Accepts NULL.
 */
void shoal_arena_close(shoal_arena *a);

/* The arena's memfd, to pass to another process (SCM_RIGHTS or exec). */
int shoal_arena_fd(const shoal_arena *a);

/* Address of this process's mapping of the arena (offset 0). */
void *shoal_arena_base(const shoal_arena *a);

/*
 * Allocates a block of at least len bytes (1 <= len <= heap size minus one
 * block header), 64-byte aligned, with a refcount of 1 held by this process.
 * The never-used 2 MiB chunks the block covers are faulted in, whole, before
 * it is returned, unless the arena was created with SHOAL_ARENA_NO_POPULATE.
 * Returns 0 and *out, -EINVAL (len 0 or larger than the heap), -ENOMEM (no
 * free block is large enough, or the system or this process's memory cgroup
 * cannot supply the pages), -ENOSPC (this process's holder record is full),
 * -ECHILD (called in a forked child), -EUCLEAN (corrupt metadata).
 */
int shoal_arena_alloc(shoal_arena *a, uint64_t len, shoal_handle *out);

/*
 * Validates h and takes one more reference to its block for this process.
 * Returns 0, or -EINVAL (misaligned or zero generation), -ERANGE (outside the
 * heap, or longer than the block), -ESTALE (the block was freed or reused),
 * -ENOSPC (holder record full), -EOVERFLOW (refcount at its limit), -ECHILD.
 */
int shoal_arena_acquire(shoal_arena *a, shoal_handle h);

/*
 * Drops one of this process's references to h's block; the last reference
 * frees the block (and may give its memory back to the OS).
 * Returns 0, the errors of shoal_arena_acquire, or -ENOENT (this process holds
 * no reference to that block).
 */
int shoal_arena_release(shoal_arena *a, shoal_handle h);

/*
 * Validates h without taking a reference and gives the address of its first
 * byte in this process. The caller must hold a reference for as long as it
 * uses the memory. Returns 0, or the validation errors of shoal_arena_acquire.
 */
int shoal_arena_ptr(shoal_arena *a, shoal_handle h, void **out);

/*
 * Releases everything the holder records of process pid hold and frees those
 * records. Refuses while pid is alive (the same process: same pid and start
 * time; a zombie leader with live threads, or a process whose /proc entry
 * cannot be read, counts as alive). Meant for the node agent once a pidfd
 * says a process died.
 * Returns the number of references released (>= 0), -ESRCH (no holder record
 * for pid), -EBUSY (pid is still alive), -ECHILD.
 */
int shoal_arena_reclaim(shoal_arena *a, pid_t pid);

/*
 * Counts the holder records of process pid: how many times it is attached
 * now. 0 means it holds no reference in the arena. Returns the count (>= 0),
 * or -ECHILD, -EUCLEAN. Safe across threads and processes (it takes the
 * lock); the answer may be stale by the time it returns, unless pid is
 * known not to attach meanwhile.
 */
int shoal_arena_holder_count(shoal_arena *a, pid_t pid);

/* Reclaims every holder record whose process is dead. Returns the number of
 * records reclaimed (>= 0) or a negative errno. */
int shoal_arena_reclaim_dead(shoal_arena *a);

/* Fills *out with the arena's accounting. Returns 0 or -ECHILD. */
int shoal_arena_get_stats(shoal_arena *a, shoal_arena_stats *out);

/*
 * Checks every invariant of the allocator and the holder records under the
 * lock: blocks tile the heap, neighbours are never both free, the free lists
 * hold exactly the free blocks, and each block's refcount equals the sum of
 * the holders' counts for it. Returns 0, or -EUCLEAN with a sentence in msg.
 */
int shoal_arena_check(shoal_arena *a, char *msg, size_t msglen);

#ifdef __cplusplus
}
#endif

#endif /* SHOAL_ARENA_H */
