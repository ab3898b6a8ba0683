/*
 * tests/bridge/test_xfer.c - the bulk channel over socketpairs and loopback
 * TCP: the handshake and every way it refuses a peer, records that were
 * altered, dropped, repeated, reordered or replayed, transfers of awkward
 * sizes, refusal and abort, forwarding along a chain, and peers that vanish
 * or stall. Each side of a connection runs in a thread of its own; only the
 * test's main thread asserts.
 */
#include <criterion/criterion.h>

#include <shoal/util.h>
#include <shoal/wire.h>
#include <shoal/xfer.h>

#include "../../bridge/xfer_format.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sodium.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static uint8_t key[SHOAL_XFER_KEY], other_key[SHOAL_XFER_KEY];

static void setup(void)
{
    cr_assert_eq(shoal_wire_keygen(key), 0);
    cr_assert_eq(shoal_wire_keygen(other_key), 0);
    /* A test that fails with a socket still open must not die of SIGPIPE
     * instead (the library itself never raises it: MSG_NOSIGNAL). */
    signal(SIGPIPE, SIG_IGN);
}

TestSuite(xfer, .init = setup, .timeout = 120);

/* The client's bytes before its first record: hello, then proof. */
#define HANDSHAKE_BYTES (SHOAL_XFER_HELLO + SHOAL_XFER_PROOF)

static const unsigned ENC = SHOAL_XFER_ENCRYPT;

/* ------------------------------------------------------------------------ */
/* Sockets, threads, patterns. */

static void unix_pair(int fd[2])
{
    cr_assert_eq(socketpair(AF_UNIX, SOCK_STREAM, 0, fd), 0);
}

/* fd[0] connected to fd[1] over 127.0.0.1 (a port the kernel picks). */
static void tcp_pair(int fd[2])
{
    int l = socket(AF_INET, SOCK_STREAM, 0);
    cr_assert_geq(l, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t alen = sizeof a;
    cr_assert_eq(bind(l, (struct sockaddr *)&a, sizeof a), 0);
    cr_assert_eq(listen(l, 1), 0);
    cr_assert_eq(getsockname(l, (struct sockaddr *)&a, &alen), 0);
    fd[0] = socket(AF_INET, SOCK_STREAM, 0);
    cr_assert_geq(fd[0], 0);
    cr_assert_eq(connect(fd[0], (struct sockaddr *)&a, sizeof a), 0);
    fd[1] = accept(l, NULL, NULL);
    cr_assert_geq(fd[1], 0);
    close(l);
}

static void close_pair(int fd[2])
{
    close(fd[0]);
    close(fd[1]);
}

static void fill(uint8_t *p, size_t n, uint64_t seed)
{
    uint64_t x = seed * 0x9e3779b97f4a7c15ull + 1;
    for (size_t i = 0; i < n; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        p[i] = (uint8_t)x;
    }
}

static void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    cr_assert_not_null(p);
    return p;
}

static int64_t ms_since(int64_t t0)
{
    return (shoal_now_ns() - t0) / 1000000;
}

struct opener {
    int fd, role;
    const uint8_t *key;
    unsigned flags;
    int timeout_ms;
    int rc;
    shoal_xfer *x;
    pthread_t t;
};

static void *open_main(void *arg)
{
    struct opener *o = arg;
    o->rc = shoal_xfer_open(o->fd, o->role, o->key, o->flags, o->timeout_ms, &o->x);
    return NULL;
}

static void open_start(struct opener *o, int fd, int role, const uint8_t *k, unsigned flags, int timeout_ms)
{
    *o = (struct opener){.fd = fd, .role = role, .key = k, .flags = flags, .timeout_ms = timeout_ms};
    cr_assert_eq(pthread_create(&o->t, NULL, open_main, o), 0);
}

static void open_join(struct opener *o)
{
    pthread_join(o->t, NULL);
}

/* Runs both handshakes at once: fd[0] the client, fd[1] the server. */
static void open_both(int fd[2], const uint8_t *kc, unsigned fc, const uint8_t *ks, unsigned fs,
                      struct opener *c, struct opener *s)
{
    open_start(s, fd[1], SHOAL_XFER_SERVER, ks, fs, 5000);
    open_start(c, fd[0], SHOAL_XFER_CLIENT, kc, fc, 5000);
    open_join(c);
    open_join(s);
}

/* A connected pair that must succeed. */
static void connect_xfer(int fd[2], unsigned flags, shoal_xfer **xc, shoal_xfer **xs)
{
    struct opener c, s;
    open_both(fd, key, flags, key, flags, &c, &s);
    cr_assert_eq(c.rc, 0, "client: %s", shoal_xfer_strerror(c.rc));
    cr_assert_eq(s.rc, 0, "server: %s", shoal_xfer_strerror(s.rc));
    *xc = c.x;
    *xs = s.x;
}

/* shoal_xfer_send_buffer in a thread. */
struct sender {
    shoal_xfer *x;
    uint64_t id;
    const void *meta;
    size_t metalen;
    const uint8_t *buf;
    size_t len, chunk;
    int rc;
    pthread_t t;
};

static void *send_main(void *arg)
{
    struct sender *s = arg;
    s->rc = shoal_xfer_send_buffer(s->x, s->id, s->meta, s->metalen, s->buf, s->len, s->chunk);
    return NULL;
}

static void send_start(struct sender *s, shoal_xfer *x, uint64_t id, const uint8_t *buf, size_t len,
                       size_t chunk)
{
    *s = (struct sender){.x = x, .id = id, .buf = buf, .len = len, .chunk = chunk};
    cr_assert_eq(pthread_create(&s->t, NULL, send_main, s), 0);
}

/* The accept callback's state: memory to give, what it was told. */
struct sinkctx {
    uint8_t *dst;
    size_t cap;
    int refuse; /* non-zero: refuse with it */
    bool keep;  /* false: dst NULL (relay only) */
    shoal_xfer_route *routes;
    size_t nroutes;
    int calls;
    uint64_t id, total;
    uint8_t meta[SHOAL_XFER_MAX_META];
    size_t metalen;
};

static int accept_cb(void *ctx, const shoal_xfer_begin *b, shoal_xfer_sink *sink)
{
    struct sinkctx *k = ctx;
    k->calls++;
    k->id = b->id;
    k->total = b->total;
    k->metalen = b->metalen;
    memcpy(k->meta, b->meta, b->metalen);
    if (k->refuse)
        return k->refuse;
    if (b->total > k->cap)
        return -ENOSPC;
    sink->dst = k->keep ? k->dst : NULL;
    sink->routes = k->routes;
    sink->nroutes = k->nroutes;
    return 0;
}

static void sinkctx_init(struct sinkctx *k, size_t cap)
{
    memset(k, 0, sizeof *k);
    k->dst = xmalloc(cap);
    k->cap = cap;
    k->keep = true;
}

/* shoal_xfer_recv_buffer in a thread (a hop of a chain). */
struct receiver {
    shoal_xfer *x;
    struct sinkctx *k;
    int rc;
    pthread_t t;
};

static void *recv_main(void *arg)
{
    struct receiver *r = arg;
    r->rc = shoal_xfer_recv_buffer(r->x, NULL, 10000, accept_cb, r->k, NULL);
    return NULL;
}

static void recv_start(struct receiver *r, shoal_xfer *x, struct sinkctx *k)
{
    *r = (struct receiver){.x = x, .k = k};
    cr_assert_eq(pthread_create(&r->t, NULL, recv_main, r), 0);
}

/* Sends len bytes (a pattern) from xc and checks they arrive at xs. */
static void transfer_ok(shoal_xfer *xc, shoal_xfer *xs, size_t len, size_t chunk, uint64_t id)
{
    uint8_t *src = xmalloc(len);
    fill(src, len, id);
    struct sinkctx k;
    sinkctx_init(&k, len);
    struct sender s;
    send_start(&s, xc, id, src, len, chunk);
    shoal_xfer_begin info;
    int rc = shoal_xfer_recv_buffer(xs, NULL, 10000, accept_cb, &k, &info);
    pthread_join(s.t, NULL);
    cr_assert_eq(s.rc, 0, "send %zu: %s", len, shoal_xfer_strerror(s.rc));
    cr_assert_eq(rc, 0, "recv %zu: %s", len, shoal_xfer_strerror(rc));
    cr_assert_eq(k.calls, 1);
    cr_assert_eq(k.total, len);
    cr_assert_eq(info.id, id);
    cr_assert_eq(info.total, len);
    cr_assert(len == 0 || memcmp(k.dst, src, len) == 0, "%zu bytes differ", len);
    free(src);
    free(k.dst);
}

/* ------------------------------------------------------------------------ */
/* A relay between a client and a server that records what the client sent
 * and can alter it on the way: flip a bit, drop a range, insert a copy of a
 * range after some byte (a duplicate, or with the drop a reordering). */

struct relay {
    int cfd, sfd; /* its ends of the client's and the server's socketpairs */
    int64_t flip_at;
    int64_t drop_from, drop_len;
    int64_t ins_after, ins_from, ins_len;
    uint8_t *rec; /* every byte the client sent, unaltered */
    size_t rec_len, rec_cap;
    pthread_t t;
};

static void send_all(int fd, const uint8_t *p, size_t n)
{
    while (n > 0) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w <= 0)
            return; /* the endpoint is gone: drop the rest */
        p += w;
        n -= (size_t)w;
    }
}

