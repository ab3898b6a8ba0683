/*
 * tests/fuzz/fuzz.h - what the fuzz targets and the seed generator
 * (make_corpus.c) agree on: the fixed cluster key, and how the wire target
 * cuts its input into ZeroMQ parts. docs/fuzzing.md describes every target's
 * input.
 */
#ifndef SHOAL_FUZZ_H
#define SHOAL_FUZZ_H

#include <stddef.h>
#include <stdint.h>

/* The cluster key the wire target checks MACs with: bytes 0, 1, ..., 31. */
static inline void fuzz_key(uint8_t key[32])
{
    for (int i = 0; i < 32; i++)
        key[i] = (uint8_t)i;
}

/* Wire target: its first input byte is a set of these flags; the parts
 * follow, each a 2-byte little-endian length and its bytes (a length longer
 * than what is left takes what is left). */
enum {
    FUZZ_WIRE_ROUTER = 1,   /* the first part is a routing identity */
    FUZZ_WIRE_TIGHT = 2,    /* receive with small limits (FUZZ_WIRE_MAX_FRAME, FUZZ_WIRE_MAX_BODY) */
    FUZZ_WIRE_FLOOD = 4,    /* append FUZZ_WIRE_FLOOD_PARTS empty parts */
};
#define FUZZ_WIRE_MAX_FRAME 256u
#define FUZZ_WIRE_MAX_BODY 1024u
#define FUZZ_WIRE_FLOOD_PARTS 4100u
#define FUZZ_WIRE_MAX_PARTS 8192u

/* Slot target: the ring image at the start of the input (a ring or pool of
 * up to FUZZ_SLOT_NSLOTS slots), then the bytes of the message block that
 * slots name. Slot handles are relative: offset and generation are added to
 * those of the target's block, so that 0, 0 names it. */
#define FUZZ_SLOT_NSLOTS 4u
#define FUZZ_SLOT_RING (256u + 64u * FUZZ_SLOT_NSLOTS)
#define FUZZ_SLOT_BLOCK 65536u

/* Ring slot fields (docs/engine.md, "Ring slots"). */
enum { SLOT_TASK_ID = 0, SLOT_KIND = 8, SLOT_FLAGS = 12, SLOT_OFFSET = 16, SLOT_LENGTH = 24, SLOT_GENERATION = 32 };
enum { KIND_RESULT = 3, KIND_OUTPUT = 5 };

/* Request target: the agent's line buffer (struct peer in node_agent/agent.c). */
#define FUZZ_REQUEST_LINE 512u

/* Xfer target: its first input byte is a set of these flags; records
 * follow, each 32 bytes of clear header, a 2-byte little-endian payload
 * length and the payload (fuzz_xfer.c). */
enum {
    FUZZ_XFER_ENCRYPT = 1, /* an encrypted connection (ChaCha20-Poly1305); else plain */
    FUZZ_XFER_REFUSE = 2,  /* the accept callback refuses every transfer */
    FUZZ_XFER_DISCARD = 4, /* it accepts with no memory (the records go nowhere) */
    FUZZ_XFER_HEADERS = 8, /* read header by header, not by transfer */
    FUZZ_XFER_RAW_SEQ = 16, /* keep the input's sequence numbers (else the right ones) */
};
#define FUZZ_XFER_MAX_TOTAL (1u << 20) /* the largest transfer given memory */

#endif /* SHOAL_FUZZ_H */
