/*
 * tests/fuzz/fuzz_wire.c - the receive side of the wire protocol
 * (bridge/zwire.c shoal_wire_recv, bridge/wire.c shoal_wire_decode).
 *
 * The input is cut into parts (fuzz.h) and sent as one multipart message
 * over an inproc ZeroMQ pair; shoal_wire_recv takes it off the socket as a
 * controller or agent would, with the MAC checked under a fixed key. Then:
 * whatever it said, shoal_wire_decode on the same frames must agree; a
 * counter must have moved; an accepted message must hold exactly the frames
 * its header counts, and encoding its header again over those frames must
 * give the header frame back byte for byte. Any disagreement aborts.
 */
#include "fuzz.h"

#include <shoal/zwire.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void *ctx, *tx, *rx;
static uint8_t key[SHOAL_WIRE_KEY];

#define CHECK(cond)                                                                                              \
    do {                                                                                                         \
        if (!(cond)) {                                                                                           \
            fprintf(stderr, "fuzz_wire: %s:%d: %s\n", __FILE__, __LINE__, #cond);                              \
            abort();                                                                                             \
        }                                                                                                        \
    } while (0)

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    fuzz_key(key);
    ctx = zmq_ctx_new();
    tx = zmq_socket(ctx, ZMQ_PAIR);
    rx = zmq_socket(ctx, ZMQ_PAIR);
    /* No high-water marks: one thread sends a whole message before it
     * receives, so a full pipe would block it for ever. */
    int zero = 0;
    zmq_setsockopt(tx, ZMQ_SNDHWM, &zero, sizeof zero);
    zmq_setsockopt(rx, ZMQ_RCVHWM, &zero, sizeof zero);
    if (!ctx || !tx || !rx || zmq_bind(rx, "inproc://fuzz-wire") < 0 || zmq_connect(tx, "inproc://fuzz-wire") < 0) {
        fprintf(stderr, "fuzz_wire: cannot set up ZeroMQ: %s\n", zmq_strerror(zmq_errno()));
        abort();
    }
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    uint8_t flags = data[0];
    data++;
    size--;
    static shoal_frame parts[FUZZ_WIRE_MAX_PARTS + FUZZ_WIRE_FLOOD_PARTS];
    size_t n = 0;
    while (size > 0 && n < FUZZ_WIRE_MAX_PARTS) {
        size_t len = data[0] | (size > 1 ? (size_t)data[1] << 8 : 0);
        size_t skip = size > 1 ? 2 : 1;
        if (len > size - skip)
            len = size - skip;
        parts[n++] = (shoal_frame){data + skip, len};
        data += skip + len;
        size -= skip + len;
    }
    if (flags & FUZZ_WIRE_FLOOD)
        for (size_t i = 0; i < FUZZ_WIRE_FLOOD_PARTS; i++)
            parts[n++] = (shoal_frame){"", 0};
    if (n == 0)
        parts[n++] = (shoal_frame){"", 0}; /* ZeroMQ has no message of no parts */

    for (size_t i = 0; i < n; i++)
        CHECK(zmq_send(tx, parts[i].data, parts[i].len, i + 1 < n ? ZMQ_SNDMORE : 0) >= 0);

    bool router = flags & FUZZ_WIRE_ROUTER;
    shoal_wire_limits tight = {FUZZ_WIRE_MAX_FRAME, FUZZ_WIRE_MAX_BODY};
    const shoal_wire_limits *limits = flags & FUZZ_WIRE_TIGHT ? &tight : NULL;
    shoal_wire_counters c = {0};
    shoal_wire_msg m;
    int rc = shoal_wire_recv(rx, key, router, limits, 0, &m, &c);
    CHECK(rc == 0 || rc == -EBADMSG || rc == -EPROTO || rc == -EMSGSIZE || rc == -EFBIG || rc == -EACCES);
    CHECK(c.received + c.malformed + c.oversized + c.bad_signature == 1);
    CHECK(m.has_route == router);
    /* The whole message was taken: nothing is left for the next one. */
    zmq_msg_t left;
    zmq_msg_init(&left);
    CHECK(zmq_msg_recv(&left, rx, ZMQ_DONTWAIT) < 0 && zmq_errno() == EAGAIN);
    zmq_msg_close(&left);

    /* The frames the decoder saw: the parts after the identity, if any. */
    const shoal_frame *frames = parts + (router ? 1 : 0);
    size_t nframes = n - (router ? 1 : 0);
    if (router && n == 1)
        CHECK(rc == -EBADMSG); /* an identity and nothing else */
    else if (nframes <= SHOAL_WIRE_MAX_FRAMES + 1) {
        shoal_msg_header h;
        CHECK(shoal_wire_decode(key, frames, nframes, limits, &h) == rc);
    } else {
        CHECK(rc == -EBADMSG); /* more parts than any message has */
    }

    if (rc == 0) {
        CHECK(m.nframes == nframes - 1);
        CHECK((size_t)m.hdr.n_payload + m.hdr.n_buffers == m.nframes);
        uint64_t body = 0;
        shoal_frame *got = malloc((m.nframes ? m.nframes : 1) * sizeof *got);
        CHECK(got);
        for (size_t i = 0; i < m.nframes; i++) {
            got[i] = shoal_wire_frame(&m, i);
            CHECK(got[i].len == frames[i + 1].len);
            CHECK(got[i].len == 0 || !memcmp(got[i].data, frames[i + 1].data, got[i].len));
            body += got[i].len;
        }
        CHECK(body == m.hdr.body_len);
        uint8_t again[SHOAL_WIRE_HDR];
        CHECK(shoal_wire_encode(key, &m.hdr, got, m.nframes, again) == 0);
        CHECK(!memcmp(again, frames[0].data, SHOAL_WIRE_HDR));
        free(got);
    }
    shoal_wire_msg_close(&m);
    return 0;
}