static void *relay_main(void *arg)
{
    struct relay *r = arg;
    bool c_open = true, s_open = true;
    static __thread uint8_t in[65536], out[3 * 65536];
    while (c_open || s_open) {
        struct pollfd p[2] = {{.fd = c_open ? r->cfd : -1, .events = POLLIN},
                              {.fd = s_open ? r->sfd : -1, .events = POLLIN}};
        if (poll(p, 2, -1) < 0)
            continue;
        if (p[0].revents) {
            ssize_t n = recv(r->cfd, in, sizeof in, 0);
            if (n <= 0) {
                c_open = false;
                shutdown(r->sfd, SHUT_WR);
            } else {
                if (r->rec_len + (size_t)n > r->rec_cap) {
                    r->rec_cap = (r->rec_len + (size_t)n) * 2;
                    r->rec = realloc(r->rec, r->rec_cap);
                }
                size_t o = 0;
                for (ssize_t i = 0; i < n; i++) {
                    int64_t pos = (int64_t)r->rec_len;
                    uint8_t b = in[i];
                    r->rec[r->rec_len++] = b;
                    if (pos == r->flip_at)
                        b ^= 0x10;
                    if (!(r->drop_len && pos >= r->drop_from && pos < r->drop_from + r->drop_len))
                        out[o++] = b;
                    if (r->ins_len && pos == r->ins_after) {
                        memcpy(out + o, r->rec + r->ins_from, (size_t)r->ins_len);
                        o += (size_t)r->ins_len;
                    }
                }
                send_all(r->sfd, out, o);
            }
        }
        if (p[1].revents) {
            ssize_t n = recv(r->sfd, in, sizeof in, 0);
            if (n <= 0) {
                s_open = false;
                shutdown(r->cfd, SHUT_WR);
            } else
                send_all(r->cfd, in, (size_t)n);
        }
    }
    return NULL;
}

/* c[0]: the client's end, s[0]: the server's; the relay has c[1] and s[1]. */
static void relay_start(struct relay *r, int c[2], int s[2])
{
    unix_pair(c);
    unix_pair(s);
    r->cfd = c[1];
    r->sfd = s[1];
    if (!r->drop_len)
        r->drop_from = -1;
    cr_assert_eq(pthread_create(&r->t, NULL, relay_main, r), 0);
}

static struct relay relay_none(void)
{
    return (struct relay){.flip_at = -1, .ins_after = -1};
}

/* Closes the endpoints' ends, then the relay's once it has seen them go. */
static void relay_stop(struct relay *r, int c[2], int s[2])
{
    close(c[0]);
    close(s[0]);
    pthread_join(r->t, NULL);
    close(c[1]);
    close(s[1]);
}

/* ------------------------------------------------------------------------ */
/* Handshake. */

static void handshake_ok(bool tcp, unsigned flags)
{
    int fd[2];
    if (tcp)
        tcp_pair(fd);
    else
        unix_pair(fd);
    shoal_xfer *xc, *xs;
    connect_xfer(fd, flags, &xc, &xs);
    if (!(flags & ENC))
        cr_assert_eq(shoal_xfer_cipher(xc), SHOAL_XFER_CIPHER_NONE);
    else if (flags & SHOAL_XFER_CHACHA)
        cr_assert_eq(shoal_xfer_cipher(xc), SHOAL_XFER_CIPHER_CHACHA20POLY1305);
    else
        cr_assert_neq(shoal_xfer_cipher(xc), SHOAL_XFER_CIPHER_NONE);
    cr_assert_eq(shoal_xfer_cipher(xc), shoal_xfer_cipher(xs));
    cr_assert_eq(shoal_xfer_fd(xc), fd[0]);

    /* A record each way: both directions have working keys. */
    shoal_xfer_hdr h = {.type = SHOAL_XFER_APP, .flags = 7, .id = 42, .offset = 9}, got;
    char buf[6];
    cr_assert_eq(shoal_xfer_send(xc, &h, "hello", 5), 0);
    cr_assert_eq(shoal_xfer_recv_hdr(xs, &got, 1000), 0);
    cr_assert_eq(got.type, SHOAL_XFER_APP);
    cr_assert_eq(got.flags, 7);
    cr_assert_eq(got.id, 42);
    cr_assert_eq(got.offset, 9);
    cr_assert_eq(got.length, 5);
    cr_assert_eq(got.seq, 0);
    cr_assert_eq(shoal_xfer_recv_payload(xs, buf, 5), 0);
    cr_assert_eq(memcmp(buf, "hello", 5), 0);
    h.type = SHOAL_XFER_APP + 1;
    cr_assert_eq(shoal_xfer_send(xs, &h, "world", 5), 0);
    cr_assert_eq(shoal_xfer_recv_hdr(xc, &got, 1000), 0);
    cr_assert_eq(got.type, SHOAL_XFER_APP + 1);
    cr_assert_eq(shoal_xfer_recv_payload(xc, buf, 5), 0);
    cr_assert_eq(memcmp(buf, "world", 5), 0);
    shoal_xfer_close(xc);
    shoal_xfer_close(xs);
    close_pair(fd);
}

Test(xfer, handshake_plain_unix)
{
    handshake_ok(false, 0);
}

Test(xfer, handshake_encrypted_unix)
{
    handshake_ok(false, ENC);
}

Test(xfer, handshake_chacha_unix)
{
    handshake_ok(false, ENC | SHOAL_XFER_CHACHA);
}

Test(xfer, handshake_plain_tcp)
{
    handshake_ok(true, 0);
}

Test(xfer, handshake_encrypted_tcp)
{
    handshake_ok(true, ENC);
}

Test(xfer, cipher_is_chosen_by_both_offers)
{
    int fd[2];
    struct opener c, s;
    /* One side offers only ChaCha20: both use it. */
    unix_pair(fd);
    open_both(fd, key, ENC, key, ENC | SHOAL_XFER_CHACHA, &c, &s);
    cr_assert_eq(c.rc, 0);
    cr_assert_eq(s.rc, 0);
    cr_assert_eq(shoal_xfer_cipher(c.x), SHOAL_XFER_CIPHER_CHACHA20POLY1305);
    cr_assert_eq(shoal_xfer_cipher(s.x), SHOAL_XFER_CIPHER_CHACHA20POLY1305);
    shoal_xfer_close(c.x);
    shoal_xfer_close(s.x);
    close_pair(fd);

    if (!crypto_aead_aes256gcm_is_available()) {
        shoal_xfer *x;
        cr_assert_eq(shoal_xfer_open(fd[0], SHOAL_XFER_CLIENT, key, ENC | SHOAL_XFER_AESGCM, 0, &x),
                     -ENOTSUP);
        cr_skip_test("this CPU has no AES-256-GCM");
    }
    /* One offers only AES-256-GCM, the other only ChaCha20: nothing in
     * common, and both say so. */
    unix_pair(fd);
    open_both(fd, key, ENC | SHOAL_XFER_AESGCM, key, ENC | SHOAL_XFER_CHACHA, &c, &s);
    cr_assert_eq(c.rc, -EPROTONOSUPPORT, "client: %s", shoal_xfer_strerror(c.rc));
    cr_assert_eq(s.rc, -EPROTONOSUPPORT, "server: %s", shoal_xfer_strerror(s.rc));
    close_pair(fd);
    /* Both default: AES-256-GCM where the CPU has it. */
    unix_pair(fd);
    connect_xfer(fd, ENC, &c.x, &s.x);
    cr_assert_eq(shoal_xfer_cipher(c.x), SHOAL_XFER_CIPHER_AES256GCM);
    shoal_xfer_close(c.x);
    shoal_xfer_close(s.x);
    close_pair(fd);
}

Test(xfer, open_rejects_bad_arguments)
{
    int fd[2];
    shoal_xfer *x = (shoal_xfer *)&fd; /* must stay untouched */
    shoal_xfer *const before = x;
    unix_pair(fd);
    cr_assert_eq(shoal_xfer_open(fd[0], 3, key, 0, 100, &x), -EINVAL);
    cr_assert_eq(shoal_xfer_open(fd[0], SHOAL_XFER_CLIENT, key, 1u << 9, 100, &x), -EINVAL);
    cr_assert_eq(
        shoal_xfer_open(fd[0], SHOAL_XFER_CLIENT, key, ENC | SHOAL_XFER_CHACHA | SHOAL_XFER_AESGCM, 100, &x),
        -EINVAL);
    cr_assert_eq(x, before);
    close_pair(fd);
    /* Not a stream socket. */
    cr_assert_eq(socketpair(AF_UNIX, SOCK_DGRAM, 0, fd), 0);
    cr_assert_eq(shoal_xfer_open(fd[0], SHOAL_XFER_CLIENT, key, 0, 100, &x), -EPROTOTYPE);
    close_pair(fd);
    cr_assert_eq(pipe(fd), 0);
    cr_assert_eq(shoal_xfer_open(fd[1], SHOAL_XFER_CLIENT, key, 0, 100, &x), -ENOTSOCK);
    close_pair(fd);
    cr_assert_eq(x, before);
}

static void wrong_key(unsigned flags)
{
    int fd[2];
    struct opener c, s;
    tcp_pair(fd);
    int64_t t0 = shoal_now_ns();
    open_both(fd, key, flags, other_key, flags, &c, &s);
    cr_assert_eq(c.rc, -EACCES, "client: %s", shoal_xfer_strerror(c.rc));
    cr_assert_eq(s.rc, -EACCES, "server: %s", shoal_xfer_strerror(s.rc));
    /* Refused at once, not at the end of the 5 s deadline. */
    cr_assert_lt(ms_since(t0), 2000);
    close_pair(fd);
}

