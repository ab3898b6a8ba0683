/*
 * bench/xfer_bench.c - throughput of the bulk channel (bridge/xfer.c) over
 * loopback TCP, against plain send/recv of the same bytes in the same run.
 *
 * Every case moves one buffer (1 GiB by default) from memory to memory:
 * plain send/recv (the limit: one copy in, one copy out, no framing), then
 * shoal_xfer_send_buffer/recv_buffer plain, AES-256-GCM and ChaCha20-Poly1305
 * with chunks of 256 KiB, 1 MiB and 4 MiB, then a chain of three hops
 * (A -> B -> C -> D, B and C forwarding each record as it arrives) against
 * one hop and against store-and-forward (the three hops one after the
 * other), and last what one core seals and opens in memory (no sockets).
 * Each side is a thread of this process; the destinations are faulted in
 * first, as arena blocks are. The machines here are shared and noisy, so
 * the cases run in rounds (-n, 3), every case once a round, and each rate
 * is also taken as a ratio to send/recv's in the same round. One line a
 * case: the median, lowest and highest rate over the rounds, and the median
 * of its ratios to send/recv.
 *
 *   xfer_bench [-s MiB] [-n rounds] [-p MB/s] [-q]
 *
 * -q: one hop with 1 MiB chunks only. -p: every TCP connection paces itself
 * to that rate (SO_MAX_PACING_RATE), a link slower than the CPUs: on this
 * 2-core machine the four hosts of a chain otherwise share two cores, and
 * the chain measures CPU sharing rather than pipelining.
 */
#define _GNU_SOURCE
#include <shoal/xfer.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_RUNS 32

static uint8_t key[SHOAL_XFER_KEY];
static size_t total;
static uint8_t *src;
static uint8_t *dst[3]; /* B, C, D */
static unsigned pace;   /* bytes per second a connection may send (-p); 0: as fast as it can */

static double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static void die(const char *what, int rc)
{
    fprintf(stderr, "xfer_bench: %s: %s\n", what, rc < 0 ? shoal_xfer_strerror(rc) : strerror(errno));
    exit(1);
}

/* fd[0] connected to fd[1] over 127.0.0.1. */
static void tcp_pair(int fd[2])
{
    int l = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t alen = sizeof a;
    if (l < 0 || bind(l, (struct sockaddr *)&a, sizeof a) < 0 || listen(l, 1) < 0 ||
        getsockname(l, (struct sockaddr *)&a, &alen) < 0)
        die("listen", 0);
    fd[0] = socket(AF_INET, SOCK_STREAM, 0);
    if (fd[0] < 0 || connect(fd[0], (struct sockaddr *)&a, sizeof a) < 0)
        die("connect", 0);
    fd[1] = accept(l, NULL, NULL);
    if (fd[1] < 0)
        die("accept", 0);
    close(l);
    /* TCP paces itself to this rate (no qdisc is touched): a link of that
     * speed per connection, so that the CPUs are not what limits a hop. */
    for (int i = 0; i < 2 && pace; i++)
        if (setsockopt(fd[i], SOL_SOCKET, SO_MAX_PACING_RATE, &pace, sizeof pace) < 0)
            die("SO_MAX_PACING_RATE", 0);
}

/* ------------------------------------------------------------------------ */
/* Plain send/recv. */

struct raw {
    int fd;
    uint8_t *buf;
};

static void *raw_recv(void *arg)
{
    struct raw *r = arg;
    size_t done = 0;
    while (done < total) {
        ssize_t n = recv(r->fd, r->buf + done, total - done, 0);
        if (n <= 0)
            die("recv", 0);
        done += (size_t)n;
    }
    return NULL;
}

static double run_raw(void)
{
    int fd[2];
    tcp_pair(fd);
    struct raw r = {fd[1], dst[0]};
    pthread_t t;
    pthread_create(&t, NULL, raw_recv, &r);
    double t0 = now_s();
    for (size_t off = 0; off < total;) {
        size_t n = total - off < (1u << 20) ? total - off : (1u << 20);
        ssize_t w = send(fd[0], src + off, n, MSG_NOSIGNAL);
        if (w <= 0)
            die("send", 0);
        off += (size_t)w;
    }
    pthread_join(t, NULL);
    double dt = now_s() - t0;
    close(fd[0]);
    close(fd[1]);
    return dt;
}

