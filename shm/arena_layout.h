/*
 * shm/arena_layout.h - the arena's shared-memory format (private to shm/).
 *
 * Every structure here lives in the memfd and is read by several processes,
 * so it holds offsets from the arena's base, never pointers. docs/arena.md
 * is the byte table of this file; change both together and bump
 * SHOAL_ARENA_VERSION when the layout changes.
 *
 *   offset 0            arena header (one page): identity, layout, allocator
 *                       state, the process-shared robust mutex, the undo log
 *   holders_off         max_holders holder records, 64 bytes each
 *   refs_off            max_holders ref tables, max_refs entries of 16 bytes
 *   chunks_off          one state byte per 2 MiB heap chunk
 *   heap_off            the heap (2 MiB aligned): blocks, each a 64-byte
 *                       header followed by its payload, tiling the heap
 */
#ifndef SHOAL_ARENA_LAYOUT_H
#define SHOAL_ARENA_LAYOUT_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

#define SHOAL_ARENA_MAGIC 0x4e5241414c4f4853ull /* "SHOALARN" little-endian */
#define SHOAL_ARENA_VERSION 1u

#define ARENA_HDR_SIZE 4096u
#define ARENA_NBINS 64u
#define ARENA_UNDO_MAX 16u
#define ARENA_UNDO_BYTES 64u

#define BLOCK_HDR 64u
#define BLOCK_MIN 128u /* a header and 64 bytes of payload */
#define BLOCK_USED 0x55424c53u /* "SLBU" */
#define BLOCK_FREE 0x46424c53u /* "SLBF" */
#define BLOCK_DYING 1u /* flags: last reference is going, memory being given back */

enum chunk_state {
    CHUNK_NEVER = 0,       /* never faulted in (a hole in the memfd) */
    CHUNK_COMMITTED = 1,   /* faulted in, or handed out and about to be */
    CHUNK_RELEASED = 2,    /* given back to the OS (punched) */
    CHUNK_PREFAULTING = 3, /* the prefault thread is faulting it in now */
};

enum holder_state { HOLDER_FREE = 0, HOLDER_LIVE = 1 };

/* One saved byte range of the undo log: restored if its writer dies. */
struct undo_rec {
    uint64_t off;
    uint32_t len;
    uint32_t pad;
    uint8_t data[ARENA_UNDO_BYTES];
};

/*
 * The arena header. The fields up to `layout_end` are written once at
 * creation and only read afterwards. The allocator fields below are changed
 * only under `lock`, except the counters marked atomic, which are read
 * without it.
 */
struct arena_hdr {
    uint64_t magic;
    uint32_t version;
    uint32_t hdr_size;
    uint64_t size; /* bytes of the memfd */
    uint64_t generation; /* random identity of this arena instance */
    uint64_t holders_off;
    uint32_t max_holders;
    uint32_t max_refs;
    uint64_t refs_off;
    uint64_t chunks_off;
    uint64_t nchunks;
    uint64_t heap_off;
    uint64_t heap_size;
    uint64_t retain_bytes;
    uint64_t prefault_ahead;
    uint64_t layout_end;

    /* Allocator state, guarded by lock. */
    _Atomic uint64_t alloc_seq; /* last block generation handed out */
    _Atomic uint64_t high_water; /* heap-relative end of the highest block ever used */
    uint64_t used_bytes;
    uint64_t used_blocks;
    uint64_t free_bytes;
    uint64_t free_blocks;
    uint64_t committed_bytes;
    uint64_t released_bytes;
    uint64_t bin_map; /* bit b set: bins[b] is not empty */
    _Atomic uint32_t recoveries;
    uint32_t broken; /* the heap failed its walk: every call fails */
    uint64_t prefault_next; /* next chunk the prefault thread considers */

    uint8_t pad0[256 - 200];
    pthread_mutex_t lock; /* at 256; process-shared, robust */
    uint8_t pad1[512 - 256 - sizeof(pthread_mutex_t)];
    uint64_t bins[ARENA_NBINS]; /* at 512: first free block of each size class */

    /* At 1024: the undo log of the lock owner's current operation. */
    _Atomic uint32_t undo_n;
    uint32_t undo_pad;
    struct undo_rec undo[ARENA_UNDO_MAX];
};

_Static_assert(sizeof(pthread_mutex_t) <= 256, "mutex fits its slot");
_Static_assert(sizeof(struct arena_hdr) <= ARENA_HDR_SIZE, "header fits a page");

/* A holder record: one per attached process (or per attach within one). */
struct holder {
    _Atomic uint32_t state;
    int32_t pid;
    uint64_t starttime; /* /proc/pid/stat field 22, to tell pid reuse */
    uint64_t nrefs; /* entries in use in this holder's ref table */
    uint8_t pad[40];
};
_Static_assert(sizeof(struct holder) == 64, "holder record is 64 bytes");

/* One entry of a holder's ref table: this holder holds `count` references
 * to the block whose header is at `block`. Entries 0..nrefs-1 are in use. */
struct ref_entry {
    uint64_t block;
    uint64_t count;
};

/*
 * A block header. `size` counts the header; payload starts right after it.
 * `prev_size` is the size of the block just below (0 for the first), so
 * that a freed block finds its lower neighbour. The free-list links are
 * meaningful only in free blocks and are rebuilt after a crash.
 */
struct block_hdr {
    _Atomic uint32_t magic;
    uint32_t flags;
    uint64_t size;
    uint64_t prev_size;
    _Atomic uint64_t generation;
    _Atomic uint32_t refcount;
    uint32_t pad;
    uint64_t length; /* bytes asked for */
    uint64_t next_free;
    uint64_t prev_free;
};
_Static_assert(sizeof(struct block_hdr) == BLOCK_HDR, "block header is 64 bytes");

#endif /* SHOAL_ARENA_LAYOUT_H */