Test(xfer, wrong_key_refused_on_both_sides_plain)
{
    wrong_key(0);
}

Test(xfer, wrong_key_refused_on_both_sides_encrypted)
{
    wrong_key(ENC);
}

/* A peer that writes a good-looking hello, a forged proof, and then data
 * straight away: the server refuses it and has read nothing after the
 * proof. */
Test(xfer, wrong_key_no_data_accepted)
{
    int fd[2];
    unix_pair(fd);
    shoal__xfer_hello h = {.role = SHOAL_XFER_CLIENT,
                           .ciphers = SHOAL__XFER_OFFER_CHACHA,
                           .flags = SHOAL__XFER_WIRE_ENCRYPT,
                           .max_record = SHOAL_XFER_MAX_RECORD};
    fill(h.pk, sizeof h.pk, 1);
    fill(h.nonce, sizeof h.nonce, 2);
    uint8_t out[HANDSHAKE_BYTES + 1000];
    shoal__xfer_hello_encode(&h, out);
    fill(out + SHOAL_XFER_HELLO, sizeof out - SHOAL_XFER_HELLO, 3);
    cr_assert_eq(write(fd[0], out, sizeof out), (ssize_t)sizeof out);
    shoal_xfer *x = NULL;
    cr_assert_eq(shoal_xfer_open(fd[1], SHOAL_XFER_SERVER, key, ENC, 2000, &x), -EACCES);
    cr_assert_null(x);
    uint8_t left[2000];
    cr_assert_eq(recv(fd[1], left, sizeof left, MSG_DONTWAIT), 1000);
    cr_assert_eq(memcmp(left, out + HANDSHAKE_BYTES, 1000), 0);
    close_pair(fd);
}

Test(xfer, mismatched_encryption_refused_on_both_sides)
{
    int fd[2];
    struct opener c, s;
    unix_pair(fd);
    open_both(fd, key, ENC, key, 0, &c, &s);
    cr_assert_eq(c.rc, -EPROTONOSUPPORT, "client: %s", shoal_xfer_strerror(c.rc));
    cr_assert_eq(s.rc, -EPROTONOSUPPORT, "server: %s", shoal_xfer_strerror(s.rc));
    close_pair(fd);
}

Test(xfer, same_role_on_both_sides_refused)
{
    int fd[2];
    struct opener a, b;
    unix_pair(fd);
    open_start(&a, fd[0], SHOAL_XFER_SERVER, key, ENC, 2000);
    open_start(&b, fd[1], SHOAL_XFER_SERVER, key, ENC, 2000);
    open_join(&a);
    open_join(&b);
    cr_assert_eq(a.rc, -EPROTO);
    cr_assert_eq(b.rc, -EPROTO);
    close_pair(fd);
}

/* The server's answer to bytes a raw peer writes (then closes, or not). */
static int server_on(const void *bytes, size_t n, bool then_close, int timeout_ms)
{
    int fd[2];
    unix_pair(fd);
    cr_assert_eq(write(fd[0], bytes, n), (ssize_t)n);
    if (then_close)
        shutdown(fd[0], SHUT_WR);
    shoal_xfer *x = NULL;
    int rc = shoal_xfer_open(fd[1], SHOAL_XFER_SERVER, key, ENC, timeout_ms, &x);
    cr_assert_null(x);
    close_pair(fd);
    return rc;
}

static void good_hello(uint8_t out[SHOAL_XFER_HELLO])
{
    shoal__xfer_hello h = {.role = SHOAL_XFER_CLIENT,
                           .ciphers = SHOAL__XFER_OFFER_CHACHA,
                           .flags = SHOAL__XFER_WIRE_ENCRYPT,
                           .max_record = SHOAL_XFER_MAX_RECORD};
    fill(h.pk, sizeof h.pk, 11);
    fill(h.nonce, sizeof h.nonce, 12);
    shoal__xfer_hello_encode(&h, out);
}

Test(xfer, garbage_hellos_refused)
{
    uint8_t junk[4096], hello[SHOAL_XFER_HELLO];
    fill(junk, sizeof junk, 5);
    /* Random bytes, exactly a hello's size, then more than one. */
    cr_assert_eq(server_on(junk, SHOAL_XFER_HELLO, false, 2000), -EPROTO);
    cr_assert_eq(server_on(junk, sizeof junk, false, 2000), -EPROTO);
    /* Short: 40 bytes and the connection closes. */
    good_hello(hello);
    cr_assert_eq(server_on(hello, 40, true, 2000), -EPROTO);
    /* Short, and the peer stays: the deadline ends it. */
    int64_t t0 = shoal_now_ns();
    cr_assert_eq(server_on(hello, 40, false, 300), -ETIMEDOUT);
    cr_assert_geq(ms_since(t0), 290);
    cr_assert_lt(ms_since(t0), 3000);
    /* Nothing, and the connection closes. */
    cr_assert_eq(server_on(hello, 0, true, 2000), -ECONNRESET);
    /* A good hello, each field broken in turn. */
    static const struct {
        size_t at;
        uint8_t value;
    } breaks[] = {
        {0, 'X'},   /* magic */
        {4, 2},     /* version */
        {6, 200},   /* length: an oversized hello */
        {8, 0},     /* role */
        {8, 2},     /* a server's role, to a server */
        {10, 1},    /* reserved */
        {12, 0x80}, /* a flag this version does not know */
        {19, 0},    /* max_record 0 (16 MiB is 00 00 00 01), below 64 KiB */
        {25, 1},    /* reserved */
    };
    for (size_t i = 0; i < sizeof breaks / sizeof breaks[0]; i++) {
        good_hello(hello);
        hello[breaks[i].at] = breaks[i].value;
        cr_assert_eq(server_on(hello, sizeof hello, false, 2000), -EPROTO, "byte %zu", breaks[i].at);
    }
    /* The hello decoder agrees on its own. */
    shoal__xfer_hello h;
    good_hello(hello);
    cr_assert_eq(shoal__xfer_hello_decode(hello, sizeof hello, &h), 0);
    cr_assert_eq(h.max_record, SHOAL_XFER_MAX_RECORD);
    cr_assert_eq(shoal__xfer_hello_decode(hello, sizeof hello - 1, &h), -EPROTO);
}

/* A peer that echoes our own hello and proof: refused (our own key came
 * back), and the echoed proof would not pass anyway (role-bound). */
static void *echo_main(void *arg)
{
    int fd = *(int *)arg;
    uint8_t b[HANDSHAKE_BYTES];
    size_t n = 0;
    while (n < sizeof b) {
        ssize_t r = recv(fd, b + n, sizeof b - n, 0);
        if (r <= 0)
            break;
        send(fd, b + n, (size_t)r, MSG_NOSIGNAL);
        n += (size_t)r;
    }
    return NULL;
}

Test(xfer, reflected_hello_refused)
{
    int fd[2];
    unix_pair(fd);
    pthread_t t;
    cr_assert_eq(pthread_create(&t, NULL, echo_main, &fd[1]), 0);
    shoal_xfer *x = NULL;
    cr_assert_eq(shoal_xfer_open(fd[0], SHOAL_XFER_CLIENT, key, ENC, 2000, &x), -EPROTO);
    shutdown(fd[0], SHUT_RDWR);
    pthread_join(t, NULL);
    close_pair(fd);
}

/* A whole session through the relay, the client's bytes recorded, then
 * played verbatim to a new server: its fresh nonce and key make the
 * recorded proof wrong, and it takes none of the records. */
static void replay(unsigned flags)
{
    int c[2], s[2];
    struct relay r = relay_none();
    relay_start(&r, c, s);
    shoal_xfer *xc, *xs;
    int pair[2] = {c[0], s[0]};
    connect_xfer(pair, flags, &xc, &xs);
    transfer_ok(xc, xs, 5000, 1024, 77);
    cr_assert_eq(shoal_xfer_shutdown(xc), 0);
    shoal_xfer_hdr h;
    cr_assert_eq(shoal_xfer_recv_hdr(xs, &h, 1000), -ESHUTDOWN);
    shoal_xfer_close(xc);
    shoal_xfer_close(xs);
    relay_stop(&r, c, s);
    cr_assert_gt(r.rec_len, HANDSHAKE_BYTES + 5000);

    int fd[2];
    unix_pair(fd);
    int big = 1 << 20;
    setsockopt(fd[0], SOL_SOCKET, SO_SNDBUF, &big, sizeof big);
    cr_assert_eq(write(fd[0], r.rec, r.rec_len), (ssize_t)r.rec_len);
    shoal_xfer *x = NULL;
    cr_assert_eq(shoal_xfer_open(fd[1], SHOAL_XFER_SERVER, key, flags, 2000, &x), -EACCES);
    cr_assert_null(x);
    /* Everything after the proof is still unread. */
    uint8_t *left = xmalloc(r.rec_len);
    ssize_t got = recv(fd[1], left, r.rec_len, MSG_DONTWAIT);
    cr_assert_eq(got, (ssize_t)(r.rec_len - HANDSHAKE_BYTES));
    free(left);
    free(r.rec);
    close_pair(fd);
}

Test(xfer, replayed_session_refused_encrypted)
{
    replay(ENC);
}

Test(xfer, replayed_session_refused_plain)
{
    replay(0);
}

