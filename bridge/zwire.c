/*
 * bridge/zwire.c - wire messages over ZeroMQ sockets.
 *
 * Receiving reads every part of a multipart message even when it already
 * knows the message is bad, so the next message starts where it should.
 * Parts beyond what a valid message can have are read and dropped at once,
 * so a flood of parts costs no memory.
 */
#include <shoal/zwire.h>

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static uint64_t realtime_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* h, stamped now unless the caller stamped it. */
static shoal_msg_header stamped(const shoal_msg_header *h)
{
    shoal_msg_header out = *h;
    if (!out.stamp_ns)
        out.stamp_ns = realtime_ns();
    return out;
}

/* Whether stamp is within max_skew_ns of our clock, either way: a message
 * from the future is as suspect as one from the past (and a host whose clock
 * runs ahead is the same error as one behind). */
static bool fresh(uint64_t stamp, uint64_t max_skew_ns)
{
    uint64_t now = realtime_ns();
    return max_skew_ns == 0 || (stamp <= now ? now - stamp : stamp - now) <= max_skew_ns;
}

/* Receives one part into msg; returns 0 or a negative errno. */
static int recv_part(void *sock, zmq_msg_t *msg, int flags)
{
    for (;;) {
        if (zmq_msg_recv(msg, sock, flags) >= 0)
            return 0;
        if (zmq_errno() != EINTR)
            return -zmq_errno();
    }
}

static bool more(void *sock)
{
    int more = 0;
    size_t len = sizeof more;
    return zmq_getsockopt(sock, ZMQ_RCVMORE, &more, &len) == 0 && more;
}

/* Reads and drops whatever is left of the current multipart message. */
static void drain(void *sock)
{
    while (more(sock)) {
        zmq_msg_t part;
        zmq_msg_init(&part);
        int rc = recv_part(sock, &part, 0);
        zmq_msg_close(&part);
        if (rc < 0)
            return;
    }
}

void shoal_wire_msg_close(shoal_wire_msg *m)
{
    if (m->has_route)
        zmq_msg_close(&m->route);
    for (size_t i = 0; i < m->nframes; i++)
        zmq_msg_close(&m->frames[i]);
    free(m->frames);
    memset(m, 0, sizeof *m);
}

static void count(shoal_wire_counters *c, int rc)
{
    if (!c)
        return;
    if (rc == 0)
        c->received++;
    else if (rc == -EMSGSIZE || rc == -EFBIG)
        c->oversized++;
    else if (rc == -EACCES)
        c->bad_signature++;
    else if (rc == -ESTALE)
        c->stale++;
    else
        c->malformed++;
}