/* ------------------------------------------------------------------------ */
/* The channel: one hop, or a chain. */

struct opener {
    int fd, role;
    unsigned flags;
    shoal_xfer *x;
    int rc;
};

static void *open_main(void *arg)
{
    struct opener *o = arg;
    o->rc = shoal_xfer_open(o->fd, o->role, key, o->flags, 5000, &o->x);
    return NULL;
}

/* A connected pair of channels over a new TCP connection. */
static void connect_xfer(unsigned flags, int fd[2], shoal_xfer **client, shoal_xfer **server)
{
    tcp_pair(fd);
    struct opener s = {fd[1], SHOAL_XFER_SERVER, flags, NULL, 0},
                  c = {fd[0], SHOAL_XFER_CLIENT, flags, NULL, 0};
    pthread_t t;
    pthread_create(&t, NULL, open_main, &s);
    open_main(&c);
    pthread_join(t, NULL);
    if (c.rc < 0 || s.rc < 0)
        die("handshake", c.rc < 0 ? c.rc : s.rc);
    *client = c.x;
    *server = s.x;
}

struct hop {
    shoal_xfer *in;
    uint8_t *dst;
    shoal_xfer_route route; /* conn NULL: the last hop */
    int rc;
};

static int accept_hop(void *ctx, const shoal_xfer_begin *b, shoal_xfer_sink *sink)
{
    struct hop *h = ctx;
    if (b->total > total)
        return -ENOSPC;
    sink->dst = h->dst;
    if (h->route.conn) {
        sink->routes = &h->route;
        sink->nroutes = 1;
    }
    return 0;
}

static void *hop_main(void *arg)
{
    struct hop *h = arg;
    h->rc = shoal_xfer_recv_buffer(h->in, NULL, 10000, accept_hop, h, NULL);
    return NULL;
}

/* One transfer of from through hops receivers (1: A -> B; 3: A -> B -> C
 * -> D; the i-th keeps its copy in to[i]), timed from A's first byte until
 * the last receiver has all of it. */
static double run_xfer(unsigned flags, size_t chunk, int hops, const uint8_t *from, uint8_t **to)
{
    int fd[3][2];
    shoal_xfer *out[3] = {0}, *in[3] = {0};
    for (int i = 0; i < hops; i++)
        connect_xfer(flags, fd[i], &out[i], &in[i]);
    struct hop h[3];
    pthread_t t[3];
    for (int i = 0; i < hops; i++) {
        h[i] = (struct hop){.in = in[i], .dst = to[i], .route = {.conn = i + 1 < hops ? out[i + 1] : NULL}};
        pthread_create(&t[i], NULL, hop_main, &h[i]);
    }
    double t0 = now_s();
    int rc = shoal_xfer_send_buffer(out[0], 1, NULL, 0, from, total, chunk);
    if (rc < 0)
        die("send_buffer", rc);
    for (int i = 0; i < hops; i++)
        pthread_join(t[i], NULL);
    double dt = now_s() - t0;
    for (int i = 0; i < hops; i++) {
        if (h[i].rc < 0)
            die("recv_buffer", h[i].rc);
        if (h[i].route.status < 0)
            die("forward", h[i].route.status);
        shoal_xfer_close(out[i]);
        shoal_xfer_close(in[i]);
        close(fd[i][0]);
        close(fd[i][1]);
    }
    return dt;
}

/* ------------------------------------------------------------------------ */

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

/* The receivers' copies must be the sender's bytes. */
static void check(int hops)
{
    for (int i = 0; i < hops; i++)
        if (memcmp(dst[i], src, total) != 0) {
            fprintf(stderr, "xfer_bench: hop %d received other bytes\n", i + 1);
            exit(1);
        }
    for (int i = 0; i < hops; i++)
        memset(dst[i], 0, total);
}

/* The chain's peer: store and forward, each host sending on only once it
 * has the whole buffer (three one-hop transfers in turn). */
static double run_serial(unsigned flags, size_t chunk)
{
    double secs = 0;
    for (int h = 0; h < 3; h++)
        secs += run_xfer(flags, chunk, 1, h == 0 ? src : dst[h - 1], dst + h);
    return secs;
}