/* ------------------------------------------------------------------------ */
/* Records altered on the way. Client to server, after the handshake:
 * BEGIN at HANDSHAKE_BYTES (48 bytes, no metadata), then the first DATA's
 * header (48) and its payload. */

#define AT_BEGIN HANDSHAKE_BYTES
#define AT_DATA_HDR (AT_BEGIN + SHOAL_XFER_WIRE_HDR)
#define AT_DATA_PAYLOAD (AT_DATA_HDR + SHOAL_XFER_WIRE_HDR)

/* A 3000-byte transfer through a relay set up as r says; returns what the
 * receiver got, and its bytes in *dst (the caller frees). */
static int altered_transfer(struct relay *r, unsigned flags, uint8_t **dst, uint8_t *src)
{
    int c[2], s[2];
    relay_start(r, c, s);
    shoal_xfer *xc, *xs;
    int pair[2] = {c[0], s[0]};
    connect_xfer(pair, flags, &xc, &xs);
    shoal_xfer_set_idle_timeout(xs, 2000);
    fill(src, 3000, 9);
    struct sinkctx k;
    sinkctx_init(&k, 3000);
    struct sender snd;
    send_start(&snd, xc, 5, src, 3000, 1000);
    int rc = shoal_xfer_recv_buffer(xs, NULL, 2000, accept_cb, &k, NULL);
    pthread_join(snd.t, NULL);
    cr_assert_eq(snd.rc, 0);
    /* A failure is sticky. */
    if (rc < 0) {
        shoal_xfer_hdr h;
        cr_assert_eq(shoal_xfer_recv_hdr(xs, &h, 0), rc);
    }
    shoal_xfer_close(xc);
    shoal_xfer_close(xs);
    relay_stop(r, c, s);
    free(r->rec);
    *dst = k.dst;
    return rc;
}

Test(xfer, flipped_bit_in_data_payload_encrypted)
{
    struct relay r = relay_none();
    r.flip_at = AT_DATA_PAYLOAD + 10;
    uint8_t src[3000], *dst;
    cr_assert_eq(altered_transfer(&r, ENC, &dst, src), -EBADMSG);
    free(dst);
}

Test(xfer, flipped_bit_in_data_tag_encrypted)
{
    struct relay r = relay_none();
    r.flip_at = AT_DATA_PAYLOAD + 1000 + 3; /* the payload's tag */
    uint8_t src[3000], *dst;
    cr_assert_eq(altered_transfer(&r, ENC, &dst, src), -EBADMSG);
    free(dst);
}

Test(xfer, flipped_bit_in_header_encrypted)
{
    struct relay r = relay_none();
    r.flip_at = AT_DATA_HDR + 4;
    uint8_t src[3000], *dst;
    cr_assert_eq(altered_transfer(&r, ENC, &dst, src), -EBADMSG);
    free(dst);
}

Test(xfer, flipped_bit_in_header_plain)
{
    /* Each field of the header, in turn: its MAC fails. */
    for (int at = 0; at < (int)SHOAL_XFER_WIRE_HDR; at += 5) {
        struct relay r = relay_none();
        r.flip_at = AT_DATA_HDR + at;
        uint8_t src[3000], *dst;
        cr_assert_eq(altered_transfer(&r, 0, &dst, src), -EBADMSG, "byte %d", at);
        free(dst);
    }
}

/* Plain mode authenticates headers only (docs/xfer.md): an altered payload
 * byte arrives altered. This pins down that documented limit. */
Test(xfer, plain_payload_is_not_authenticated)
{
    struct relay r = relay_none();
    r.flip_at = AT_DATA_PAYLOAD + 10;
    uint8_t src[3000], *dst;
    cr_assert_eq(altered_transfer(&r, 0, &dst, src), 0);
    cr_assert_eq(dst[10], src[10] ^ 0x10);
    dst[10] = src[10];
    cr_assert_eq(memcmp(dst, src, 3000), 0);
    free(dst);
}

/* Three records with no payload; the relay drops, repeats or reorders
 * them. The server must take the first and refuse what follows. */
static void sequence_check(unsigned flags, struct relay *r)
{
    int c[2], s[2];
    relay_start(r, c, s);
    shoal_xfer *xc, *xs;
    int pair[2] = {c[0], s[0]};
    connect_xfer(pair, flags, &xc, &xs);
    for (uint64_t i = 0; i < 3; i++) {
        shoal_xfer_hdr h = {.type = SHOAL_XFER_APP, .id = i};
        cr_assert_eq(shoal_xfer_send(xc, &h, NULL, 0), 0);
    }
    shoal_xfer_hdr h;
    cr_assert_eq(shoal_xfer_recv_hdr(xs, &h, 2000), 0);
    cr_assert_eq(h.id, 0);
    cr_assert_eq(shoal_xfer_recv_hdr(xs, &h, 2000), -EBADMSG);
    cr_assert_eq(shoal_xfer_recv_hdr(xs, &h, 2000), -EBADMSG);
    shoal_xfer_close(xc);
    shoal_xfer_close(xs);
    relay_stop(r, c, s);
    free(r->rec);
}

#define REC(i) (HANDSHAKE_BYTES + (i) * SHOAL_XFER_WIRE_HDR)

static void sequences(unsigned flags)
{
    struct relay r = relay_none();
    r.drop_from = REC(1); /* dropped */
    r.drop_len = SHOAL_XFER_WIRE_HDR;
    sequence_check(flags, &r);
    r = relay_none();
    r.ins_after = REC(1) - 1; /* the first record twice */
    r.ins_from = REC(0);
    r.ins_len = SHOAL_XFER_WIRE_HDR;
    sequence_check(flags, &r);
    r = relay_none();
    r.drop_from = REC(1); /* the second after the third */
    r.drop_len = SHOAL_XFER_WIRE_HDR;
    r.ins_after = REC(3) - 1;
    r.ins_from = REC(1);
    r.ins_len = SHOAL_XFER_WIRE_HDR;
    sequence_check(flags, &r);
}

Test(xfer, dropped_repeated_reordered_records_encrypted)
{
    sequences(ENC);
}

Test(xfer, dropped_repeated_reordered_records_plain)
{
    sequences(0);
}

/* ------------------------------------------------------------------------ */
/* Transfers. */

static void sizes(unsigned flags)
{
    int fd[2];
    unix_pair(fd);
    shoal_xfer *xc, *xs;
    connect_xfer(fd, flags, &xc, &xs);
    static const size_t lens[] = {0, 1, 4095, 4096, 4097, 3 * 4096 + 7, 100000};
    for (size_t i = 0; i < sizeof lens / sizeof lens[0]; i++)
        transfer_ok(xc, xs, lens[i], 4096, 100 + i);
    /* The default chunk. */
    transfer_ok(xc, xs, 3 * SHOAL_XFER_CHUNK + 1, 0, 200);
    shoal_xfer_close(xc);
    shoal_xfer_close(xs);
    close_pair(fd);
}

Test(xfer, sizes_plain)
{
    sizes(0);
}

Test(xfer, sizes_encrypted)
{
    sizes(ENC);
}

Test(xfer, sizes_chacha)
{
    sizes(ENC | SHOAL_XFER_CHACHA);
}

static void big_tcp(unsigned flags)
{
    int fd[2];
    tcp_pair(fd);
    shoal_xfer *xc, *xs;
    connect_xfer(fd, flags, &xc, &xs);
    transfer_ok(xc, xs, (64u << 20) + 3, 0, 300);
    shoal_xfer_close(xc);
    shoal_xfer_close(xs);
    close_pair(fd);
}

Test(xfer, transfer_64mib_plus_3_tcp_plain)
{
    big_tcp(0);
}

Test(xfer, transfer_64mib_plus_3_tcp_encrypted)
{
    big_tcp(ENC);
}

Test(xfer, metadata_arrives_whole)
{
    int fd[2];
    unix_pair(fd);
    shoal_xfer *xc, *xs;
    connect_xfer(fd, ENC, &xc, &xs);
    uint8_t *meta = xmalloc(SHOAL_XFER_MAX_META + 1), src[100];
    fill(meta, SHOAL_XFER_MAX_META, 4);
    fill(src, sizeof src, 5);
    cr_assert_eq(shoal_xfer_send_buffer(xc, 1, meta, SHOAL_XFER_MAX_META + 1, src, sizeof src, 0), -EMSGSIZE);
    cr_assert_eq(shoal_xfer_send_buffer(xc, 1, meta, SHOAL_XFER_MAX_META, src, sizeof src, 0), 0);
    struct sinkctx k;
    sinkctx_init(&k, 100);
    shoal_xfer_begin info;
    cr_assert_eq(shoal_xfer_recv_buffer(xs, NULL, 1000, accept_cb, &k, &info), 0);
    cr_assert_eq(k.metalen, SHOAL_XFER_MAX_META);
    cr_assert_eq(memcmp(k.meta, meta, SHOAL_XFER_MAX_META), 0);
    cr_assert_eq(info.metalen, SHOAL_XFER_MAX_META);
    cr_assert_eq(memcmp(info.meta, meta, SHOAL_XFER_MAX_META), 0);
    cr_assert_eq(memcmp(k.dst, src, sizeof src), 0);
    free(k.dst);
    free(meta);
    shoal_xfer_close(xc);
    shoal_xfer_close(xs);
    close_pair(fd);
}

/* The caller reads the BEGIN itself (a dispatch loop would) and hands it
 * to shoal_xfer_recv_buffer. */
