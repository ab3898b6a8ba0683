/*
 * bridge/curve.c - CurveZMQ keys, ZAP and handshake events, shared by the
 * controller, the agent and the Python extension.
 *
 * Key text is read here, with an error for each way it can be wrong, so
 * that a bad connection file is a sentence naming the field, never a crash
 * or a socket that silently never connects. Z85 is decoded by hand rather
 * than by zmq_z85_decode, which says only "NULL" whatever went wrong.
 */
#include <shoal/curve.h>
#include <shoal/wire.h>

#include <errno.h>
#include <sodium.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <zmq.h>

static const char z85_chars[] =
    "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#";

int shoal_curve_available(void)
{
    return zmq_has("curve") ? 1 : 0;
}

void shoal_curve_z85_encode(const uint8_t key[SHOAL_CURVE_KEY], char out[SHOAL_CURVE_Z85 + 1])
{
    size_t k = 0;
    for (size_t i = 0; i < SHOAL_CURVE_KEY; i += 4) {
        uint32_t v = (uint32_t)key[i] << 24 | (uint32_t)key[i + 1] << 16 | (uint32_t)key[i + 2] << 8 | key[i + 3];
        for (int d = 4; d >= 0; d--) {
            out[k + (size_t)d] = z85_chars[v % 85];
            v /= 85;
        }
        k += 5;
    }
    out[SHOAL_CURVE_Z85] = '\0';
}

int shoal_curve_z85_decode(const char *text, uint8_t key[SHOAL_CURVE_KEY])
{
    if (!text)
        return -ENOENT;
    if (strnlen(text, SHOAL_CURVE_Z85 + 1) != SHOAL_CURVE_Z85)
        return -EINVAL;
    uint8_t out[SHOAL_CURVE_KEY];
    for (size_t g = 0; g < SHOAL_CURVE_Z85 / 5; g++) {
        uint64_t v = 0;
        for (size_t d = 0; d < 5; d++) {
            char ch = text[5 * g + d];
            const char *at = ch ? strchr(z85_chars, ch) : NULL;
            if (!at)
                return -EILSEQ;
            v = v * 85 + (uint64_t)(at - z85_chars);
        }
        if (v > UINT32_MAX)
            return -ERANGE;
        out[4 * g] = (uint8_t)(v >> 24);
        out[4 * g + 1] = (uint8_t)(v >> 16);
        out[4 * g + 2] = (uint8_t)(v >> 8);
        out[4 * g + 3] = (uint8_t)v;
    }
    memcpy(key, out, sizeof out);
    sodium_memzero(out, sizeof out);
    return 0;
}

int shoal_curve_keypair(uint8_t public_key[SHOAL_CURVE_KEY], uint8_t secret_key[SHOAL_CURVE_KEY])
{
    char pub[SHOAL_CURVE_Z85 + 1], sec[SHOAL_CURVE_Z85 + 1];
    if (zmq_curve_keypair(pub, sec) < 0)
        return zmq_errno() == ENOTSUP ? -ENOTSUP : -EIO;
    uint8_t p[SHOAL_CURVE_KEY], s[SHOAL_CURVE_KEY];
    int rc = shoal_curve_z85_decode(pub, p);
    if (rc == 0)
        rc = shoal_curve_z85_decode(sec, s);
    if (rc == 0) {
        memcpy(public_key, p, sizeof p);
        memcpy(secret_key, s, sizeof s);
    }
    sodium_memzero(sec, sizeof sec);
    sodium_memzero(s, sizeof s);
    return rc < 0 ? -EIO : 0;
}