int shoal_wire_recv(void *sock, const uint8_t key[SHOAL_WIRE_KEY], bool router, const shoal_wire_limits *limits,
                    int zmq_flags, shoal_wire_msg *m, shoal_wire_counters *counters)
{
    memset(m, 0, sizeof *m);
    int rc;
    zmq_msg_t first;
    zmq_msg_init(&first);
    if ((rc = recv_part(sock, &first, zmq_flags)) < 0) {
        zmq_msg_close(&first);
        return rc;
    }
    if (router) {
        m->route = first;
        m->has_route = true;
        if (!more(sock)) {
            count(counters, -EBADMSG);
            return -EBADMSG; /* an identity and nothing else */
        }
        zmq_msg_init(&first);
        if ((rc = recv_part(sock, &first, 0)) < 0) {
            zmq_msg_close(&first);
            return rc;
        }
    }
    /* first is the header frame; collect the rest, up to what one message
     * may hold (plus one, to notice too many). */
    size_t cap = 8, n = 0;
    zmq_msg_t *parts = malloc(cap * sizeof *parts);
    if (!parts) {
        zmq_msg_close(&first);
        drain(sock);
        return -ENOMEM;
    }
    parts[n++] = first;
    bool too_many = false;
    while (more(sock)) {
        if (n == SHOAL_WIRE_MAX_FRAMES + 1) {
            too_many = true;
            drain(sock);
            break;
        }
        if (n == cap) {
            zmq_msg_t *bigger = realloc(parts, 2 * cap * sizeof *parts);
            if (!bigger) {
                rc = -ENOMEM;
                drain(sock);
                goto fail;
            }
            parts = bigger;
            cap *= 2;
        }
        zmq_msg_init(&parts[n]);
        if ((rc = recv_part(sock, &parts[n], 0)) < 0) {
            zmq_msg_close(&parts[n]);
            goto fail;
        }
        n++;
    }
    if (too_many) {
        rc = -EBADMSG;
        count(counters, rc); /* refused like any malformed message, so counted like one */
        goto fail;
    }
    shoal_frame stack[16];
    shoal_frame *fr = n <= 16 ? stack : malloc(n * sizeof *fr);
    if (!fr) {
        rc = -ENOMEM;
        goto fail;
    }
    for (size_t i = 0; i < n; i++) {
        fr[i].data = zmq_msg_data(&parts[i]);
        fr[i].len = zmq_msg_size(&parts[i]);
    }
    rc = shoal_wire_decode(key, fr, n, limits, &m->hdr);
    if (fr != stack)
        free(fr);
    /* After the signature: only an authentic stamp says anything. */
    if (rc == 0 && limits && !fresh(m->hdr.stamp_ns, limits->max_skew_ns))
        rc = -ESTALE;
    count(counters, rc);
    if (rc < 0)
        goto fail;
    /* Keep the frames after the header. */
    zmq_msg_close(&parts[0]);
    memmove(parts, parts + 1, (n - 1) * sizeof *parts);
    m->frames = parts;
    m->nframes = n - 1;
    return 0;

fail:
    for (size_t i = 0; i < n; i++)
        zmq_msg_close(&parts[i]);
    free(parts);
    return rc;
}

static int send_part(void *sock, const void *data, size_t len, int flags)
{
    for (;;) {
        if (zmq_send(sock, data, len, flags) >= 0)
            return 0;
        if (zmq_errno() != EINTR)
            return -zmq_errno();
    }
}

int shoal_wire_send(void *sock, const uint8_t key[SHOAL_WIRE_KEY], const shoal_frame *route,
                    const shoal_msg_header *h, const shoal_frame *frames, size_t nframes)
{
    uint8_t hdr[SHOAL_WIRE_HDR];
    shoal_msg_header sh = stamped(h);
    int rc = shoal_wire_encode(key, &sh, frames, nframes, hdr);
    if (rc < 0)
        return rc;
    if (route && (rc = send_part(sock, route->data, route->len, ZMQ_SNDMORE)) < 0)
        return rc;
    if ((rc = send_part(sock, hdr, sizeof hdr, nframes ? ZMQ_SNDMORE : 0)) < 0)
        return rc;
    for (size_t i = 0; i < nframes; i++)
        if ((rc = send_part(sock, frames[i].data, frames[i].len, i + 1 < nframes ? ZMQ_SNDMORE : 0)) < 0)
            return rc;
    return 0;
}

int shoal_wire_sign(const uint8_t key[SHOAL_WIRE_KEY], const shoal_msg_header *h, const shoal_frame *new_frames,
                    size_t n_new, zmq_msg_t *msgs, size_t n_msgs, uint8_t hdr[SHOAL_WIRE_HDR])
{
    size_t n = n_new + n_msgs;
    if (n > SHOAL_WIRE_MAX_FRAMES)
        return -EINVAL;
    shoal_frame stack[16];
    shoal_frame *all = n <= 16 ? stack : malloc(n * sizeof *all);
    if (!all)
        return -ENOMEM;
    for (size_t i = 0; i < n_new; i++)
        all[i] = new_frames[i];
    for (size_t i = 0; i < n_msgs; i++)
        all[n_new + i] = (shoal_frame){zmq_msg_data(&msgs[i]), zmq_msg_size(&msgs[i])};
    shoal_msg_header sh = stamped(h);
    int rc = shoal_wire_encode(key, &sh, all, n, hdr);
    if (all != stack)
        free(all);
    return rc;
}