Test(xfer, recv_buffer_from_a_begin_already_read)
{
    int fd[2];
    unix_pair(fd);
    shoal_xfer *xc, *xs;
    connect_xfer(fd, ENC, &xc, &xs);
    uint8_t src[10000];
    fill(src, sizeof src, 6);
    cr_assert_eq(shoal_xfer_send_buffer(xc, 9, "m", 1, src, sizeof src, 4000), 0);
    cr_assert_eq(shoal_xfer_send_buffer(xc, 10, NULL, 0, src, sizeof src, 4000), 0);
    struct sinkctx k;
    sinkctx_init(&k, sizeof src);
    shoal_xfer_hdr h, other;
    cr_assert_eq(shoal_xfer_recv_hdr(xs, &h, 1000), 0);
    cr_assert_eq(h.type, SHOAL_XFER_BEGIN);
    other = h;
    other.seq++;
    cr_assert_eq(shoal_xfer_recv_buffer(xs, &other, 0, accept_cb, &k, NULL), -EINVAL);
    cr_assert_eq(shoal_xfer_recv_buffer(xs, &h, 0, accept_cb, &k, NULL), 0);
    cr_assert_eq(k.metalen, 1);
    cr_assert_eq(memcmp(k.dst, src, sizeof src), 0);
    /* A BEGIN without metadata: nothing pending after its header. */
    memset(k.dst, 0, sizeof src);
    cr_assert_eq(shoal_xfer_recv_hdr(xs, &h, 1000), 0);
    cr_assert_eq(h.length, 0);
    cr_assert_eq(shoal_xfer_recv_buffer(xs, &h, 0, accept_cb, &k, NULL), 0);
    cr_assert_eq(k.id, 10);
    cr_assert_eq(memcmp(k.dst, src, sizeof src), 0);
    free(k.dst);
    shoal_xfer_close(xc);
    shoal_xfer_close(xs);
    close_pair(fd);
}

/* Records written one by one (shoal_xfer_send) that break a transfer's
 * rules; the receiver's answer to each sequence. */
struct step {
    uint8_t type;
    uint64_t id, offset;
    uint32_t len;
};

static int bad_transfer(unsigned flags, const struct step *steps, size_t n, shoal_xfer **keep_xc,
                        shoal_xfer **keep_xs, int fd[2])
{
    unix_pair(fd);
    shoal_xfer *xc, *xs;
    connect_xfer(fd, flags, &xc, &xs);
    shoal_xfer_set_idle_timeout(xs, 2000);
    static uint8_t payload[1000];
    for (size_t i = 0; i < n; i++) {
        shoal_xfer_hdr h = {.type = steps[i].type, .id = steps[i].id, .offset = steps[i].offset};
        cr_assert_eq(shoal_xfer_send(xc, &h, payload, steps[i].len), 0, "step %zu", i);
    }
    struct sinkctx k;
    sinkctx_init(&k, 1000);
    int rc = shoal_xfer_recv_buffer(xs, NULL, 1000, accept_cb, &k, NULL);
    free(k.dst);
    if (keep_xc) {
        *keep_xc = xc;
        *keep_xs = xs;
    } else {
        shoal_xfer_close(xc);
        shoal_xfer_close(xs);
        close_pair(fd);
    }
    return rc;
}

static int bad_seq(unsigned flags, const struct step *steps, size_t n)
{
    int fd[2];
    return bad_transfer(flags, steps, n, NULL, NULL, fd);
}

#define BAD(flags, ...)                                                                                      \
    bad_seq(flags, (const struct step[]){__VA_ARGS__},                                                       \
            sizeof((const struct step[]){__VA_ARGS__}) / sizeof(struct step))

static void out_of_place(unsigned flags)
{
    const uint8_t B = SHOAL_XFER_BEGIN, D = SHOAL_XFER_DATA, E = SHOAL_XFER_END;
    /* A payload longer than BEGIN's total. */
    cr_assert_eq(BAD(flags, {B, 1, 100, 0}, {D, 1, 0, 200}), -EMSGSIZE);
    cr_assert_eq(BAD(flags, {B, 1, 300, 0}, {D, 1, 0, 200}, {D, 1, 200, 101}), -EMSGSIZE);
    /* Not at the next offset; empty; another transfer's; END early or late. */
    cr_assert_eq(BAD(flags, {B, 1, 300, 0}, {D, 1, 10, 100}), -EPROTO);
    cr_assert_eq(BAD(flags, {B, 1, 300, 0}, {D, 1, 0, 0}), -EPROTO);
    cr_assert_eq(BAD(flags, {B, 1, 300, 0}, {D, 2, 0, 100}), -EPROTO);
    cr_assert_eq(BAD(flags, {B, 1, 300, 0}, {D, 1, 0, 100}, {E, 1, 300, 0}), -EPROTO);
    cr_assert_eq(BAD(flags, {B, 1, 100, 0}, {D, 1, 0, 100}, {E, 1, 99, 0}), -EPROTO);
    /* A second BEGIN, a caller's record, or DATA before any BEGIN. */
    cr_assert_eq(BAD(flags, {B, 1, 100, 0}, {B, 1, 100, 0}), -EPROTO);
    cr_assert_eq(BAD(flags, {B, 1, 100, 0}, {SHOAL_XFER_APP, 1, 0, 0}), -EPROTO);
    cr_assert_eq(BAD(flags, {D, 1, 0, 100}), -EPROTO);
    /* And the good sequence, for contrast. */
    cr_assert_eq(BAD(flags, {B, 1, 150, 0}, {D, 1, 0, 100}, {D, 1, 100, 50}, {E, 1, 150, 0}), 0);
}

Test(xfer, records_out_of_place_refused_encrypted)
{
    out_of_place(ENC);
}

Test(xfer, records_out_of_place_refused_plain)
{
    out_of_place(0);
}

Test(xfer, refused_transfer_is_read_to_its_end)
{
    int fd[2];
    unix_pair(fd);
    shoal_xfer *xc, *xs;
    connect_xfer(fd, ENC, &xc, &xs);
    size_t len = 300000;
    uint8_t *src = xmalloc(len);
    fill(src, len, 8);
    struct sinkctx k;
    sinkctx_init(&k, len);
    k.refuse = -ENOMEM;
    struct sender s;
    send_start(&s, xc, 1, src, len, 8192);
    cr_assert_eq(shoal_xfer_recv_buffer(xs, NULL, 1000, accept_cb, &k, NULL), -ECANCELED);
    pthread_join(s.t, NULL);
    cr_assert_eq(s.rc, 0);
    cr_assert_eq(k.calls, 1);
    /* Too large for the memory offered: refused the same way. */
    k.refuse = 0;
    k.cap = len - 1;
    send_start(&s, xc, 2, src, len, 8192);
    cr_assert_eq(shoal_xfer_recv_buffer(xs, NULL, 1000, accept_cb, &k, NULL), -ECANCELED);
    pthread_join(s.t, NULL);
    /* The connection goes on: the next transfer arrives whole. */
    k.cap = len;
    free(k.dst);
    transfer_ok(xc, xs, len, 8192, 3);
    free(src);
    shoal_xfer_close(xc);
    shoal_xfer_close(xs);
    close_pair(fd);
}

static int accept_bad_route(void *ctx, const shoal_xfer_begin *b, shoal_xfer_sink *sink)
{
    (void)b;
    static shoal_xfer_route r;
    r = (shoal_xfer_route){.conn = ctx};
    sink->routes = &r;
    sink->nroutes = 1;
    return 0;
}

Test(xfer, route_to_itself_is_refused)
{
    int fd[2];
    unix_pair(fd);
    shoal_xfer *xc, *xs;
    connect_xfer(fd, 0, &xc, &xs);
    uint8_t src[5000];
    fill(src, sizeof src, 1);
    cr_assert_eq(shoal_xfer_send_buffer(xc, 1, NULL, 0, src, sizeof src, 1000), 0);
    cr_assert_eq(shoal_xfer_recv_buffer(xs, NULL, 1000, accept_bad_route, xs, NULL), -EINVAL);
    transfer_ok(xc, xs, 5000, 1000, 2);
    shoal_xfer_close(xc);
    shoal_xfer_close(xs);
    close_pair(fd);
}

Test(xfer, abort_is_reported_and_connection_goes_on)
{
    const struct step s[] = {
        {SHOAL_XFER_BEGIN, 1, 1000, 0}, {SHOAL_XFER_DATA, 1, 0, 500}, {SHOAL_XFER_ABORT, 1, 500, 0}};
    int fd[2];
    shoal_xfer *xc, *xs;
    cr_assert_eq(bad_transfer(ENC, s, 3, &xc, &xs, fd), -ECONNABORTED);
    transfer_ok(xc, xs, 1000, 300, 2);
    shoal_xfer_close(xc);
    shoal_xfer_close(xs);
    close_pair(fd);
}

/* ------------------------------------------------------------------------ */
/* Forwarding. */

/* A -> B -> C -> D, each hop another mode: B and C keep the bytes and pass
 * them on, D keeps them; every copy is the sender's. */
