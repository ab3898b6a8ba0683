/*
 * shoal/wire.h - the wire protocol shared by controller, node agents and clients.
 *
 * A message is one ZeroMQ multipart message: a fixed 96-byte header frame,
 * then n_payload payload frames, then n_buffers buffer frames (for example
 * the out-of-band buffers of a pickle). The header is binary, versioned and
 * little-endian, and ends with an HMAC-SHA256 under the cluster key over the
 * header's first 64 bytes, every payload frame, and the length of every
 * buffer frame. Buffer bytes are not signed: HMAC-SHA256 runs at about
 * 0.46 GB/s here, which would dominate moving large arrays; between nodes,
 * CurveZMQ protects them. docs/protocol.md has the byte table.
 *
 * Decoding is total: any frames in give a message or a negative errno, never
 * a crash or a read past a frame. Everything here is pure computation on
 * caller memory: safe from any thread, no global state beyond libsodium's
 * one-time initialisation.
 */
#ifndef SHOAL_WIRE_H
#define SHOAL_WIRE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SHOAL_WIRE_MAGIC 0x50574853u /* "SHWP" little-endian */
#define SHOAL_WIRE_VERSION 2u
#define SHOAL_WIRE_HDR 96u     /* bytes of the header frame */
#define SHOAL_WIRE_SIGNED 64u  /* header bytes covered by the signature */
#define SHOAL_WIRE_MAC_PART 16u /* each of the two MACs: the header's, then the body's */
#define SHOAL_WIRE_KEY 32u     /* bytes of a cluster key */
#define SHOAL_WIRE_MAX_FRAMES 4096u /* payload + buffer frames in one message */
#define SHOAL_WIRE_TARGET_ALL 0xffffffffu

/* Message types. Values are part of the protocol: append, never renumber. */
enum shoal_msg_type {
    SHOAL_MSG_ERROR = 1,       /* an error reply; payload: UTF-8 text */
    SHOAL_MSG_HEARTBEAT = 2,
    SHOAL_MSG_HEARTBEAT_ACK = 3,
    SHOAL_MSG_REGISTER = 4,    /* an agent (or client) introduces itself */
    SHOAL_MSG_REGISTER_REPLY = 5,
    SHOAL_MSG_TASK = 6,        /* client -> controller -> agent */
    SHOAL_MSG_RESULT = 7,      /* engine -> agent -> controller -> client */
    SHOAL_MSG_OUTPUT = 8,      /* streamed stdout/stderr of a running task */
    SHOAL_MSG_QUERY = 9,       /* queue status, registry */
    SHOAL_MSG_QUERY_REPLY = 10,
    SHOAL_MSG_SHUTDOWN = 11,
    SHOAL_MSG_ENGINE_EVENT = 12, /* agent -> controller: an engine started or died */
    SHOAL_MSG_ABORT = 13,      /* client -> controller -> agent: tasks not to start */
    SHOAL_MSG_SIGNAL = 14,     /* client -> controller -> agent: signal engines */
    SHOAL_MSG__END             /* one past the last known type */
};

/* Flags of REGISTER messages: who registers. */
enum { SHOAL_REG_CLIENT = 1, SHOAL_REG_NODE = 2 };

/* Flags of TASK messages. SHOAL_TASK_BULK: the task's message block comes
 * over the bulk channel (docs/machines.md, "The bulk path"); the payload
 * frame after the targets is 16 bytes, the transfer id and the client's
 * token (u64 each, little-endian), and no other frames follow. */
enum { SHOAL_TASK_BULK = 1 };
#define SHOAL_TASK_BULK_INFO 16u

/* Flags of RESULT messages. SHOAL_RESULT_BULK: the reply's message block
 * comes to the client over its bulk connection to the engine's node
 * (docs/machines.md, "The bulk path"); the only frame is 16 bytes, the
 * transfer id and the block's length (u64 each, little-endian). */
enum { SHOAL_RESULT_BULK = 1 };
#define SHOAL_RESULT_BULK_INFO 16u

