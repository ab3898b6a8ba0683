/*
 * tests/fuzz/fuzz_slot.c - slots and message blocks that another process
 * wrote into the arena: a ring's or a pool's shared header, indices and
 * claim words (shm/ring.c: shoal_ring_open, shoal_ring_pop, shoal_pool_take,
 * shoal_pool_owner, shoal_pool_retire), the handle a slot names
 * (shm/arena.c: shoal_arena_acquire, shoal_arena_ptr) and the message block
 * behind it (node_agent/parse.c: shoal__msgblock_frames), then the header
 * the agent would sign for those frames (shoal_wire_encode) - the path of an
 * engine's RESULT through the agent's forward_result.
 *
 * The input starts with a ring image (fuzz.h), copied over a ring in a real
 * arena made once per process; the rest is the message block, copied into
 * one arena block (zeroed first). Slot handles are relative to that block,
 * so that the seeds need not know where the arena put it.
 */
#include "fuzz.h"
#include "parse.h"

#include <shoal/arena.h>
#include <shoal/ring.h>
#include <shoal/wire.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static shoal_arena *arena;
static shoal_handle ring_h, block_h;
static uint8_t *ring_mem, *block_mem;

#define CHECK(cond)                                                                                              \
    do {                                                                                                         \
        if (!(cond)) {                                                                                           \
            fprintf(stderr, "fuzz_slot: %s:%d: %s\n", __FILE__, __LINE__, #cond);                              \
            abort();                                                                                             \
        }                                                                                                        \
    } while (0)

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    shoal_arena_opts o = {.heap_size = 8u << 20, .max_holders = 4, .max_refs = 64, .flags = SHOAL_ARENA_NO_POPULATE};
    if (shoal_arena_create(&o, &arena) < 0 || shoal_arena_alloc(arena, FUZZ_SLOT_RING, &ring_h) < 0 ||
        shoal_arena_alloc(arena, FUZZ_SLOT_BLOCK, &block_h) < 0 ||
        shoal_arena_ptr(arena, ring_h, (void **)&ring_mem) < 0 ||
        shoal_arena_ptr(arena, block_h, (void **)&block_mem) < 0) {
        fprintf(stderr, "fuzz_slot: cannot set up the arena\n");
        abort();
    }
    return 0;
}

static uint64_t get64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

/* What the agent does with an engine's completion slot (forward_result). */
static void completion(const uint8_t *slot)
{
    uint32_t kind;
    memcpy(&kind, slot + SLOT_KIND, 4);
    if (kind != KIND_RESULT && kind != KIND_OUTPUT)
        return;
    shoal_handle h = {block_h.offset + get64(slot + SLOT_OFFSET), get64(slot + SLOT_LENGTH),
                      block_h.generation + get64(slot + SLOT_GENERATION)};
    int rc = shoal_arena_acquire(arena, h);
    if (rc < 0) {
        CHECK(rc == -EINVAL || rc == -ERANGE || rc == -ESTALE || rc == -EOVERFLOW);
        return;
    }
    uint8_t *p;
    CHECK(shoal_arena_ptr(arena, h, (void **)&p) == 0);
    /* The generation must be the block's, and the length within it. (The
     * input can also forge a block header inside the ring or the block,
     * which the arena then accepts: docs/arena.md says that its checks stop
     * stale and malformed handles, not a hostile process of the same user,
     * and acquiring and releasing such a block leaves its count as it was.) */
    if (h.offset == block_h.offset && h.generation == block_h.generation)
        CHECK(p == block_mem && h.length <= FUZZ_SLOT_BLOCK);
    shoal_frame *f;
    uint32_t n, np;
    rc = shoal__msgblock_frames(p, h.length, &f, &n, &np);
    if (rc == 0) {
        CHECK(np <= n && n <= SHOAL_WIRE_MAX_FRAMES);
        const uint8_t *end = p + SHOAL__MSGBLOCK_HDR + 8 * (size_t)n;
        for (uint32_t i = 0; i < n; i++) {
            /* In order, one after the other, inside the block. */
            CHECK((const uint8_t *)f[i].data == end && f[i].len <= (uint64_t)(p + h.length - end));
            end += f[i].len;
        }
        shoal_msg_header hd = {.type = (uint16_t)kind, .n_payload = (uint16_t)np, .n_buffers = (uint16_t)(n - np)};
        uint8_t out[SHOAL_WIRE_HDR], key[SHOAL_WIRE_KEY];
        fuzz_key(key);
        CHECK(shoal_wire_encode(key, &hd, f, n, out) == 0);
        free(f);
    } else {
        CHECK(rc == -EBADMSG);
    }
    CHECK(shoal_arena_release(arena, h) == 0);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    size_t ring_part = size < FUZZ_SLOT_RING ? size : FUZZ_SLOT_RING;
    memset(ring_mem, 0, FUZZ_SLOT_RING);
    memcpy(ring_mem, data, ring_part);
    size_t block_part = size - ring_part;
    if (block_part > FUZZ_SLOT_BLOCK)
        block_part = FUZZ_SLOT_BLOCK;
    memset(block_mem, 0, FUZZ_SLOT_BLOCK);
    memcpy(block_mem, data + ring_part, block_part);

    shoal_ring r;
    if (shoal_ring_open(ring_mem, FUZZ_SLOT_RING, &r) < 0)
        return 0;
    CHECK(r.nslots >= 2 && shoal_ring_size(r.nslots) <= FUZZ_SLOT_RING);
    uint8_t slots[64 * SHOAL_RING_SLOT];
    if (shoal_ring_is_pool(&r)) {
        /* Two consumers taking in turn, and the producer's look at each. */
        for (uint32_t turn = 0; turn < 2 * FUZZ_SLOT_NSLOTS + 2; turn++) {
            uint64_t pos;
            int rc = shoal_pool_take(&r, turn % 2, slots, &pos);
            if (rc <= 0) {
                CHECK(rc == 0 || rc == -EPIPE || rc == -EUCLEAN);
                break;
            }
            CHECK(rc == 1);
            completion(slots);
            int64_t owner = shoal_pool_owner(&r, pos);
            CHECK(owner == turn % 2 || owner == SHOAL_POOL_GONE);
            (void)shoal_pool_withdraw(&r, pos);
            rc = shoal_pool_retire(&r, pos);
            CHECK(rc == 0 || rc == -EINVAL || rc == -EBUSY);
        }
        CHECK(shoal_ring_pop(&r, slots, 1) == -EPROTO);
    } else {
        for (int round = 0; round < 4; round++) {
            int k = shoal_ring_pop(&r, slots, 64);
            if (k <= 0) {
                CHECK(k == 0 || k == -EPIPE || k == -EUCLEAN);
                break;
            }
            CHECK((uint32_t)k <= r.nslots);
            for (int i = 0; i < k; i++)
                completion(slots + (size_t)i * SHOAL_RING_SLOT);
        }
        uint64_t pos;
        CHECK(shoal_pool_take(&r, 0, slots, &pos) == -EPROTO);
    }
    return 0;
}