Test(xfer, chain_of_three_hops)
{
    int ab[2], bc[2], cd[2];
    unix_pair(ab);
    tcp_pair(bc);
    unix_pair(cd);
    shoal_xfer *a, *b_in, *b_out, *c_in, *c_out, *d;
    connect_xfer(ab, ENC, &a, &b_in);
    connect_xfer(bc, ENC | SHOAL_XFER_CHACHA, &b_out, &c_in);
    connect_xfer(cd, 0, &c_out, &d);
    size_t len = (8u << 20) + 5;
    uint8_t *src = xmalloc(len);
    fill(src, len, 12);

    struct sinkctx kb, kc, kd;
    sinkctx_init(&kb, len);
    sinkctx_init(&kc, len);
    sinkctx_init(&kd, len);
    shoal_xfer_route rb = {.conn = b_out, .meta = "to C", .metalen = 4, .status = 1};
    shoal_xfer_route rc_ = {.conn = c_out, .meta = "to D", .metalen = 4, .status = 1};
    kb.routes = &rb;
    kb.nroutes = 1;
    kc.routes = &rc_;
    kc.nroutes = 1;
    struct receiver B, C, D;
    recv_start(&B, b_in, &kb);
    recv_start(&C, c_in, &kc);
    recv_start(&D, d, &kd);
    cr_assert_eq(shoal_xfer_send_buffer(a, 55, "to B", 4, src, len, 256u << 10), 0);
    pthread_join(B.t, NULL);
    pthread_join(C.t, NULL);
    pthread_join(D.t, NULL);
    cr_assert_eq(B.rc, 0, "B: %s", shoal_xfer_strerror(B.rc));
    cr_assert_eq(C.rc, 0, "C: %s", shoal_xfer_strerror(C.rc));
    cr_assert_eq(D.rc, 0, "D: %s", shoal_xfer_strerror(D.rc));
    cr_assert_eq(rb.status, 0);
    cr_assert_eq(rc_.status, 0);
    cr_assert_eq(memcmp(kb.meta, "to B", 4), 0);
    cr_assert_eq(memcmp(kc.meta, "to C", 4), 0);
    cr_assert_eq(memcmp(kd.meta, "to D", 4), 0);
    cr_assert_eq(kd.id, 55);
    cr_assert_eq(memcmp(kb.dst, src, len), 0);
    cr_assert_eq(memcmp(kc.dst, src, len), 0);
    cr_assert_eq(memcmp(kd.dst, src, len), 0);
    free(kb.dst);
    free(kc.dst);
    free(kd.dst);
    free(src);
    shoal_xfer *all[] = {a, b_in, b_out, c_in, c_out, d};
    for (size_t i = 0; i < 6; i++)
        shoal_xfer_close(all[i]);
    close_pair(ab);
    close_pair(bc);
    close_pair(cd);
}

/* B passes the bytes to two hosts at once, and keeps none itself. */
Test(xfer, fan_out_to_two_routes_without_keeping)
{
    int ab[2], bc[2], bd[2];
    unix_pair(ab);
    unix_pair(bc);
    unix_pair(bd);
    shoal_xfer *a, *b_in, *b_c, *b_d, *c, *d;
    connect_xfer(ab, ENC, &a, &b_in);
    connect_xfer(bc, ENC, &b_c, &c);
    connect_xfer(bd, 0, &b_d, &d);
    size_t len = (3u << 20) + 1;
    uint8_t *src = xmalloc(len);
    fill(src, len, 13);
    struct sinkctx kb, kc, kd;
    sinkctx_init(&kb, len);
    kb.keep = false;
    sinkctx_init(&kc, len);
    sinkctx_init(&kd, len);
    shoal_xfer_route routes[2] = {{.conn = b_c}, {.conn = b_d}};
    kb.routes = routes;
    kb.nroutes = 2;
    struct receiver B, C, D;
    recv_start(&B, b_in, &kb);
    recv_start(&C, c, &kc);
    recv_start(&D, d, &kd);
    cr_assert_eq(shoal_xfer_send_buffer(a, 1, NULL, 0, src, len, 0), 0);
    pthread_join(B.t, NULL);
    pthread_join(C.t, NULL);
    pthread_join(D.t, NULL);
    cr_assert_eq(B.rc, 0);
    cr_assert_eq(C.rc, 0);
    cr_assert_eq(D.rc, 0);
    cr_assert_eq(routes[0].status, 0);
    cr_assert_eq(routes[1].status, 0);
    cr_assert_eq(kc.metalen, 0);
    cr_assert_eq(memcmp(kc.dst, src, len), 0);
    cr_assert_eq(memcmp(kd.dst, src, len), 0);
    free(kb.dst);
    free(kc.dst);
    free(kd.dst);
    free(src);
    shoal_xfer *all[] = {a, b_in, b_c, b_d, c, d};
    for (size_t i = 0; i < 6; i++)
        shoal_xfer_close(all[i]);
    close_pair(ab);
    close_pair(bc);
    close_pair(bd);
}

/* The next hop is gone: B still gets everything, and the route says why it
 * was dropped. */
Test(xfer, dead_route_is_dropped_and_the_rest_arrives)
{
    int ab[2], bc[2];
    unix_pair(ab);
    unix_pair(bc);
    shoal_xfer *a, *b_in, *b_out, *c;
    connect_xfer(ab, ENC, &a, &b_in);
    connect_xfer(bc, ENC, &b_out, &c);
    shoal_xfer_close(c);
    close(bc[1]);
    size_t len = 2u << 20;
    uint8_t *src = xmalloc(len);
    fill(src, len, 14);
    struct sinkctx kb;
    sinkctx_init(&kb, len);
    shoal_xfer_route r = {.conn = b_out};
    kb.routes = &r;
    kb.nroutes = 1;
    struct receiver B;
    recv_start(&B, b_in, &kb);
    cr_assert_eq(shoal_xfer_send_buffer(a, 1, NULL, 0, src, len, 65536), 0);
    pthread_join(B.t, NULL);
    cr_assert_eq(B.rc, 0);
    cr_assert(r.status == -EPIPE || r.status == -ECONNRESET, "status %d", r.status);
    cr_assert_eq(memcmp(kb.dst, src, len), 0);
    free(kb.dst);
    free(src);
    shoal_xfer_close(a);
    shoal_xfer_close(b_in);
    shoal_xfer_close(b_out);
    close_pair(ab);
    close(bc[0]);
}

/* A dies mid-transfer: B fails, and C hears ABORT from B at once instead
 * of waiting out its idle bound. */
Test(xfer, upstream_failure_aborts_downstream)
{
    int ab[2], bc[2];
    unix_pair(ab);
    unix_pair(bc);
    shoal_xfer *a, *b_in, *b_out, *c;
    connect_xfer(ab, ENC, &a, &b_in);
    connect_xfer(bc, ENC, &b_out, &c);
    struct sinkctx kb, kc;
    sinkctx_init(&kb, 100000);
    sinkctx_init(&kc, 100000);
    shoal_xfer_route r = {.conn = b_out};
    kb.routes = &r;
    kb.nroutes = 1;
    struct receiver B, C;
    recv_start(&B, b_in, &kb);
    recv_start(&C, c, &kc);
    static uint8_t part[1000];
    shoal_xfer_hdr h = {.type = SHOAL_XFER_BEGIN, .id = 3, .offset = 100000};
    cr_assert_eq(shoal_xfer_send(a, &h, NULL, 0), 0);
    h = (shoal_xfer_hdr){.type = SHOAL_XFER_DATA, .id = 3, .offset = 0};
    cr_assert_eq(shoal_xfer_send(a, &h, part, sizeof part), 0);
    int64_t t0 = shoal_now_ns();
    shutdown(ab[0], SHUT_RDWR);
    pthread_join(B.t, NULL);
    pthread_join(C.t, NULL);
    cr_assert_eq(B.rc, -ECONNRESET, "B: %s", shoal_xfer_strerror(B.rc));
    cr_assert_eq(C.rc, -ECONNABORTED, "C: %s", shoal_xfer_strerror(C.rc));
    cr_assert_lt(ms_since(t0), 2000);
    free(kb.dst);
    free(kc.dst);
    shoal_xfer *all[] = {a, b_in, b_out, c};
    for (size_t i = 0; i < 4; i++)
        shoal_xfer_close(all[i]);
    close_pair(ab);
    close_pair(bc);
}

/* ------------------------------------------------------------------------ */
/* Peers that vanish or stall. */

Test(xfer, sender_vanishes_mid_transfer)
{
    int fd[2];
    tcp_pair(fd);
    shoal_xfer *xc, *xs;
    connect_xfer(fd, ENC, &xc, &xs);
    static uint8_t part[4096];
    shoal_xfer_hdr h = {.type = SHOAL_XFER_BEGIN, .id = 1, .offset = 1u << 20};
    cr_assert_eq(shoal_xfer_send(xc, &h, NULL, 0), 0);
    h = (shoal_xfer_hdr){.type = SHOAL_XFER_DATA, .id = 1, .offset = 0};
    cr_assert_eq(shoal_xfer_send(xc, &h, part, sizeof part), 0);
    shutdown(fd[0], SHUT_RDWR);
    struct sinkctx k;
    sinkctx_init(&k, 1u << 20);
    int64_t t0 = shoal_now_ns();
    int rc = shoal_xfer_recv_buffer(xs, NULL, 1000, accept_cb, &k, NULL);
    cr_assert_eq(rc, -ECONNRESET, "%s", shoal_xfer_strerror(rc));
    cr_assert_lt(ms_since(t0), 2000);
    free(k.dst);
    shoal_xfer_close(xc);
    shoal_xfer_close(xs);
    close_pair(fd);
}