int shoal_curve_member_parse(const char *server_key, const char *public_key, const char *secret_key,
                             shoal_curve_member *out, const char **field)
{
    shoal_curve_member k;
    const char *bad = "server_key";
    if (shoal_wire_init() < 0) { /* libsodium, for the check below */
        if (field)
            *field = "secret_key";
        return -EIO;
    }
    int rc = shoal_curve_z85_decode(server_key, k.server_key);
    if (rc == 0 && (rc = shoal_curve_z85_decode(public_key, k.public_key)) < 0)
        bad = "public_key";
    if (rc == 0 && (rc = shoal_curve_z85_decode(secret_key, k.secret_key)) < 0)
        bad = "secret_key";
    if (rc == 0) {
        /* A Curve25519 public key is the base point times the secret one:
         * what zmq_curve_public computes. A pair that does not match would
         * fail at every handshake, unexplained; say it here. */
        uint8_t derived[SHOAL_CURVE_KEY];
        if (crypto_scalarmult_base(derived, k.secret_key) != 0 ||
            sodium_memcmp(derived, k.public_key, sizeof derived) != 0) {
            rc = -EKEYREJECTED;
            bad = "public_key";
        }
    }
    if (rc == 0)
        *out = k;
    else if (field)
        *field = bad;
    sodium_memzero(&k, sizeof k);
    return rc;
}

const char *shoal_curve_strerror(int rc)
{
    switch (rc) {
    case 0:
        return "is a good key";
    case -ENOENT:
        return "is missing (a Z85 string of 40 characters is wanted)";
    case -EINVAL:
        return "is not 40 characters long (a Z85 key is)";
    case -EILSEQ:
        return "has a character that is not Z85's";
    case -ERANGE:
        return "is not Z85 text (a group of five characters is past 32 bits)";
    case -EKEYREJECTED:
        return "is not the public half of secret_key";
    case -ENOTSUP:
        return "cannot be used: this libzmq was built without CURVE";
    case -EIO:
        return "cannot be checked: libsodium did not initialise";
    default:
        return "is not usable";
    }
}

static int set(void *sock, int opt, const void *v, size_t len)
{
    return zmq_setsockopt(sock, opt, v, len) < 0 ? -zmq_errno() : 0;
}

int shoal_curve_client(void *sock, const shoal_curve_member *k)
{
    int rc;
    if ((rc = set(sock, ZMQ_CURVE_SERVERKEY, k->server_key, SHOAL_CURVE_KEY)) < 0 ||
        (rc = set(sock, ZMQ_CURVE_PUBLICKEY, k->public_key, SHOAL_CURVE_KEY)) < 0 ||
        (rc = set(sock, ZMQ_CURVE_SECRETKEY, k->secret_key, SHOAL_CURVE_KEY)) < 0)
        return rc;
    return 0;
}

int shoal_curve_server(void *sock, const uint8_t secret_key[SHOAL_CURVE_KEY], const char *zap_domain)
{
    int one = 1, rc;
    if ((rc = set(sock, ZMQ_CURVE_SERVER, &one, sizeof one)) < 0 ||
        (rc = set(sock, ZMQ_CURVE_SECRETKEY, secret_key, SHOAL_CURVE_KEY)) < 0 ||
        (rc = set(sock, ZMQ_ZAP_DOMAIN, zap_domain, strlen(zap_domain))) < 0)
        return rc;
    return 0;
}

int shoal_curve_zap_bind(void *ctx, void **zap)
{
    void *s = zmq_socket(ctx, ZMQ_REP);
    if (!s)
        return -zmq_errno();
    int zero = 0;
    zmq_setsockopt(s, ZMQ_LINGER, &zero, sizeof zero);
    if (zmq_bind(s, "inproc://zeromq.zap.01") < 0) {
        int rc = -zmq_errno();
        zmq_close(s);
        return rc;
    }
    *zap = s;
    return 0;
}

/* Copies a frame's bytes as a NUL-terminated string, cut to fit. */
static void frame_text(zmq_msg_t *f, char *out, size_t len)
{
    size_t n = zmq_msg_size(f) < len - 1 ? zmq_msg_size(f) : len - 1;
    memcpy(out, zmq_msg_data(f), n);
    out[n] = '\0';
    for (size_t i = 0; i < n; i++) /* it goes into log lines */
        if ((unsigned char)out[i] < 0x20 || (unsigned char)out[i] > 0x7e)
            out[i] = '?';
}

