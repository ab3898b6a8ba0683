/*
 * shoal/zwire.h - sending and receiving wire messages on ZeroMQ sockets.
 *
 * The receive side always takes a whole multipart message off the socket,
 * whatever is wrong with it, so that one bad message never desynchronises the
 * stream; what it refuses it reports as a negative errno (see
 * shoal_wire_decode) and keeps the sender's routing identity, so that the
 * caller can tell the sender. Functions on one socket are as thread-safe as
 * the socket: use each socket from one thread.
 */
#ifndef SHOAL_ZWIRE_H
#define SHOAL_ZWIRE_H

#include <shoal/wire.h>

#include <stdbool.h>
#include <zmq.h>

#ifdef __cplusplus
extern "C" {
#endif

/* A received message. Frames stay in ZeroMQ's memory until closed. */
typedef struct shoal_wire_msg {
    zmq_msg_t route;     /* the sender's identity (ROUTER sockets) */
    bool has_route;
    shoal_msg_header hdr; /* valid when receive returned 0 */
    size_t nframes;      /* payload + buffer frames kept */
    zmq_msg_t *frames;   /* frames[0 .. n_payload) payload, then buffers */
} shoal_wire_msg;

/* Counters a receiver keeps of what it refused. */
typedef struct shoal_wire_counters {
    uint64_t received;
    uint64_t malformed; /* -EBADMSG and -EPROTO */
    uint64_t oversized; /* -EMSGSIZE, -EFBIG */
    uint64_t bad_signature; /* -EACCES */
    uint64_t stale; /* -ESTALE: authentic, stamped too far from our clock */
} shoal_wire_counters;

/*
 * Receives one whole multipart message from sock. router: the socket is a
 * ROUTER, so the first part is the sender's identity. zmq_flags: 0 to block,
 * ZMQ_DONTWAIT not to. On success returns 0 and *m holds the message; the
 * caller must shoal_wire_msg_close it. On refusal returns the decode error,
 * counts it in counters (may be NULL), and *m holds only the route (close it
 * too) and, for -EFBIG, the header. With limits->max_skew_ns set, a message
 * that passes every check of shoal_wire_decode but whose stamp_ns is further
 * than that from this host's CLOCK_REALTIME is refused as -ESTALE (a replay,
 * or a sender whose clock is off), its header in m->hdr as for -EFBIG.
 * Returns -EAGAIN when nothing is waiting (ZMQ_DONTWAIT), or another
 * negative errno from ZeroMQ (-ETERM when the context is ending).
 */
int shoal_wire_recv(void *sock, const uint8_t key[SHOAL_WIRE_KEY], bool router, const shoal_wire_limits *limits,
                    int zmq_flags, shoal_wire_msg *m, shoal_wire_counters *counters);

/* Releases what shoal_wire_recv left in m. Accepts a zeroed m. */
void shoal_wire_msg_close(shoal_wire_msg *m);

/* The bytes of received frame i. */
static inline shoal_frame shoal_wire_frame(shoal_wire_msg *m, size_t i)
{
    shoal_frame f = {zmq_msg_data(&m->frames[i]), zmq_msg_size(&m->frames[i])};
    return f;
}

/*
 * Signs and sends one message: route (the peer's identity on a ROUTER
 * socket; NULL otherwise), the header, then frames. The frames are copied
 * into ZeroMQ. A header whose stamp_ns is 0 is stamped with CLOCK_REALTIME
 * now (so do shoal_wire_forward and shoal_wire_sign): the receiver's
 * freshness check reads it. Returns 0 or a negative errno (-EINVAL for bad
 * counts, or ZeroMQ's, e.g. -EHOSTUNREACH for an unknown route with
 * ZMQ_ROUTER_MANDATORY).
 */
int shoal_wire_send(void *sock, const uint8_t key[SHOAL_WIRE_KEY], const shoal_frame *route,
                    const shoal_msg_header *h, const shoal_frame *frames, size_t nframes);

/*
 * Like shoal_wire_send, for passing a message on: the frames are n_new
 * frames of the caller's, then n_msgs received ZeroMQ messages, which go out
 * without their bytes being copied (ZeroMQ shares them by reference; the
 * caller keeps its own). h's counts cover all of them. Returns as
 * shoal_wire_send.
 */
int shoal_wire_forward(void *sock, const uint8_t key[SHOAL_WIRE_KEY], const shoal_frame *route,
                       const shoal_msg_header *h, const shoal_frame *new_frames, size_t n_new, zmq_msg_t *msgs,
                       size_t n_msgs);

/*
 * shoal_wire_forward in two steps, for a message that may wait in a queue
 * and be tried again: shoal_wire_sign writes its header frame (the HMACs
 * over the frames: the costly part, done once; the stamp is of that moment),
 * shoal_wire_send_signed sends it with the same frames. Both return as
 * shoal_wire_send.
 */
int shoal_wire_sign(const uint8_t key[SHOAL_WIRE_KEY], const shoal_msg_header *h, const shoal_frame *new_frames,
                    size_t n_new, zmq_msg_t *msgs, size_t n_msgs, uint8_t hdr[SHOAL_WIRE_HDR]);
int shoal_wire_send_signed(void *sock, const shoal_frame *route, const uint8_t hdr[SHOAL_WIRE_HDR],
                           const shoal_frame *new_frames, size_t n_new, zmq_msg_t *msgs, size_t n_msgs);

/*
 * Sends the RESULT that says engine `engine` could not run a task: an
 * EngineError whose message is evalue, in the reply format of
 * docs/engine.md (payload 0 the JSON meta, payload 1 an empty pickle).
 * msg_id, task_id and reply_to come from h; the rest is set here. The
 * controller and the agent both answer this way for engines that died or
 * are not running. Returns as shoal_wire_send.
 */
int shoal_wire_send_engine_error(void *sock, const uint8_t key[SHOAL_WIRE_KEY], const shoal_frame *route,
                                 const shoal_msg_header *h, uint32_t engine, const char *evalue);

/*
 * Writes the JSON meta (payload 0) of such an EngineError RESULT into
 * out[len]; payload 1 is an empty pickle. Returns its length, or -EINVAL if
 * it does not fit (SHOAL_WIRE_ENGINE_ERROR_MAX always does). For a caller
 * that queues the message instead of sending it at once.
 */
#define SHOAL_WIRE_ENGINE_ERROR_MAX 768
int shoal_wire_engine_error_meta(uint32_t engine, const char *evalue, char *out, size_t len);

#ifdef __cplusplus
}
#endif

#endif /* SHOAL_ZWIRE_H */