/* The decoded header. */
typedef struct shoal_msg_header {
    uint16_t type;      /* enum shoal_msg_type */
    uint16_t flags;     /* per type */
    uint16_t n_payload; /* payload frames that follow the header */
    uint16_t n_buffers; /* buffer frames that follow the payload frames */
    uint64_t msg_id;    /* the sender's number for this message */
    uint64_t task_id;   /* the task it concerns, 0 if none */
    uint32_t sender;    /* engine, node or client id of the sender */
    uint32_t target;    /* engine id it is for, or SHOAL_WIRE_TARGET_ALL */
    uint64_t reply_to;  /* msg_id this answers, 0 if none */
    uint64_t body_len;  /* bytes in all payload and buffer frames together */
    uint64_t stamp_ns;  /* sender's CLOCK_REALTIME when signed (shoal_wire_send
                         * and the others of zwire.h write it if it is 0) */
} shoal_msg_header;

/* A frame: bytes owned by the caller. */
typedef struct shoal_frame {
    const void *data;
    size_t len;
} shoal_frame;

/* Limits a receiver applies before it trusts a message. */
typedef struct shoal_wire_limits {
    uint64_t max_frame; /* bytes in one payload or buffer frame */
    uint64_t max_body;  /* bytes in all of them together */
    uint64_t max_payload; /* bytes in the payload frames together (the ones
                           * the MAC hashes); 0: only max_body bounds them */
    uint64_t max_skew_ns; /* shoal_wire_recv refuses an authentic message whose
                           * stamp_ns is further than this from the receiver's
                           * CLOCK_REALTIME, either way (-ESTALE); 0: no check */
} shoal_wire_limits;

/* Generous defaults: 4 GiB per frame and 16 GiB per message, payload
 * unbounded but by those, stamps unchecked. */
extern const shoal_wire_limits shoal_wire_default_limits;

/* Initialises libsodium once. Returns 0 or -EIO. Safe to call repeatedly and
 * from several threads; every other function here calls it. */
int shoal_wire_init(void);

/* Fills key with SHOAL_WIRE_KEY random bytes. Returns 0 or -EIO. */
int shoal_wire_keygen(uint8_t key[SHOAL_WIRE_KEY]);

/*
 * Writes the header frame for h and the frames that follow it into
 * out[SHOAL_WIRE_HDR], signature included. frames[0 .. n_payload) are the
 * payload frames and frames[n_payload .. n_payload + n_buffers) the buffers;
 * h->body_len is ignored and computed. Returns 0, or -EINVAL (a count above
 * SHOAL_WIRE_MAX_FRAMES, or nframes different from n_payload + n_buffers).
 */
int shoal_wire_encode(const uint8_t key[SHOAL_WIRE_KEY], const shoal_msg_header *h, const shoal_frame *frames,
                      size_t nframes, uint8_t out[SHOAL_WIRE_HDR]);

/*
 * Checks and decodes a received message: frames[0] is the header frame,
 * frames[1 ..] the rest. On success writes *h and returns 0. Otherwise it
 * returns
 *   -EBADMSG   malformed: wrong header size or magic, non-zero reserved
 *              bytes, frame counts or body_len that disagree with the frames;
 *   -EPROTO    another protocol version;
 *   -EMSGSIZE  a frame or the body over the limits (checked before the
 *              body is hashed, so an oversized message costs nothing to
 *              refuse), and its header not signed with key;
 *   -EFBIG     the same from a sender that holds the key: its header is
 *              authentic and in *h (so that the sender can be told which
 *              message was refused), its body unread;
 *   -EACCES    the signature does not match (wrong key, or altered).
 * limits may be NULL for the defaults.
 */
int shoal_wire_decode(const uint8_t key[SHOAL_WIRE_KEY], const shoal_frame *frames, size_t nframes,
                      const shoal_wire_limits *limits, shoal_msg_header *h);

/* A short English name for a decode error, for logs and error replies. */
const char *shoal_wire_strerror(int rc);

#ifdef __cplusplus
}
#endif

#endif /* SHOAL_WIRE_H */