/* What one core seals and then opens per second in memory, 1 MiB at a
 * time, with the calls the channel makes (opening in place, with the right
 * tags): the bound encryption puts on a hop whose sender and receiver each
 * have a core of their own. */
static void run_crypto(int aes, double *seal, double *open)
{
    static crypto_aead_aes256gcm_state st;
    uint8_t k[32], nonce[12] = {0};
    const size_t chunk = 1u << 20, nchunks = (total + chunk - 1) / chunk;
    uint8_t (*tags)[16] = malloc(nchunks * 16);
    if (!tags)
        die("malloc", -ENOMEM);
    randombytes_buf(k, sizeof k);
    if (aes)
        crypto_aead_aes256gcm_beforenm(&st, k);
    double t0 = now_s();
    for (size_t c = 0; c < nchunks; c++) {
        size_t off = c * chunk, len = total - off < chunk ? total - off : chunk;
        if (aes)
            crypto_aead_aes256gcm_encrypt_detached_afternm(dst[0] + off, tags[c], NULL, src + off, len, NULL,
                                                           0, NULL, nonce, &st);
        else
            crypto_aead_chacha20poly1305_ietf_encrypt_detached(dst[0] + off, tags[c], NULL, src + off, len,
                                                               NULL, 0, NULL, nonce, k);
    }
    double t1 = now_s();
    for (size_t c = 0; c < nchunks; c++) {
        size_t off = c * chunk, len = total - off < chunk ? total - off : chunk;
        uint8_t *p = dst[0] + off;
        int rc = aes ? crypto_aead_aes256gcm_decrypt_detached_afternm(p, NULL, p, len, tags[c], NULL, 0,
                                                                      nonce, &st)
                     : crypto_aead_chacha20poly1305_ietf_decrypt_detached(p, NULL, p, len, tags[c], NULL, 0,
                                                                          nonce, k);
        if (rc != 0)
            die("open", -EBADMSG);
    }
    *open = now_s() - t1;
    *seal = t1 - t0;
    free(tags);
}

enum kind { SEND_RECV, HOP, CHAIN, SERIAL, CRYPTO };

struct bcase {
    const char *name, *mode;
    enum kind kind;
    unsigned flags;
    size_t chunk;
    int hops, aes;
    double secs[MAX_RUNS], ratio[MAX_RUNS];   /* per round: seconds, and the rate over send/recv's */
    double secs2[MAX_RUNS], ratio2[MAX_RUNS]; /* CRYPTO: opening (the first pair is sealing) */
};

static void report(const char *name, const char *mode, size_t chunk, int hops, double *secs, double *ratio,
                   int n)
{
    double gib = (double)total / (double)(1u << 30), rate[MAX_RUNS];
    for (int i = 0; i < n; i++)
        rate[i] = gib / secs[i];
    double med = median(rate, n);
    printf("bench=xfer case=%s mode=%s chunk=%zu hops=%d bytes=%zu runs=%d median_gibps=%.3f min_gibps=%.3f "
           "max_gibps=%.3f vs_send_recv=%.2f\n",
           name, mode, chunk, hops, total, n, med, rate[0], rate[n - 1], median(ratio, n));
    fflush(stdout);
}