static int frame_is(zmq_msg_t *f, const char *s)
{
    return zmq_msg_size(f) == strlen(s) && !memcmp(zmq_msg_data(f), s, strlen(s));
}

int shoal_curve_zap_serve(void *zap, const uint8_t member_public[SHOAL_CURVE_KEY], shoal_curve_zap_request *req)
{
    /* RFC 27: version, request id, domain, address, identity, mechanism,
     * then the mechanism's credentials (CURVE: the client's public key).
     * More parts than that are read and dropped. */
    enum { VERSION, REQUEST_ID, DOMAIN, ADDRESS, IDENTITY, MECHANISM, CREDENTIAL, NPARTS };
    zmq_msg_t part[NPARTS];
    size_t n = 0;
    int more = 1, rc = 0;
    memset(req, 0, sizeof *req);
    while (more) {
        zmq_msg_t m;
        zmq_msg_init(&m);
        if (zmq_msg_recv(&m, zap, n == 0 ? ZMQ_DONTWAIT : 0) < 0) {
            rc = zmq_errno();
            zmq_msg_close(&m);
            if (rc == EINTR && n == 0)
                continue;
            rc = rc == EAGAIN && n == 0 ? 0 : -rc;
            goto out;
        }
        more = zmq_msg_more(&m);
        if (n < NPARTS)
            part[n++] = m;
        else
            zmq_msg_close(&m);
    }
    int ok = n == NPARTS && frame_is(&part[VERSION], "1.0") && frame_is(&part[MECHANISM], "CURVE") &&
             zmq_msg_size(&part[CREDENTIAL]) == SHOAL_CURVE_KEY &&
             sodium_memcmp(zmq_msg_data(&part[CREDENTIAL]), member_public, SHOAL_CURVE_KEY) == 0;
    if (n > DOMAIN)
        frame_text(&part[DOMAIN], req->domain, sizeof req->domain);
    if (n > ADDRESS)
        frame_text(&part[ADDRESS], req->address, sizeof req->address);
    if (n > MECHANISM)
        frame_text(&part[MECHANISM], req->mechanism, sizeof req->mechanism);
    req->admitted = ok;
    /* The reply: version, the request's id, status code and text, user id,
     * metadata (none). A REP socket must answer before it may read again,
     * so a malformed request is answered too. */
    const char *status = ok ? "200" : "400", *text = ok ? "OK" : "not a member of this cluster";
    const void *id = n > REQUEST_ID ? zmq_msg_data(&part[REQUEST_ID]) : "";
    size_t idlen = n > REQUEST_ID ? zmq_msg_size(&part[REQUEST_ID]) : 0;
    const struct {
        const void *p;
        size_t len;
    } reply[] = {{"1.0", 3}, {id, idlen}, {status, 3}, {text, strlen(text)}, {ok ? "member" : "", ok ? 6u : 0u},
                 {"", 0}};
    for (size_t i = 0; i < sizeof reply / sizeof reply[0]; i++) {
        int flags = ZMQ_DONTWAIT | (i + 1 < sizeof reply / sizeof reply[0] ? ZMQ_SNDMORE : 0);
        while (zmq_send(zap, reply[i].p, reply[i].len, flags) < 0) {
            if (zmq_errno() != EINTR) {
                rc = -zmq_errno();
                goto out;
            }
        }
    }
    rc = 1;
out:
    for (size_t i = 0; i < n; i++)
        zmq_msg_close(&part[i]);
    return rc;
}