/* A header cut in the middle is a reset too, not a hang. */
Test(xfer, record_cut_mid_header)
{
    struct relay r = relay_none();
    r.drop_from = HANDSHAKE_BYTES + 20; /* the rest of the first record */
    r.drop_len = 1 << 20;
    int c[2], s[2];
    relay_start(&r, c, s);
    shoal_xfer *xc, *xs;
    int pair[2] = {c[0], s[0]};
    connect_xfer(pair, 0, &xc, &xs);
    shoal_xfer_hdr h = {.type = SHOAL_XFER_APP};
    cr_assert_eq(shoal_xfer_send(xc, &h, NULL, 0), 0);
    shutdown(c[0], SHUT_WR);
    cr_assert_eq(shoal_xfer_recv_hdr(xs, &h, 2000), -ECONNRESET);
    shoal_xfer_close(xc);
    shoal_xfer_close(xs);
    relay_stop(&r, c, s);
    free(r.rec);
}

Test(xfer, receiver_vanishes_mid_transfer)
{
    int fd[2];
    tcp_pair(fd);
    shoal_xfer *xc, *xs;
    connect_xfer(fd, ENC, &xc, &xs);
    size_t len = 64u << 20;
    uint8_t *src = xmalloc(len);
    memset(src, 1, len);
    struct sender s;
    send_start(&s, xc, 1, src, len, 0);
    shoal_xfer_hdr h;
    cr_assert_eq(shoal_xfer_recv_hdr(xs, &h, 2000), 0);
    cr_assert_eq(h.type, SHOAL_XFER_BEGIN);
    /* Its process ends: the socket is closed with data unread, and the
     * kernel resets the connection. (A shutdown alone would leave the
     * window shut and the sender waiting out its idle bound.) */
    close(fd[1]);
    int64_t t0 = shoal_now_ns();
    pthread_join(s.t, NULL);
    cr_assert(s.rc == -EPIPE || s.rc == -ECONNRESET, "%s", shoal_xfer_strerror(s.rc));
    cr_assert_lt(ms_since(t0), 5000);
    /* Sticky: the next send says the same. */
    h = (shoal_xfer_hdr){.type = SHOAL_XFER_APP};
    cr_assert_eq(shoal_xfer_send(xc, &h, NULL, 0), s.rc);
    free(src);
    shoal_xfer_close(xc);
    shoal_xfer_close(xs);
    close(fd[0]);
}

Test(xfer, stalled_sender_times_out)
{
    int fd[2];
    unix_pair(fd);
    shoal_xfer *xc, *xs;
    connect_xfer(fd, ENC, &xc, &xs);
    shoal_xfer_hdr h;
    /* Nothing there: a harmless timeout, at once for 0. */
    int64_t t0 = shoal_now_ns();
    cr_assert_eq(shoal_xfer_recv_hdr(xs, &h, 0), -ETIMEDOUT);
    cr_assert_eq(shoal_xfer_recv_hdr(xs, &h, 100), -ETIMEDOUT);
    cr_assert_geq(ms_since(t0), 99);
    /* BEGIN, then silence: the idle bound ends the transfer. */
    h = (shoal_xfer_hdr){.type = SHOAL_XFER_BEGIN, .id = 1, .offset = 1000};
    cr_assert_eq(shoal_xfer_send(xc, &h, NULL, 0), 0);
    shoal_xfer_set_idle_timeout(xs, 300);
    struct sinkctx k;
    sinkctx_init(&k, 1000);
    t0 = shoal_now_ns();
    cr_assert_eq(shoal_xfer_recv_buffer(xs, NULL, 1000, accept_cb, &k, NULL), -ETIMEDOUT);
    cr_assert_geq(ms_since(t0), 290);
    cr_assert_lt(ms_since(t0), 3000);
    free(k.dst);
    shoal_xfer_close(xc);
    shoal_xfer_close(xs);
    close_pair(fd);
}

Test(xfer, shutdown_is_told_apart_from_a_cut)
{
    int fd[2];
    unix_pair(fd);
    shoal_xfer *xc, *xs;
    connect_xfer(fd, ENC, &xc, &xs);
    shoal_xfer_hdr h = {.type = SHOAL_XFER_APP};
    cr_assert_eq(shoal_xfer_shutdown(xc), 0);
    cr_assert_eq(shoal_xfer_send(xc, &h, NULL, 0), -EPIPE);
    cr_assert_eq(shoal_xfer_recv_hdr(xs, &h, 1000), -ESHUTDOWN);
    cr_assert_eq(shoal_xfer_recv_hdr(xs, &h, 1000), -ESHUTDOWN);
    /* The other direction is still open: a half-close. */
    h = (shoal_xfer_hdr){.type = SHOAL_XFER_APP, .id = 4};
    cr_assert_eq(shoal_xfer_send(xs, &h, NULL, 0), 0);
    cr_assert_eq(shoal_xfer_recv_hdr(xc, &h, 1000), 0);
    cr_assert_eq(h.id, 4);
    /* An end without CLOSE. */
    shutdown(fd[1], SHUT_WR);
    cr_assert_eq(shoal_xfer_recv_hdr(xc, &h, 1000), -ECONNRESET);
    shoal_xfer_close(xc);
    shoal_xfer_close(xs);
    close_pair(fd);
}

/* ------------------------------------------------------------------------ */
/* Misuse, and the header decoder. */

Test(xfer, payload_calls_in_the_wrong_order)
{
    int fd[2];
    unix_pair(fd);
    shoal_xfer *xc, *xs;
    connect_xfer(fd, ENC, &xc, &xs);
    shoal_xfer_hdr h = {.type = SHOAL_XFER_APP};
    uint8_t buf[100];
    cr_assert_eq(shoal_xfer_send(xc, &h, "abcdefghij", 10), 0);
    cr_assert_eq(shoal_xfer_send(xc, &h, "0123456789", 10), 0);
    cr_assert_eq(shoal_xfer_send(xc, &h, "xyz", 3), 0);
    cr_assert_eq(shoal_xfer_recv_payload(xs, buf, 10), -EINVAL); /* nothing pending */
    cr_assert_eq(shoal_xfer_recv_hdr(xs, &h, 1000), 0);
    cr_assert_eq(shoal_xfer_recv_hdr(xs, &h, 1000), -EBUSY);
    cr_assert_eq(shoal_xfer_recv_payload(xs, buf, 9), -EINVAL);
    cr_assert_eq(shoal_xfer_recv_payload(xs, buf, 11), -EINVAL);
    cr_assert_eq(shoal_xfer_recv_payload(xs, buf, 10), 0);
    cr_assert_eq(memcmp(buf, "abcdefghij", 10), 0);
    cr_assert_eq(shoal_xfer_recv_hdr(xs, &h, 1000), 0);
    cr_assert_eq(shoal_xfer_skip_payload(xs), 0);
    cr_assert_eq(shoal_xfer_skip_payload(xs), 0); /* nothing pending: nothing to do */
    cr_assert_eq(shoal_xfer_recv_hdr(xs, &h, 1000), 0);
    cr_assert_eq(h.seq, 2);
    cr_assert_eq(shoal_xfer_recv_payload(xs, buf, 3), 0);
    cr_assert_eq(memcmp(buf, "xyz", 3), 0);
    shoal_xfer_close(xc);
    shoal_xfer_close(xs);
    close_pair(fd);
}

Test(xfer, send_rejects_what_the_peer_would)
{
    int fd[2];
    unix_pair(fd);
    shoal_xfer *xc, *xs;
    connect_xfer(fd, ENC, &xc, &xs);
    uint8_t *big = xmalloc(SHOAL_XFER_MAX_RECORD + 1);
    shoal_xfer_hdr h = {.type = 0};
    cr_assert_eq(shoal_xfer_send(xc, &h, NULL, 0), -EINVAL);
    h.type = SHOAL_XFER_CLOSE;
    cr_assert_eq(shoal_xfer_send(xc, &h, NULL, 0), -EINVAL);
    h.type = SHOAL_XFER_CLOSE + 1;
    cr_assert_eq(shoal_xfer_send(xc, &h, NULL, 0), -EINVAL);
    h.type = SHOAL_XFER_END;
    cr_assert_eq(shoal_xfer_send(xc, &h, big, 1), -EINVAL);
    h.type = SHOAL_XFER_DATA;
    h.flags = 1;
    cr_assert_eq(shoal_xfer_send(xc, &h, big, 1), -EINVAL);
    h.flags = 0;
    cr_assert_eq(shoal_xfer_send(xc, &h, NULL, 1), -EINVAL);
    cr_assert_eq(shoal_xfer_send(xc, &h, big, SHOAL_XFER_MAX_RECORD + 1), -EMSGSIZE);
    h.type = SHOAL_XFER_BEGIN;
    cr_assert_eq(shoal_xfer_send(xc, &h, big, SHOAL_XFER_MAX_META + 1), -EMSGSIZE);
    cr_assert_eq(shoal_xfer_send_buffer(xc, 1, NULL, 0, big, 10, SHOAL_XFER_MAX_RECORD + 1), -EMSGSIZE);
    cr_assert_eq(shoal_xfer_send_buffer(xc, 1, NULL, 0, NULL, 10, 0), -EINVAL);
    /* None of these harmed the connection; the largest record goes. */
    memset(big, 3, SHOAL_XFER_MAX_RECORD);
    shoal_xfer_hdr got;
    /* The socket cannot hold 16 MiB: send it from a thread. */
    struct sender one;
    send_start(&one, xc, 0, big, SHOAL_XFER_MAX_RECORD, SHOAL_XFER_MAX_RECORD);
    cr_assert_eq(shoal_xfer_recv_hdr(xs, &got, 1000), 0);
    cr_assert_eq(got.type, SHOAL_XFER_BEGIN);
    cr_assert_eq(shoal_xfer_recv_hdr(xs, &got, 1000), 0);
    cr_assert_eq(got.length, SHOAL_XFER_MAX_RECORD);
    cr_assert_eq(shoal_xfer_skip_payload(xs), 0);
    cr_assert_eq(shoal_xfer_recv_hdr(xs, &got, 1000), 0);
    cr_assert_eq(got.type, SHOAL_XFER_END);
    pthread_join(one.t, NULL);
    cr_assert_eq(one.rc, 0);
    free(big);
    shoal_xfer_close(xc);
    shoal_xfer_close(xs);
    close_pair(fd);
}