int shoal_wire_forward(void *sock, const uint8_t key[SHOAL_WIRE_KEY], const shoal_frame *route,
                       const shoal_msg_header *h, const shoal_frame *new_frames, size_t n_new, zmq_msg_t *msgs,
                       size_t n_msgs)
{
    uint8_t hdr[SHOAL_WIRE_HDR];
    int rc = shoal_wire_sign(key, h, new_frames, n_new, msgs, n_msgs, hdr);
    if (rc < 0)
        return rc;
    return shoal_wire_send_signed(sock, route, hdr, new_frames, n_new, msgs, n_msgs);
}

int shoal_wire_send_signed(void *sock, const shoal_frame *route, const uint8_t hdr[SHOAL_WIRE_HDR],
                           const shoal_frame *new_frames, size_t n_new, zmq_msg_t *msgs, size_t n_msgs)
{
    size_t n = n_new + n_msgs;
    int rc;
    if (route && (rc = send_part(sock, route->data, route->len, ZMQ_SNDMORE)) < 0)
        return rc;
    if ((rc = send_part(sock, hdr, SHOAL_WIRE_HDR, n ? ZMQ_SNDMORE : 0)) < 0)
        return rc;
    for (size_t i = 0; i < n_new; i++)
        if ((rc = send_part(sock, new_frames[i].data, new_frames[i].len, i + 1 < n ? ZMQ_SNDMORE : 0)) < 0)
            return rc;
    for (size_t i = 0; i < n_msgs; i++) {
        zmq_msg_t out;
        zmq_msg_init(&out);
        zmq_msg_copy(&out, &msgs[i]);
        int more = n_new + i + 1 < n ? ZMQ_SNDMORE : 0;
        while (zmq_msg_send(&out, sock, more) < 0) {
            if (zmq_errno() != EINTR) {
                rc = -zmq_errno();
                zmq_msg_close(&out);
                return rc;
            }
        }
    }
    return 0;
}

int shoal_wire_engine_error_meta(uint32_t engine, const char *evalue, char *out, size_t len)
{
    /* evalue as a JSON string: quotes, backslashes and control bytes escaped. */
    char esc[512];
    size_t k = 0;
    for (const char *p = evalue; *p && k < sizeof esc - 8; p++) {
        unsigned char ch = (unsigned char)*p;
        if (ch == '"' || ch == '\\') {
            esc[k++] = '\\';
            esc[k++] = (char)ch;
        } else if (ch < 0x20) {
            k += (size_t)snprintf(esc + k, sizeof esc - k, "\\u%04x", ch);
        } else {
            esc[k++] = (char)ch;
        }
    }
    esc[k] = '\0';
    int n = snprintf(out, len,
                     "{\"status\":\"error\",\"engine_id\":%u,\"ename\":\"EngineError\",\"evalue\":\"%s\","
                     "\"traceback\":[],\"stdout\":\"\",\"stderr\":\"\"}",
                     engine, esc);
    if (n < 0 || (size_t)n >= len)
        return -EINVAL;
    return n;
}

int shoal_wire_send_engine_error(void *sock, const uint8_t key[SHOAL_WIRE_KEY], const shoal_frame *route,
                                 const shoal_msg_header *h, uint32_t engine, const char *evalue)
{
    char meta[SHOAL_WIRE_ENGINE_ERROR_MAX];
    int n = shoal_wire_engine_error_meta(engine, evalue, meta, sizeof meta);
    if (n < 0)
        return n;
    shoal_frame f[2] = {{meta, (size_t)n}, {"", 0}};
    shoal_msg_header out = {.type = SHOAL_MSG_RESULT, .n_payload = 2, .msg_id = h->msg_id,
                            .task_id = h->task_id, .sender = engine, .target = engine, .reply_to = h->reply_to};
    return shoal_wire_send(sock, key, route, &out, f, 2);
}