int shoal_curve_monitor(void *ctx, void *sock, void **monitor)
{
    /* Monitors live in ctx's inproc namespace: a name of our own each. */
    static atomic_uint serial;
    char ep[96];
    snprintf(ep, sizeof ep, "inproc://shoal-monitor-%p-%u", sock, atomic_fetch_add(&serial, 1));
    int events = ZMQ_EVENT_HANDSHAKE_SUCCEEDED | ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL |
                 ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL | ZMQ_EVENT_HANDSHAKE_FAILED_AUTH;
    if (zmq_socket_monitor(sock, ep, events) < 0)
        return -zmq_errno();
    int rc;
    void *m = zmq_socket(ctx, ZMQ_PAIR);
    if (!m)
        goto fail_socket;
    int zero = 0;
    zmq_setsockopt(m, ZMQ_LINGER, &zero, sizeof zero);
    /* libzmq 4.3 sends monitor events from its I/O thread with a blocking
     * send: once a pipe of events nobody reads is full (a socket whose
     * handshakes fail ten times a second, unread for a few minutes), that
     * thread stops, and with it every socket of the context. A receive
     * limit of 0 makes the inproc pipe unbounded (its limit is the sum of
     * both sides' only when both have one): unread events cost memory, a
     * few dozen bytes each, never a stalled context. */
    zmq_setsockopt(m, ZMQ_RCVHWM, &zero, sizeof zero);
    if (zmq_connect(m, ep) < 0)
        goto fail_connect;
    *monitor = m;
    return 0;

fail_connect:
    rc = -zmq_errno();
    zmq_close(m);
    zmq_socket_monitor(sock, NULL, 0);
    return rc;
fail_socket:
    rc = -zmq_errno();
    zmq_socket_monitor(sock, NULL, 0);
    return rc;
}

int shoal_curve_monitor_read(void *monitor, shoal_curve_event *ev)
{
    /* Two parts: 6 bytes (the event, u16; its value, u32; host order),
     * then the endpoint. */
    zmq_msg_t first, second;
    zmq_msg_init(&first);
    for (;;) {
        if (zmq_msg_recv(&first, monitor, ZMQ_DONTWAIT) >= 0)
            break;
        int e = zmq_errno();
        if (e != EINTR) {
            zmq_msg_close(&first);
            return e == EAGAIN ? 0 : -e;
        }
    }
    int more = zmq_msg_more(&first);
    memset(ev, 0, sizeof *ev);
    if (zmq_msg_size(&first) >= 6) {
        uint16_t event;
        memcpy(&event, zmq_msg_data(&first), 2);
        memcpy(&ev->value, (uint8_t *)zmq_msg_data(&first) + 2, 4);
        ev->event = event;
    }
    zmq_msg_close(&first);
    while (more) {
        zmq_msg_init(&second);
        if (zmq_msg_recv(&second, monitor, 0) < 0) {
            zmq_msg_close(&second);
            if (zmq_errno() == EINTR)
                continue;
            break;
        }
        if (!ev->endpoint[0])
            frame_text(&second, ev->endpoint, sizeof ev->endpoint);
        more = zmq_msg_more(&second);
        zmq_msg_close(&second);
    }
    return 1;
}

int shoal_curve_event_fatal(const shoal_curve_event *ev, char *why, size_t len)
{
    if (ev->event == ZMQ_EVENT_HANDSHAKE_FAILED_AUTH) {
        snprintf(why, len, "the controller refused this process's Curve key (ZAP status %u): its connection "
                 "file's curve.public_key is not the running cluster's member key (a file from another start "
                 "of the cluster?)", (unsigned)ev->value);
        return 1;
    }
    if (ev->event != ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL)
        return 0;
    switch (ev->value) {
    case ZMQ_PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
        snprintf(why, len, "the controller at %s and this process disagree on Curve (one encrypts, the other "
                 "does not): the connection file is not the running cluster's", ev->endpoint);
        return 1;
    case ZMQ_PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC:
    case ZMQ_PROTOCOL_ERROR_ZMTP_KEY_EXCHANGE:
        snprintf(why, len, "the Curve handshake with %s failed (a cryptographic error: the connection file's "
                 "curve.server_key is not the running controller's key?)", ev->endpoint);
        return 1;
    default:
        return 0;
    }
}