/* A peer that holds the key but breaks the rules (shoal__xfer_send_raw
 * seals any header bytes): the receiver's answer to one record. */
static int raw_record(unsigned flags, const shoal_xfer_hdr *h, uint8_t reserved, const void *payload,
                      size_t len)
{
    int fd[2];
    unix_pair(fd);
    shoal_xfer *xc, *xs;
    connect_xfer(fd, flags, &xc, &xs);
    shoal_xfer_set_idle_timeout(xs, 1000);
    /* A good record first: the bad one is not the first of the stream. */
    shoal_xfer_hdr ok = {.type = SHOAL_XFER_APP};
    cr_assert_eq(shoal_xfer_send(xc, &ok, "x", 1), 0);
    uint8_t raw[SHOAL_XFER_HDR];
    shoal__xfer_hdr_encode(h, raw);
    raw[1] = reserved;
    cr_assert_eq(shoal__xfer_send_raw(xc, raw, payload, len), 0);
    shutdown(fd[0], SHUT_WR);
    shoal_xfer_hdr got;
    uint8_t one;
    cr_assert_eq(shoal_xfer_recv_hdr(xs, &got, 1000), 0);
    cr_assert_eq(shoal_xfer_recv_payload(xs, &one, 1), 0);
    int rc = shoal_xfer_recv_hdr(xs, &got, 1000);
    if (rc == 0 && got.length > 0) {
        uint8_t *p = xmalloc(got.length);
        rc = shoal_xfer_recv_payload(xs, p, got.length);
        free(p);
    }
    shoal_xfer_close(xc);
    shoal_xfer_close(xs);
    close_pair(fd);
    return rc;
}

static void rule_breaks(unsigned flags)
{
    static uint8_t payload[SHOAL_XFER_MAX_META + 1];
    shoal_xfer_hdr h = {.type = SHOAL_XFER_APP, .seq = 1, .length = 10};
    /* The control: a good record this way is taken. */
    cr_assert_eq(raw_record(flags, &h, 0, payload, 10), 0);
    h.type = SHOAL_XFER_CLOSE + 1; /* unknown type */
    cr_assert_eq(raw_record(flags, &h, 0, payload, 10), -EPROTO);
    h.type = SHOAL_XFER_APP;
    cr_assert_eq(raw_record(flags, &h, 1, payload, 10), -EPROTO); /* reserved byte */
    h = (shoal_xfer_hdr){.type = SHOAL_XFER_DATA, .flags = 2, .seq = 1, .length = 10};
    cr_assert_eq(raw_record(flags, &h, 0, payload, 10), -EPROTO); /* flags on a library type */
    h = (shoal_xfer_hdr){.type = SHOAL_XFER_END, .seq = 1, .length = 10};
    cr_assert_eq(raw_record(flags, &h, 0, payload, 10), -EPROTO); /* a payload on END */
    h = (shoal_xfer_hdr){.type = SHOAL_XFER_APP, .seq = 1, .length = SHOAL_XFER_MAX_RECORD + 1};
    cr_assert_eq(raw_record(flags, &h, 0, NULL, 0), -EMSGSIZE); /* refused at the header */
    h = (shoal_xfer_hdr){.type = SHOAL_XFER_BEGIN, .seq = 1, .length = SHOAL_XFER_MAX_META + 1};
    cr_assert_eq(raw_record(flags, &h, 0, payload, sizeof payload), -EMSGSIZE);
    h = (shoal_xfer_hdr){.type = SHOAL_XFER_APP, .seq = 2, .length = 10};
    cr_assert_eq(raw_record(flags, &h, 0, payload, 10), -EBADMSG); /* authentic, but another number */
    /* A length that is not the payload's: the stream is out of step, and
     * the next header (or the payload's tag) fails. */
    h = (shoal_xfer_hdr){.type = SHOAL_XFER_APP, .seq = 1, .length = 100};
    int rc = raw_record(flags, &h, 0, payload, 50);
    cr_assert(rc == -EBADMSG || rc == -ECONNRESET, "%s", shoal_xfer_strerror(rc));
}

Test(xfer, authentic_records_that_break_the_rules_encrypted)
{
    rule_breaks(ENC);
}

Test(xfer, authentic_records_that_break_the_rules_plain)
{
    rule_breaks(0);
}

Test(xfer, header_decoder_checks)
{
    shoal_xfer_hdr h = {.type = SHOAL_XFER_DATA, .length = 5, .seq = 7, .id = 8, .offset = 9}, back;
    uint8_t raw[SHOAL_XFER_HDR];
    shoal__xfer_hdr_encode(&h, raw);
    cr_assert_eq(shoal__xfer_hdr_decode(raw, &back), 0);
    cr_assert_eq(back.seq, 7);
    cr_assert_eq(back.offset, 9);
    raw[1] = 1; /* reserved */
    cr_assert_eq(shoal__xfer_hdr_decode(raw, &back), -EPROTO);
    static const struct {
        uint8_t type;
        uint16_t flags;
        uint32_t length;
        int rc;
    } cases[] = {
        {0, 0, 0, -EPROTO},
        {6, 0, 0, -EPROTO},
        {127, 0, 0, -EPROTO},
        {SHOAL_XFER_APP, 0xffff, 0, 0},
        {255, 0, SHOAL_XFER_MAX_RECORD, 0},
        {255, 0, SHOAL_XFER_MAX_RECORD + 1, -EMSGSIZE},
        {SHOAL_XFER_DATA, 1, 0, -EPROTO},
        {SHOAL_XFER_BEGIN, 0, SHOAL_XFER_MAX_META, 0},
        {SHOAL_XFER_BEGIN, 0, SHOAL_XFER_MAX_META + 1, -EMSGSIZE},
        {SHOAL_XFER_END, 0, 1, -EPROTO},
        {SHOAL_XFER_ABORT, 0, 1, -EPROTO},
        {SHOAL_XFER_CLOSE, 0, 1, -EPROTO},
        {SHOAL_XFER_CLOSE, 0, 0, 0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        h = (shoal_xfer_hdr){.type = cases[i].type, .flags = cases[i].flags, .length = cases[i].length};
        shoal__xfer_hdr_encode(&h, raw);
        cr_assert_eq(shoal__xfer_hdr_decode(raw, &back), cases[i].rc, "case %zu", i);
    }
    cr_assert_str_neq(shoal_xfer_strerror(-EACCES), shoal_xfer_strerror(-EPROTO));
}

Test(xfer, endpoints_split_and_refuse)
{
    char host[64], port[8];
    cr_assert_eq(shoal_xfer_endpoint_split("tcp://10.0.0.1:5555", host, sizeof host, port, sizeof port), 0);
    cr_assert_str_eq(host, "10.0.0.1");
    cr_assert_str_eq(port, "5555");
    cr_assert_eq(shoal_xfer_endpoint_split("tcp://[::1]:80", host, sizeof host, port, sizeof port), 0);
    cr_assert_str_eq(host, "::1");
    cr_assert_str_eq(port, "80");
    const char *bad[] = {"10.0.0.1:5555", "udp://10.0.0.1:1", "tcp://10.0.0.1", "tcp://:80", "tcp://h:",
                         "tcp://h:123456789"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++)
        cr_assert_eq(shoal_xfer_endpoint_split(bad[i], host, sizeof host, port, sizeof port), -EINVAL, "%s", bad[i]);
    char tiny[4];
    cr_assert_eq(shoal_xfer_endpoint_split("tcp://10.0.0.1:1", tiny, sizeof tiny, port, sizeof port), -EINVAL);
}

Test(xfer, connect_reaches_a_listener_and_says_why_not)
{
    int l = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    cr_assert_eq(bind(l, (struct sockaddr *)&a, sizeof a), 0);
    cr_assert_eq(listen(l, 1), 0);
    socklen_t al = sizeof a;
    getsockname(l, (struct sockaddr *)&a, &al);
    char ep[64];
    snprintf(ep, sizeof ep, "tcp://127.0.0.1:%u", (unsigned)ntohs(a.sin_port));
    int fd = shoal_xfer_connect(ep, 2000);
    cr_assert_geq(fd, 0, "%s", strerror(-fd));
    close(fd);
    close(l); /* nobody listens there now */
    cr_assert_eq(shoal_xfer_connect(ep, 2000), -ECONNREFUSED);
    cr_assert_eq(shoal_xfer_connect("127.0.0.1:1", 2000), -EINVAL);
    cr_assert_eq(shoal_xfer_connect("tcp://no-such-host.invalid:1", 2000), -EHOSTUNREACH);
}
