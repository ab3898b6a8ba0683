/*
 * tests/fuzz/fuzz_xfer.c - the receive side of the bulk channel
 * (bridge/xfer.c): what a peer that holds the cluster key can make a
 * receiver do with any records at all, and the hello and header decoders.
 *
 * Each input is, after a flags byte (fuzz.h), a sequence of records: 32
 * bytes of clear header (as docs/xfer.md has it: any type, length, offset,
 * reserved byte), a 2-byte little-endian payload length, and that many
 * payload bytes (fewer if the input ends). A fresh connection is opened
 * over a socketpair (the real handshake, the server in a thread); the
 * client sends the records with shoal__xfer_send_raw, sealed or MACed so
 * that they pass authentication, and shuts its side; the server reads them
 * with shoal_xfer_recv_buffer (memory of exactly the transfer's size, or
 * none, or a refusal) or header by header. Every return must be one the
 * header documents, an error must be sticky, and nothing may read or write
 * outside the memory given. The input's bytes after the flags also go to
 * the hello and header decoders, whose answers must re-encode to the same
 * bytes.
 */
#include "fuzz.h"

#include "../../bridge/xfer_format.h"

#include <shoal/xfer.h>

#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define CHECK(cond)                                                                                          \
    do {                                                                                                     \
        if (!(cond)) {                                                                                       \
            fprintf(stderr, "fuzz_xfer: %s:%d: %s\n", __FILE__, __LINE__, #cond);                            \
            abort();                                                                                         \
        }                                                                                                    \
    } while (0)

static uint8_t key[SHOAL_XFER_KEY];

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    fuzz_key(key);
    return 0;
}

/* The decoders alone: an accepted hello or header re-encodes to its bytes. */
static void decoders(const uint8_t *data, size_t size)
{
    shoal__xfer_hello h;
    int rc = shoal__xfer_hello_decode(data, size, &h);
    CHECK(rc == 0 || rc == -EPROTO);
    if (rc == 0) {
        uint8_t again[SHOAL_XFER_HELLO];
        shoal__xfer_hello_encode(&h, again);
        CHECK(memcmp(again, data, SHOAL_XFER_HELLO) == 0);
    }
    if (size >= SHOAL_XFER_HDR) {
        shoal_xfer_hdr r;
        rc = shoal__xfer_hdr_decode(data, &r);
        CHECK(rc == 0 || rc == -EPROTO || rc == -EMSGSIZE);
        if (rc == 0) {
            uint8_t again[SHOAL_XFER_HDR];
            shoal__xfer_hdr_encode(&r, again);
            CHECK(memcmp(again, data, SHOAL_XFER_HDR) == 0);
        }
    }
}

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

struct sink {
    uint8_t flags;
    uint8_t last_meta;
    uint8_t *mem; /* the last transfer's memory, exactly its size */
};

static int accept_cb(void *ctx, const shoal_xfer_begin *b, shoal_xfer_sink *out)
{
    struct sink *k = ctx;
    CHECK(b->metalen <= SHOAL_XFER_MAX_META);
    /* Every byte of the metadata is readable (AddressSanitizer watches). */
    uint8_t sum = 0;
    for (size_t i = 0; i < b->metalen; i++)
        sum ^= ((const uint8_t *)b->meta)[i];
    *(volatile uint8_t *)&k->last_meta = sum;
    if (k->flags & FUZZ_XFER_REFUSE)
        return -ENOMEM;
    if (k->flags & FUZZ_XFER_DISCARD)
        return 0; /* accepted into nowhere: the records pass through the connection's memory */
    if (b->total > FUZZ_XFER_MAX_TOTAL)
        return -ENOSPC;
    free(k->mem);
    k->mem = malloc(b->total ? b->total : 1);
    CHECK(k->mem);
    out->dst = k->mem;
    return 0;
}