int main(int argc, char **argv)
{
    size_t mib = 1024;
    int runs = 3, quick = 0, opt;
    while ((opt = getopt(argc, argv, "s:n:p:q")) != -1) {
        switch (opt) {
        case 's':
            mib = strtoul(optarg, NULL, 10);
            break;
        case 'n':
            runs = atoi(optarg);
            break;
        case 'p': /* a u32 of bytes per second: at most 4294 MB/s */
            if (strtoul(optarg, NULL, 10) > 4294) {
                fprintf(stderr, "xfer_bench: -p at most 4294 (MB/s)\n");
                return 2;
            }
            pace = (unsigned)strtoul(optarg, NULL, 10) * 1000000u;
            break;
        case 'q':
            quick = 1;
            break;
        default:
            fprintf(stderr, "usage: xfer_bench [-s MiB] [-n runs] [-p MB/s] [-q]\n");
            return 2;
        }
    }
    if (mib == 0 || runs < 1 || runs > MAX_RUNS) {
        fprintf(stderr, "xfer_bench: -s at least 1, -n from 1 to %d\n", MAX_RUNS);
        return 2;
    }
    if (sodium_init() < 0)
        die("sodium_init", -EIO);
    randombytes_buf(key, sizeof key);
    total = mib << 20;
    src = malloc(total);
    for (int i = 0; i < 3; i++)
        dst[i] = malloc(total);
    if (!src || !dst[0] || !dst[1] || !dst[2])
        die("malloc", -ENOMEM);
    randombytes_buf(src, total);
    for (int i = 0; i < 3; i++)
        memset(dst[i], 0, total); /* faulted in, as arena blocks are */
    int aes = crypto_aead_aes256gcm_is_available();
    printf("# xfer_bench: %zu MiB, %d rounds of every case, AES-256-GCM %s, links %s %u MB/s\n", mib, runs,
           aes ? "available" : "not available", pace ? "paced at" : "not paced", pace / 1000000u);

    static const size_t chunks[] = {256u << 10, 1u << 20, 4u << 20};
    static const struct {
        const char *name;
        unsigned flags;
    } modes[] = {
        {"plain", 0},
        {"aes256gcm", SHOAL_XFER_ENCRYPT | SHOAL_XFER_AESGCM},
        {"chacha20poly1305", SHOAL_XFER_ENCRYPT | SHOAL_XFER_CHACHA},
    };
    static struct bcase cases[32];
    int n = 0;
    cases[n++] = (struct bcase){"send_recv", "none", SEND_RECV, 0, 1u << 20, 1, 0, {0}, {0}, {0}, {0}};
    for (size_t m = 0; m < 3; m++)
        for (size_t c = 0; c < 3; c++)
            if ((aes || m != 1) && (!quick || chunks[c] == (1u << 20)))
                cases[n++] = (struct bcase){
                    "one_hop", modes[m].name, HOP, modes[m].flags, chunks[c], 1, 0, {0}, {0}, {0}, {0}};
    for (size_t m = 0; m < 3 && !quick; m++) {
        if (!aes && m == 1)
            continue;
        cases[n++] =
            (struct bcase){"chain", modes[m].name, CHAIN, modes[m].flags, 1u << 20, 3, 0, {0}, {0}, {0}, {0}};
        cases[n++] = (struct bcase){
            "store_and_forward", modes[m].name, SERIAL, modes[m].flags, 1u << 20, 3, 0, {0}, {0}, {0}, {0}};
    }
    if (aes)
        cases[n++] = (struct bcase){"crypto", "aes256gcm", CRYPTO, 0, 1u << 20, 0, 1, {0}, {0}, {0}, {0}};
    cases[n++] = (struct bcase){"crypto", "chacha20poly1305", CRYPTO, 0, 1u << 20, 0, 0, {0}, {0}, {0}, {0}};

    /* Rounds of every case in turn, so that load from outside falls on all
     * of them alike; each rate is also taken over send/recv's in the same
     * round. The copies are checked after the first round. */
    for (int r = 0; r < runs; r++) {
        double base = 0;
        for (int i = 0; i < n; i++) {
            struct bcase *b = &cases[i];
            switch (b->kind) {
            case SEND_RECV:
                b->secs[r] = base = run_raw();
                break;
            case HOP:
            case CHAIN:
                b->secs[r] = run_xfer(b->flags, b->chunk, b->hops, src, dst);
                break;
            case SERIAL:
                b->secs[r] = run_serial(b->flags, b->chunk);
                break;
            case CRYPTO:
                run_crypto(b->aes, &b->secs[r], &b->secs2[r]);
                b->ratio2[r] = base / b->secs2[r];
                break;
            }
            b->ratio[r] = base / b->secs[r];
            if (r == 0)
                check(b->kind == CHAIN || b->kind == SERIAL ? 3 : 1);
        }
        fprintf(stderr, "xfer_bench: round %d of %d done\n", r + 1, runs);
    }
    for (int i = 0; i < n; i++) {
        struct bcase *b = &cases[i];
        if (b->kind == CRYPTO) {
            report("seal_in_memory", b->mode, b->chunk, 0, b->secs, b->ratio, runs);
            report("open_in_memory", b->mode, b->chunk, 0, b->secs2, b->ratio2, runs);
        } else
            report(b->name, b->mode, b->chunk, b->hops, b->secs, b->ratio, runs);
    }
    for (int i = 0; i < 3; i++)
        free(dst[i]);
    free(src);
    return 0;
}