/* Whether rc leaves the receiving side usable. */
static bool harmless(int rc)
{
    return rc == 0 || rc == -ECANCELED || rc == -ECONNABORTED || rc == -EINVAL;
}

static bool documented(int rc)
{
    return harmless(rc) || rc == -EPROTO || rc == -EMSGSIZE || rc == -EBADMSG || rc == -ECONNRESET ||
           rc == -ESHUTDOWN || rc == -ETIMEDOUT;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    uint8_t flags = data[0];
    data++;
    size--;
    decoders(data, size);

    int fd[2];
    CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, fd) == 0);
    int big = 4 << 20;
    setsockopt(fd[0], SOL_SOCKET, SO_SNDBUF, &big, sizeof big);
    unsigned mode = flags & FUZZ_XFER_ENCRYPT ? SHOAL_XFER_ENCRYPT | SHOAL_XFER_CHACHA : 0;
    struct opener s = {fd[1], SHOAL_XFER_SERVER, mode, NULL, 0},
                  c = {fd[0], SHOAL_XFER_CLIENT, mode, NULL, 0};
    pthread_t t;
    CHECK(pthread_create(&t, NULL, open_main, &s) == 0);
    open_main(&c);
    pthread_join(t, NULL);
    CHECK(c.rc == 0 && s.rc == 0);
    /* Neither side ever waits: the sender's records that do not fit are
     * dropped, and the receiver finds EOF after the last. */
    shoal_xfer_set_idle_timeout(c.x, 0);
    shoal_xfer_set_idle_timeout(s.x, 1000);

    while (size > 0) {
        uint8_t raw[SHOAL_XFER_HDR] = {0};
        size_t n = size < SHOAL_XFER_HDR ? size : SHOAL_XFER_HDR;
        memcpy(raw, data, n);
        data += n;
        size -= n;
        size_t len = 0;
        if (size >= 2) {
            len = data[0] | (size_t)data[1] << 8;
            data += 2;
            size -= 2;
        }
        if (len > size)
            len = size;
        /* The header's number is the right one unless the input asks not. */
        if (!(flags & FUZZ_XFER_RAW_SEQ)) {
            uint64_t seq = shoal__xfer_tx_seq(c.x);
            for (int i = 0; i < 8; i++)
                raw[8 + i] = (uint8_t)(seq >> (8 * i));
        }
        if (shoal__xfer_send_raw(c.x, raw, data, len) < 0)
            break;
        data += len;
        size -= len;
    }
    shutdown(fd[0], SHUT_WR);

    struct sink k = {flags, 0, NULL};
    int rc = 0;
    for (int i = 0; i < 64; i++) {
        if (flags & FUZZ_XFER_HEADERS) {
            shoal_xfer_hdr h;
            rc = shoal_xfer_recv_hdr(s.x, &h, 1000);
            if (rc == 0) {
                CHECK(h.length <= SHOAL_XFER_MAX_RECORD);
                if (h.length > 0 && (i & 1)) {
                    rc = shoal_xfer_skip_payload(s.x);
                } else if (h.length > 0) {
                    uint8_t *p = malloc(h.length);
                    CHECK(p);
                    rc = shoal_xfer_recv_payload(s.x, p, h.length);
                    free(p);
                }
            }
        } else {
            shoal_xfer_begin info;
            rc = shoal_xfer_recv_buffer(s.x, NULL, 1000, accept_cb, &k, &info);
            if (rc == 0)
                CHECK(info.metalen <= SHOAL_XFER_MAX_META);
        }
        CHECK(documented(rc));
        if (!harmless(rc))
            break;
    }
    if (!harmless(rc)) {
        shoal_xfer_hdr h;
        CHECK(shoal_xfer_recv_hdr(s.x, &h, 0) == rc); /* sticky */
    }
    free(k.mem);
    shoal_xfer_close(c.x);
    shoal_xfer_close(s.x);
    close(fd[0]);
    close(fd[1]);
    return 0;
}
