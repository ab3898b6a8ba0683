/*
 * bridge/xfer.c - the bulk channel: a handshake that proves the cluster key
 * and agrees on per-direction keys, then records sealed (or, plain, with an
 * authenticated header) and written straight from the caller's memory or
 * received straight into it, and whole transfers received and forwarded
 * record by record along a chain of hosts. docs/xfer.md has the formats and
 * the reasoning; include/shoal/xfer.h the contract of every function.
 *
 * All I/O is non-blocking calls (MSG_DONTWAIT) and poll, whatever the fd's
 * own O_NONBLOCK flag, so that every wait has a bound: the handshake's
 * deadline, the caller's timeout for the first byte of a record, and the
 * connection's idle timeout for the rest.
 */
#include "xfer_format.h"

#include <shoal/util.h>
#include <shoal/wire.h>

#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <sodium.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>
#include <sys/uio.h>

/* Hello offsets (docs/xfer.md). */
enum {
    HELLO_MAGIC = 0,
    HELLO_VERSION = 4,
    HELLO_LENGTH = 6,
    HELLO_ROLE = 8,
    HELLO_CIPHERS = 9,
    HELLO_RESERVED1 = 10, /* 2 bytes */
    HELLO_FLAGS = 12,
    HELLO_MAX_RECORD = 16,
    HELLO_RESERVED2 = 20, /* 12 bytes */
    HELLO_PK = 32,
    HELLO_NONCE = 64,
};

/* Record header offsets (docs/xfer.md). */
enum {
    HDR_TYPE = 0,
    HDR_RESERVED = 1,
    HDR_FLAGS = 2,
    HDR_LENGTH = 4,
    HDR_SEQ = 8,
    HDR_ID = 16,
    HDR_OFFSET = 24,
};

/* Which part of a record a nonce seals: its header or its payload. */
enum { PART_HDR = 0, PART_PAYLOAD = 1 };

#define NONCE_BYTES 12u

struct shoal_xfer {
    /* First, for their 16-byte alignment; used with AES-256-GCM only. */
    crypto_aead_aes256gcm_state tx_aes, rx_aes;
    int fd;
    int role;
    int cipher;        /* SHOAL_XFER_CIPHER_* */
    int idle_ms;       /* bound on a wait for progress once a call has started; -1: none */
    int more;          /* records are sent with MSG_MORE (shoal_xfer_set_more) */
    uint32_t peer_max; /* the longest payload the peer accepts (its hello) */

    /* Sending: touched only by the one thread that sends. */
    int tx_err;      /* sticky */
    uint64_t tx_seq; /* the next record's number */
    uint8_t tx_key[32];
    uint8_t *stage; /* encrypted: where a payload is sealed before it is written */
    size_t stage_cap;

    /* Receiving: touched only by the one thread that receives. */
    int rx_err;      /* sticky */
    uint64_t rx_seq; /* the number the next record must have */
    uint8_t rx_key[32];
    bool pending; /* cur's payload is still to be taken */
    bool have_cur;
    shoal_xfer_hdr cur;              /* the last header received */
    uint8_t cur_raw[SHOAL_XFER_HDR]; /* its clear bytes: the payload's associated data */
    uint8_t *scratch;                /* payloads skipped, or relayed without being kept */
    size_t scratch_cap;
    uint8_t *meta; /* the last BEGIN's metadata (SHOAL_XFER_MAX_META bytes) */
};

/* ------------------------------------------------------------------------ */
/* Bytes. */

static void put16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}

static void put32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static void put64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static uint16_t get16(const uint8_t *p)
{
    return (uint16_t)(p[0] | (p[1] << 8));
}

static uint32_t get32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static uint64_t get64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v |= (uint64_t)p[i] << (8 * i);
    return v;
}

static bool all_zero(const uint8_t *p, size_t n)
{
    uint8_t acc = 0;
    for (size_t i = 0; i < n; i++)
        acc |= p[i];
    return acc == 0;
}

/* ------------------------------------------------------------------------ */
/* Formats (no I/O). */

void shoal__xfer_hello_encode(const shoal__xfer_hello *h, uint8_t out[SHOAL_XFER_HELLO])
{
    memset(out, 0, SHOAL_XFER_HELLO);
    put32(out + HELLO_MAGIC, SHOAL__XFER_MAGIC);
    put16(out + HELLO_VERSION, SHOAL__XFER_VERSION);
    put16(out + HELLO_LENGTH, SHOAL_XFER_HELLO);
    out[HELLO_ROLE] = h->role;
    out[HELLO_CIPHERS] = h->ciphers;
    put32(out + HELLO_FLAGS, h->flags);
    put32(out + HELLO_MAX_RECORD, h->max_record);
    memcpy(out + HELLO_PK, h->pk, sizeof h->pk);
    memcpy(out + HELLO_NONCE, h->nonce, sizeof h->nonce);
}

int shoal__xfer_hello_decode(const uint8_t *in, size_t len, shoal__xfer_hello *h)
{
    if (len != SHOAL_XFER_HELLO)
        return -EPROTO;
    if (get32(in + HELLO_MAGIC) != SHOAL__XFER_MAGIC || get16(in + HELLO_VERSION) != SHOAL__XFER_VERSION ||
        get16(in + HELLO_LENGTH) != SHOAL_XFER_HELLO)
        return -EPROTO;
    h->role = in[HELLO_ROLE];
    /* Cipher bits this version does not know are ignored: a later peer may
     * offer more, and the choice is made among the ones both know. */
    h->ciphers = in[HELLO_CIPHERS];
    h->flags = get32(in + HELLO_FLAGS);
    h->max_record = get32(in + HELLO_MAX_RECORD);
    memcpy(h->pk, in + HELLO_PK, sizeof h->pk);
    memcpy(h->nonce, in + HELLO_NONCE, sizeof h->nonce);
    if (h->role != SHOAL_XFER_CLIENT && h->role != SHOAL_XFER_SERVER)
        return -EPROTO;
    if ((h->flags & ~(uint32_t)SHOAL__XFER_WIRE_ENCRYPT) || h->max_record < SHOAL_XFER_MAX_META)
        return -EPROTO;
    if (!all_zero(in + HELLO_RESERVED1, 2) || !all_zero(in + HELLO_RESERVED2, 12))
        return -EPROTO;
    return 0;
}

void shoal__xfer_hdr_encode(const shoal_xfer_hdr *h, uint8_t out[SHOAL_XFER_HDR])
{
    out[HDR_TYPE] = h->type;
    out[HDR_RESERVED] = 0;
    put16(out + HDR_FLAGS, h->flags);
    put32(out + HDR_LENGTH, h->length);
    put64(out + HDR_SEQ, h->seq);
    put64(out + HDR_ID, h->id);
    put64(out + HDR_OFFSET, h->offset);
}

int shoal__xfer_hdr_decode(const uint8_t in[SHOAL_XFER_HDR], shoal_xfer_hdr *h)
{
    h->type = in[HDR_TYPE];
    h->flags = get16(in + HDR_FLAGS);
    h->length = get32(in + HDR_LENGTH);
    h->seq = get64(in + HDR_SEQ);
    h->id = get64(in + HDR_ID);
    h->offset = get64(in + HDR_OFFSET);
    if (in[HDR_RESERVED] != 0)
        return -EPROTO;
    bool app = h->type >= SHOAL_XFER_APP;
    if (!app && (h->type < SHOAL_XFER_BEGIN || h->type > SHOAL_XFER_CLOSE || h->flags != 0))
        return -EPROTO;
    if (h->length > SHOAL_XFER_MAX_RECORD)
        return -EMSGSIZE;
    switch (h->type) {
    case SHOAL_XFER_BEGIN:
        return h->length > SHOAL_XFER_MAX_META ? -EMSGSIZE : 0;
    case SHOAL_XFER_END:
    case SHOAL_XFER_ABORT:
    case SHOAL_XFER_CLOSE:
        return h->length != 0 ? -EPROTO : 0;
    default:
        return 0;
    }
}

/* ------------------------------------------------------------------------ */
/* Waiting. Deadlines are CLOCK_MONOTONIC nanoseconds, -1 for none. */

static int64_t deadline_after(int ms)
{
    return ms < 0 ? -1 : shoal_now_ns() + (int64_t)ms * 1000000;
}

/* The sooner of deadline and the connection's idle bound from now. */
static int64_t io_deadline(const shoal_xfer *c, int64_t deadline)
{
    if (c->idle_ms < 0)
        return deadline;
    int64_t idle = deadline_after(c->idle_ms);
    return deadline < 0 || idle < deadline ? idle : deadline;
}

/*
 * Waits until fd is ready for events or deadline passes. A deadline already
 * past still polls once, so that a timeout of 0 means "only if it is there".
 * POLLERR and POLLHUP count as ready: the recv or send that follows says
 * what happened. Returns 0, -ETIMEDOUT, -EBADF or poll's errno.
 */
static int wait_fd(int fd, short events, int64_t deadline)
{
    for (;;) {
        int ms = -1;
        if (deadline >= 0) {
            int64_t left = deadline - shoal_now_ns();
            ms = left <= 0 ? 0 : left / 1000000 >= INT_MAX ? INT_MAX : (int)((left + 999999) / 1000000);
        }
        struct pollfd p = {.fd = fd, .events = events};
        int n = poll(&p, 1, ms);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n > 0)
            return p.revents & POLLNVAL ? -EBADF : 0;
        if (ms == 0)
            return -ETIMEDOUT;
    }
}

/*
 * Reads exactly len bytes into buf. While nothing has come, a wait lasts
 * until *first if first is given (the caller's timeout for a record's first
 * byte: -1 for ever); otherwise, and once bytes flow, until
 * io_deadline(deadline). Returns 0, -ECONNRESET at EOF, -ETIMEDOUT, or
 * recv's errno; *got (may be NULL) says how many bytes came.
 */
static int read_full(shoal_xfer *c, void *buf, size_t len, const int64_t *first, int64_t deadline,
                     size_t *got)
{
    uint8_t *p = buf;
    size_t done = 0;
    int rc = 0;
    while (done < len) {
        ssize_t n = recv(c->fd, p + done, len - done, MSG_DONTWAIT);
        if (n > 0) {
            done += (size_t)n;
            continue;
        }
        if (n == 0) {
            rc = -ECONNRESET;
            break;
        }
        if (errno == EINTR)
            continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK) {
            rc = -errno;
            break;
        }
        rc = wait_fd(c->fd, POLLIN, first && done == 0 ? *first : io_deadline(c, deadline));
        if (rc < 0)
            break;
    }
    if (got)
        *got = done;
    return rc;
}

/*
 * Writes every byte of iov[0 .. n) (which it advances), waiting within
 * io_deadline(deadline) each time the socket is full. MSG_NOSIGNAL: a peer
 * that is gone gives -EPIPE, not a SIGPIPE. Returns 0, -ETIMEDOUT or
 * sendmsg's errno.
 */
static int write_iov(shoal_xfer *c, struct iovec *iov, int n, int64_t deadline)
{
    while (n > 0 && iov->iov_len == 0) {
        iov++;
        n--;
    }
    while (n > 0) {
        struct msghdr m = {.msg_iov = iov, .msg_iovlen = (size_t)n};
        ssize_t w = sendmsg(c->fd, &m, MSG_NOSIGNAL | MSG_DONTWAIT | (c->more ? MSG_MORE : 0));
        if (w < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                return -errno;
            int rc = wait_fd(c->fd, POLLOUT, io_deadline(c, deadline));
            if (rc < 0)
                return rc;
            continue;
        }
        size_t left = (size_t)w;
        while (n > 0 && left >= iov->iov_len) {
            left -= iov->iov_len;
            iov++;
            n--;
        }
        if (n > 0) {
            iov->iov_base = (uint8_t *)iov->iov_base + left;
            iov->iov_len -= left;
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Handshake. */

static const char transcript_label[] = "shoal-xfer/1 transcript";
static const char proof_label_client[] = "shoal-xfer/1 client proof";
static const char proof_label_server[] = "shoal-xfer/1 server proof";
static const char key_label_c2s[] = "shoal-xfer/1 client to server";
static const char key_label_s2c[] = "shoal-xfer/1 server to client";

/*
 * The proof of the side whose role is given: HMAC-SHA256 under the cluster
 * key over its role's label, then both hellos, the client's first. The
 * label binds the proof to the role, so a proof sent back to its sender
 * (reflected) does not pass for the other side's; the hellos hold both
 * sides' fresh nonces and keys, so a proof recorded on another connection
 * does not pass on this one.
 */
static void proof(const uint8_t key[SHOAL_XFER_KEY], int role, const uint8_t *hello_c, const uint8_t *hello_s,
                  uint8_t out[SHOAL_XFER_PROOF])
{
    crypto_auth_hmacsha256_state st;
    const char *label = role == SHOAL_XFER_CLIENT ? proof_label_client : proof_label_server;
    crypto_auth_hmacsha256_init(&st, key, SHOAL_XFER_KEY);
    crypto_auth_hmacsha256_update(&st, (const uint8_t *)label, strlen(label));
    crypto_auth_hmacsha256_update(&st, hello_c, SHOAL_XFER_HELLO);
    crypto_auth_hmacsha256_update(&st, hello_s, SHOAL_XFER_HELLO);
    crypto_auth_hmacsha256_final(&st, out);
    sodium_memzero(&st, sizeof st);
}

/*
 * One direction's key: BLAKE2b-256 keyed with the cluster key over the
 * direction's label, the X25519 session key crypto_kx gave for it, and the
 * hash of the transcript. Reading the records takes both the ephemeral
 * secret (what an eavesdropper who later learns the cluster key still
 * lacks) and the cluster key (what a man in the middle who ran his own
 * key exchange with each side lacks).
 */
static void direction_key(const uint8_t key[SHOAL_XFER_KEY], const char *label, const uint8_t kx[32],
                          const uint8_t th[32], uint8_t out[32])
{
    crypto_generichash_state st;
    crypto_generichash_init(&st, key, SHOAL_XFER_KEY, 32);
    crypto_generichash_update(&st, (const uint8_t *)label, strlen(label));
    crypto_generichash_update(&st, kx, 32);
    crypto_generichash_update(&st, th, 32);
    crypto_generichash_final(&st, out, 32);
    sodium_memzero(&st, sizeof st);
}

static uint8_t offered_ciphers(unsigned flags)
{
    if (!(flags & SHOAL_XFER_ENCRYPT))
        return 0;
    uint8_t offer = 0;
    if (!(flags & SHOAL_XFER_CHACHA) && crypto_aead_aes256gcm_is_available())
        offer |= SHOAL__XFER_OFFER_AESGCM;
    if (!(flags & SHOAL_XFER_AESGCM))
        offer |= SHOAL__XFER_OFFER_CHACHA;
    return offer;
}

/*
 * Runs the exchange: hellos both ways, then proofs both ways. Each side
 * sends before it reads, and the two messages are small, so neither waits
 * for the other to read first. The peer's hello is checked before our proof
 * goes out, its proof before anything else is read.
 */
static int handshake(shoal_xfer *c, const uint8_t key[SHOAL_XFER_KEY], unsigned flags, int64_t deadline)
{
    uint8_t sk[crypto_kx_SECRETKEYBYTES], rx[crypto_kx_SESSIONKEYBYTES], tx[crypto_kx_SESSIONKEYBYTES];
    uint8_t mine[SHOAL_XFER_HELLO], theirs[SHOAL_XFER_HELLO], th[32];
    uint8_t my_proof[SHOAL_XFER_PROOF], their_proof[SHOAL_XFER_PROOF], want[SHOAL_XFER_PROOF];
    shoal__xfer_hello me = {.role = (uint8_t)c->role,
                            .ciphers = offered_ciphers(flags),
                            .flags = flags & SHOAL_XFER_ENCRYPT ? SHOAL__XFER_WIRE_ENCRYPT : 0,
                            .max_record = SHOAL_XFER_MAX_RECORD};
    shoal__xfer_hello peer;
    size_t got;
    int rc;

    crypto_kx_keypair(me.pk, sk);
    randombytes_buf(me.nonce, sizeof me.nonce);
    shoal__xfer_hello_encode(&me, mine);

    struct iovec iov = {mine, sizeof mine};
    rc = write_iov(c, &iov, 1, deadline);
    if (rc < 0)
        goto out;
    rc = read_full(c, theirs, sizeof theirs, NULL, deadline, &got);
    if (rc == -ECONNRESET && got > 0)
        rc = -EPROTO; /* a hello cut short */
    if (rc < 0)
        goto out;
    rc = shoal__xfer_hello_decode(theirs, sizeof theirs, &peer);
    if (rc < 0)
        goto out;
    /* Two clients or two servers, or our own hello sent back to us. */
    if (peer.role == c->role || sodium_memcmp(peer.pk, me.pk, sizeof me.pk) == 0 ||
        sodium_memcmp(peer.nonce, me.nonce, sizeof me.nonce) == 0) {
        rc = -EPROTO;
        goto out;
    }

    const uint8_t *hello_c = c->role == SHOAL_XFER_CLIENT ? mine : theirs;
    const uint8_t *hello_s = c->role == SHOAL_XFER_CLIENT ? theirs : mine;
    proof(key, c->role, hello_c, hello_s, my_proof);
    iov = (struct iovec){my_proof, sizeof my_proof};
    rc = write_iov(c, &iov, 1, deadline);
    if (rc < 0)
        goto out;
    rc = read_full(c, their_proof, sizeof their_proof, NULL, deadline, &got);
    if (rc == -ECONNRESET && got > 0)
        rc = -EPROTO;
    if (rc < 0)
        goto out;
    proof(key, c->role == SHOAL_XFER_CLIENT ? SHOAL_XFER_SERVER : SHOAL_XFER_CLIENT, hello_c, hello_s, want);
    if (sodium_memcmp(their_proof, want, sizeof want) != 0) {
        rc = -EACCES;
        goto out;
    }

    /* Both hold the key: now (and only now) disagreement is worth saying. */
    if ((me.flags ^ peer.flags) & SHOAL__XFER_WIRE_ENCRYPT) {
        rc = -EPROTONOSUPPORT;
        goto out;
    }
    if (flags & SHOAL_XFER_ENCRYPT) {
        uint8_t common = me.ciphers & peer.ciphers;
        if (common & SHOAL__XFER_OFFER_AESGCM)
            c->cipher = SHOAL_XFER_CIPHER_AES256GCM;
        else if (common & SHOAL__XFER_OFFER_CHACHA)
            c->cipher = SHOAL_XFER_CIPHER_CHACHA20POLY1305;
        else {
            rc = -EPROTONOSUPPORT;
            goto out;
        }
    }
    c->peer_max = peer.max_record < SHOAL_XFER_MAX_RECORD ? peer.max_record : SHOAL_XFER_MAX_RECORD;

    /* crypto_kx refuses a public key of small order. */
    if (c->role == SHOAL_XFER_CLIENT)
        rc = crypto_kx_client_session_keys(rx, tx, me.pk, sk, peer.pk);
    else
        rc = crypto_kx_server_session_keys(rx, tx, me.pk, sk, peer.pk);
    if (rc != 0) {
        rc = -EPROTO;
        goto out;
    }
    crypto_generichash_state st;
    crypto_generichash_init(&st, NULL, 0, sizeof th);
    crypto_generichash_update(&st, (const uint8_t *)transcript_label, strlen(transcript_label));
    crypto_generichash_update(&st, hello_c, SHOAL_XFER_HELLO);
    crypto_generichash_update(&st, hello_s, SHOAL_XFER_HELLO);
    crypto_generichash_final(&st, th, sizeof th);
    bool client = c->role == SHOAL_XFER_CLIENT;
    direction_key(key, client ? key_label_c2s : key_label_s2c, tx, th, c->tx_key);
    direction_key(key, client ? key_label_s2c : key_label_c2s, rx, th, c->rx_key);
    if (c->cipher == SHOAL_XFER_CIPHER_AES256GCM) {
        crypto_aead_aes256gcm_beforenm(&c->tx_aes, c->tx_key);
        crypto_aead_aes256gcm_beforenm(&c->rx_aes, c->rx_key);
    }
    rc = 0;
out:
    sodium_memzero(sk, sizeof sk);
    sodium_memzero(rx, sizeof rx);
    sodium_memzero(tx, sizeof tx);
    return rc;
}

int shoal_xfer_open(int fd, int role, const uint8_t key[SHOAL_XFER_KEY], unsigned flags, int timeout_ms,
                    shoal_xfer **out)
{
    unsigned known = SHOAL_XFER_ENCRYPT | SHOAL_XFER_CHACHA | SHOAL_XFER_AESGCM;
    if ((role != SHOAL_XFER_CLIENT && role != SHOAL_XFER_SERVER) || !key || !out || (flags & ~known) ||
        ((flags & SHOAL_XFER_CHACHA) && (flags & SHOAL_XFER_AESGCM)))
        return -EINVAL;
    int rc = shoal_wire_init();
    if (rc < 0)
        return rc;
    if ((flags & SHOAL_XFER_ENCRYPT) && (flags & SHOAL_XFER_AESGCM) && !crypto_aead_aes256gcm_is_available())
        return -ENOTSUP;
    int type;
    socklen_t tlen = sizeof type;
    if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &tlen) < 0)
        return -errno;
    if (type != SOCK_STREAM)
        return -EPROTOTYPE;

    /* aligned_alloc wants a multiple of the alignment. */
    size_t size = (sizeof(shoal_xfer) + 63) & ~(size_t)63;
    shoal_xfer *c = aligned_alloc(64, size);
    if (!c)
        return -ENOMEM;
    memset(c, 0, size);
    c->fd = fd;
    c->role = role;
    c->cipher = SHOAL_XFER_CIPHER_NONE;
    c->idle_ms = -1; /* the handshake has its deadline */
    rc = handshake(c, key, flags, deadline_after(timeout_ms));
    if (rc < 0)
        goto fail_handshake;
    c->idle_ms = SHOAL_XFER_IDLE_MS;
    *out = c;
    return 0;

fail_handshake:
    shoal_xfer_close(c);
    return rc;
}

void shoal_xfer_close(shoal_xfer *c)
{
    if (!c)
        return;
    free(c->stage);
    free(c->scratch);
    free(c->meta);
    sodium_memzero(c, sizeof *c);
    free(c);
}

int shoal_xfer_fd(const shoal_xfer *c)
{
    return c->fd;
}

int shoal_xfer_cipher(const shoal_xfer *c)
{
    return c->cipher;
}

void shoal_xfer_set_idle_timeout(shoal_xfer *c, int idle_ms)
{
    c->idle_ms = idle_ms < 0 ? -1 : idle_ms;
}

void shoal_xfer_set_more(shoal_xfer *c, int more)
{
    c->more = more != 0;
}

/* ------------------------------------------------------------------------ */
/* Records. */

/*
 * A record's nonce: its sequence number (8 bytes, little-endian), then the
 * part it seals (header or payload), then zeros. Each direction has its own
 * key and numbers its records from 0, so no (key, nonce) pair comes twice.
 */
static void make_nonce(uint8_t n[NONCE_BYTES], uint64_t seq, uint8_t part)
{
    memset(n, 0, NONCE_BYTES);
    put64(n, seq);
    n[8] = part;
}

static void seal(const shoal_xfer *c, uint8_t *out, uint8_t tag[SHOAL_XFER_TAG], const uint8_t *in,
                 size_t len, const uint8_t *ad, size_t adlen, const uint8_t nonce[NONCE_BYTES])
{
    if (c->cipher == SHOAL_XFER_CIPHER_AES256GCM)
        crypto_aead_aes256gcm_encrypt_detached_afternm(out, tag, NULL, in, len, ad, adlen, NULL, nonce,
                                                       &c->tx_aes);
    else
        crypto_aead_chacha20poly1305_ietf_encrypt_detached(out, tag, NULL, in, len, ad, adlen, NULL, nonce,
                                                           c->tx_key);
}

/* Opens in place when out == in (libsodium's detached calls allow it). */
static int unseal(const shoal_xfer *c, uint8_t *out, const uint8_t *in, size_t len,
                  const uint8_t tag[SHOAL_XFER_TAG], const uint8_t *ad, size_t adlen,
                  const uint8_t nonce[NONCE_BYTES])
{
    int rc;
    if (c->cipher == SHOAL_XFER_CIPHER_AES256GCM)
        rc = crypto_aead_aes256gcm_decrypt_detached_afternm(out, NULL, in, len, tag, ad, adlen, nonce,
                                                            &c->rx_aes);
    else
        rc = crypto_aead_chacha20poly1305_ietf_decrypt_detached(out, NULL, in, len, tag, ad, adlen, nonce,
                                                                c->rx_key);
    return rc == 0 ? 0 : -EBADMSG;
}

/* Plain records: the header's MAC, BLAKE2b-128 keyed with the direction's
 * key over the clear header (which holds the sequence number). */
static void header_mac(const uint8_t key[32], const uint8_t raw[SHOAL_XFER_HDR], uint8_t out[SHOAL_XFER_TAG])
{
    crypto_generichash(out, SHOAL_XFER_TAG, raw, SHOAL_XFER_HDR, key, 32);
}

static int tx_fail(shoal_xfer *c, int rc)
{
    if (c->tx_err == 0)
        c->tx_err = rc;
    return rc;
}

static int rx_fail(shoal_xfer *c, int rc)
{
    if (c->rx_err == 0)
        c->rx_err = rc;
    return rc;
}

static int grow(uint8_t **buf, size_t *cap, size_t len)
{
    if (len <= *cap)
        return 0;
    uint8_t *p = malloc(len);
    if (!p)
        return -ENOMEM;
    free(*buf);
    *buf = p;
    *cap = len;
    return 0;
}

/*
 * Seals (or MACs) the clear header raw and the payload, and writes them;
 * the record's number, and so its nonce, is the connection's next, whatever
 * raw says.
 */
static int write_record(shoal_xfer *c, const uint8_t raw[SHOAL_XFER_HDR], const void *payload, size_t len)
{
    if (c->tx_err)
        return c->tx_err;
    if (len > c->peer_max)
        return -EMSGSIZE;
    if (c->tx_seq == UINT64_MAX)
        return tx_fail(c, -EOVERFLOW);
    uint8_t wire[SHOAL_XFER_WIRE_HDR], tag[SHOAL_XFER_TAG], nonce[NONCE_BYTES];
    struct iovec iov[3];
    int n = 0;
    if (c->cipher != SHOAL_XFER_CIPHER_NONE) {
        if (grow(&c->stage, &c->stage_cap, len) < 0)
            return -ENOMEM;
        make_nonce(nonce, c->tx_seq, PART_HDR);
        seal(c, wire, wire + SHOAL_XFER_HDR, raw, SHOAL_XFER_HDR, NULL, 0, nonce);
        iov[n++] = (struct iovec){wire, sizeof wire};
        if (len > 0) {
            make_nonce(nonce, c->tx_seq, PART_PAYLOAD);
            seal(c, c->stage, tag, payload, len, raw, SHOAL_XFER_HDR, nonce);
            iov[n++] = (struct iovec){c->stage, len};
            iov[n++] = (struct iovec){tag, sizeof tag};
        }
    } else {
        memcpy(wire, raw, SHOAL_XFER_HDR);
        header_mac(c->tx_key, raw, wire + SHOAL_XFER_HDR);
        iov[n++] = (struct iovec){wire, sizeof wire};
        if (len > 0)
            iov[n++] = (struct iovec){(void *)payload, len};
    }
    int rc = write_iov(c, iov, n, -1);
    if (rc < 0)
        return tx_fail(c, rc);
    c->tx_seq++;
    return 0;
}

/* Sends one record of the library's making. */
static int send_record(shoal_xfer *c, uint8_t type, uint16_t flags, uint64_t id, uint64_t offset,
                       const void *payload, size_t len)
{
    shoal_xfer_hdr h = {
        .type = type, .flags = flags, .length = (uint32_t)len, .seq = c->tx_seq, .id = id, .offset = offset};
    uint8_t raw[SHOAL_XFER_HDR];
    shoal__xfer_hdr_encode(&h, raw);
    return write_record(c, raw, payload, len);
}

int shoal__xfer_send_raw(shoal_xfer *c, const uint8_t raw[SHOAL_XFER_HDR], const void *payload, size_t len)
{
    if ((len > 0 && !payload) || len > SHOAL_XFER_MAX_RECORD)
        return -EINVAL;
    return write_record(c, raw, payload, len);
}

uint64_t shoal__xfer_tx_seq(const shoal_xfer *c)
{
    return c->tx_seq;
}

int shoal_xfer_send(shoal_xfer *c, const shoal_xfer_hdr *hdr, const void *payload, size_t len)
{
    if (!hdr || (len > 0 && !payload) || hdr->type == SHOAL_XFER_CLOSE)
        return -EINVAL;
    if (len > SHOAL_XFER_MAX_RECORD)
        return -EMSGSIZE;
    /* What the peer would refuse is refused here: the same checks. */
    shoal_xfer_hdr h = *hdr, back;
    uint8_t raw[SHOAL_XFER_HDR];
    h.length = (uint32_t)len;
    shoal__xfer_hdr_encode(&h, raw);
    int rc = shoal__xfer_hdr_decode(raw, &back);
    if (rc < 0)
        return rc == -EPROTO ? -EINVAL : rc;
    return send_record(c, h.type, h.flags, h.id, h.offset, payload, len);
}

int shoal_xfer_shutdown(shoal_xfer *c)
{
    int rc = send_record(c, SHOAL_XFER_CLOSE, 0, 0, 0, NULL, 0);
    if (rc < 0)
        return rc;
    c->tx_err = -EPIPE;
    return 0;
}

int shoal_xfer_send_buffer(shoal_xfer *c, uint64_t id, const void *meta, size_t metalen, const void *buf,
                           size_t len, size_t chunk)
{
    if ((len > 0 && !buf) || (metalen > 0 && !meta))
        return -EINVAL;
    if (chunk == 0)
        chunk = SHOAL_XFER_CHUNK;
    if (chunk > SHOAL_XFER_MAX_RECORD || chunk > c->peer_max || metalen > SHOAL_XFER_MAX_META)
        return -EMSGSIZE;
    /* Every record but the END with MSG_MORE: a small transfer leaves in
     * one segment, not three (each one a wake-up at the other end). */
    int more = c->more;
    c->more = 1;
    int rc = send_record(c, SHOAL_XFER_BEGIN, 0, id, len, meta, metalen);
    const uint8_t *p = buf;
    for (size_t off = 0; rc == 0 && off < len; off += chunk) {
        size_t n = len - off < chunk ? len - off : chunk;
        rc = send_record(c, SHOAL_XFER_DATA, 0, id, off, p + off, n);
    }
    c->more = more;
    if (rc == 0)
        rc = send_record(c, SHOAL_XFER_END, 0, id, len, NULL, 0);
    return rc;
}

int shoal_xfer_recv_hdr(shoal_xfer *c, shoal_xfer_hdr *out, int timeout_ms)
{
    if (c->rx_err)
        return c->rx_err;
    if (c->pending)
        return -EBUSY;
    /* Until the first byte, the caller's timeout; a timeout then is
     * harmless: nothing was read. Once the header has started, the idle
     * bound. The read is tried before any poll: in a transfer the next
     * header is usually there already. */
    uint8_t wire[SHOAL_XFER_WIRE_HDR], raw[SHOAL_XFER_HDR], nonce[NONCE_BYTES];
    int64_t first = deadline_after(timeout_ms);
    size_t got;
    int rc = read_full(c, wire, sizeof wire, &first, -1, &got);
    if (rc == -ETIMEDOUT && got == 0)
        return rc;
    if (rc < 0)
        return rx_fail(c, rc);
    if (c->cipher != SHOAL_XFER_CIPHER_NONE) {
        make_nonce(nonce, c->rx_seq, PART_HDR);
        rc = unseal(c, raw, wire, sizeof raw, wire + SHOAL_XFER_HDR, NULL, 0, nonce);
        if (rc < 0)
            return rx_fail(c, rc);
    } else {
        uint8_t mac[SHOAL_XFER_TAG];
        memcpy(raw, wire, sizeof raw);
        header_mac(c->rx_key, raw, mac);
        if (sodium_memcmp(mac, wire + SHOAL_XFER_HDR, sizeof mac) != 0)
            return rx_fail(c, -EBADMSG);
    }
    shoal_xfer_hdr h;
    rc = shoal__xfer_hdr_decode(raw, &h);
    if (rc == 0 && h.seq != c->rx_seq)
        rc = -EBADMSG; /* authentic, but not the record that comes next */
    if (rc < 0)
        return rx_fail(c, rc);
    c->cur = h;
    c->have_cur = true;
    memcpy(c->cur_raw, raw, sizeof raw);
    if (h.type == SHOAL_XFER_CLOSE) {
        c->rx_seq++;
        return rx_fail(c, -ESHUTDOWN);
    }
    if (h.length > 0)
        c->pending = true;
    else
        c->rx_seq++;
    *out = h;
    return 0;
}

int shoal_xfer_recv_payload(shoal_xfer *c, void *dst, size_t len)
{
    if (c->rx_err)
        return c->rx_err;
    if (!c->pending || len != c->cur.length || !dst)
        return -EINVAL;
    int rc = read_full(c, dst, len, NULL, -1, NULL);
    if (rc < 0)
        return rx_fail(c, rc);
    if (c->cipher != SHOAL_XFER_CIPHER_NONE) {
        uint8_t tag[SHOAL_XFER_TAG], nonce[NONCE_BYTES];
        rc = read_full(c, tag, sizeof tag, NULL, -1, NULL);
        if (rc < 0)
            return rx_fail(c, rc);
        make_nonce(nonce, c->rx_seq, PART_PAYLOAD);
        rc = unseal(c, dst, dst, len, tag, c->cur_raw, sizeof c->cur_raw, nonce);
        if (rc < 0)
            return rx_fail(c, rc);
    }
    c->pending = false;
    c->rx_seq++;
    return 0;
}

int shoal_xfer_skip_payload(shoal_xfer *c)
{
    if (c->rx_err)
        return c->rx_err;
    if (!c->pending)
        return 0;
    if (grow(&c->scratch, &c->scratch_cap, c->cur.length) < 0)
        return -ENOMEM;
    return shoal_xfer_recv_payload(c, c->scratch, c->cur.length);
}

/* ------------------------------------------------------------------------ */
/* Transfers. */

/* Sends a record on every route still going; a failure drops that route. */
static void forward(shoal_xfer_route *routes, size_t n, uint8_t type, uint64_t id, uint64_t offset,
                    const void *payload, size_t len)
{
    for (size_t i = 0; i < n; i++) {
        if (routes[i].status != 0)
            continue;
        const void *p = payload;
        size_t l = len;
        if (type == SHOAL_XFER_BEGIN) {
            p = routes[i].meta;
            l = routes[i].metalen;
            if (l > SHOAL_XFER_MAX_META || (l > 0 && !p)) {
                routes[i].status = -EMSGSIZE;
                continue;
            }
        }
        int rc = send_record(routes[i].conn, type, 0, id, offset, p, l);
        /* A record refused here without breaking the connection (over the
         * peer's record limit, no memory for sealing) leaves the next hop
         * mid-transfer: end the transfer there, rather than leave it
         * waiting for its idle bound (after a broken connection this sends
         * nothing, and the next hop sees the connection end). */
        if (rc < 0 && type != SHOAL_XFER_BEGIN)
            (void)send_record(routes[i].conn, SHOAL_XFER_ABORT, 0, id, 0, NULL, 0);
        routes[i].status = rc;
    }
}

static bool routes_ok(const shoal_xfer *c, const shoal_xfer_sink *s)
{
    if (s->nroutes > 0 && !s->routes)
        return false;
    for (size_t i = 0; i < s->nroutes; i++)
        if (!s->routes[i].conn || s->routes[i].conn == c)
            return false;
    return true;
}

int shoal_xfer_recv_buffer(shoal_xfer *c, const shoal_xfer_hdr *begin, int timeout_ms,
                           shoal_xfer_accept_fn accept, void *ctx, shoal_xfer_begin *info)
{
    if (c->rx_err)
        return c->rx_err;
    if (!accept)
        return -EINVAL;
    shoal_xfer_hdr h;
    int rc;
    if (begin) {
        /* The BEGIN must be the last record read, its metadata untouched. */
        if (!c->have_cur || c->cur.type != SHOAL_XFER_BEGIN || c->cur.seq != begin->seq ||
            (c->cur.length > 0 && !c->pending) || (c->cur.length == 0 && c->pending))
            return -EINVAL;
        h = c->cur;
    } else {
        rc = shoal_xfer_recv_hdr(c, &h, timeout_ms);
        if (rc < 0)
            return rc;
        if (h.type != SHOAL_XFER_BEGIN)
            return rx_fail(c, -EPROTO);
    }
    if (!c->meta) {
        c->meta = malloc(SHOAL_XFER_MAX_META);
        if (!c->meta)
            return rx_fail(c, -ENOMEM);
    }
    if (h.length > 0) {
        rc = shoal_xfer_recv_payload(c, c->meta, h.length);
        if (rc < 0)
            return rc;
    }

    shoal_xfer_begin b = {.id = h.id, .total = h.offset, .meta = c->meta, .metalen = h.length};
    if (info)
        *info = b;
    shoal_xfer_sink sink = {0};
    int verdict = accept(ctx, &b, &sink);
    if (verdict >= 0 && !routes_ok(c, &sink))
        verdict = -EINVAL;
    if (verdict < 0) {
        /* Refused, or a sink we cannot use: read on, keep nothing. */
        memset(&sink, 0, sizeof sink);
        verdict = verdict == -EINVAL ? -EINVAL : -ECANCELED;
    }
    uint8_t *dst = sink.dst;
    for (size_t i = 0; i < sink.nroutes; i++)
        sink.routes[i].status = 0;
    forward(sink.routes, sink.nroutes, SHOAL_XFER_BEGIN, b.id, b.total, NULL, 0);

    uint64_t got = 0;
    for (;;) {
        /* Within a transfer, the next record is due within the idle bound. */
        rc = shoal_xfer_recv_hdr(c, &h, c->idle_ms);
        if (rc < 0)
            goto fail;
        if (h.id != b.id ||
            (h.type != SHOAL_XFER_DATA && h.type != SHOAL_XFER_END && h.type != SHOAL_XFER_ABORT)) {
            rc = -EPROTO;
            goto fail;
        }
        if (h.type == SHOAL_XFER_ABORT) {
            forward(sink.routes, sink.nroutes, SHOAL_XFER_ABORT, b.id, got, NULL, 0);
            return -ECONNABORTED;
        }
        if (h.type == SHOAL_XFER_END) {
            if (h.offset != b.total || got != b.total) {
                rc = -EPROTO;
                goto fail;
            }
            forward(sink.routes, sink.nroutes, SHOAL_XFER_END, b.id, b.total, NULL, 0);
            return verdict < 0 ? verdict : 0;
        }
        if (h.offset != got || h.length == 0) {
            rc = -EPROTO;
            goto fail;
        }
        if (h.length > b.total - got) {
            rc = -EMSGSIZE;
            goto fail;
        }
        uint8_t *where;
        if (dst)
            where = dst + got;
        else {
            rc = grow(&c->scratch, &c->scratch_cap, h.length);
            if (rc < 0)
                goto fail;
            where = c->scratch;
        }
        rc = shoal_xfer_recv_payload(c, where, h.length);
        if (rc < 0)
            goto fail;
        forward(sink.routes, sink.nroutes, SHOAL_XFER_DATA, b.id, got, where, h.length);
        got += h.length;
    }

fail:
    /* The transfer cannot complete: tell the routes at once rather than let
     * them wait out their idle bound. */
    forward(sink.routes, sink.nroutes, SHOAL_XFER_ABORT, b.id, got, NULL, 0);
    return rx_fail(c, rc);
}

const char *shoal_xfer_strerror(int rc)
{
    switch (rc) {
    case 0:
        return "ok";
    case -EPROTO:
        return "the peer broke the bulk-channel protocol (a malformed hello, or a record out of place)";
    case -EACCES:
        return "the peer does not hold the cluster key (or replayed another connection's bytes)";
    case -EPROTONOSUPPORT:
        return "the peer wants the other mode (encrypted or plain), or offers no cipher in common";
    case -EBADMSG:
        return "a record failed authentication (altered, dropped, repeated or reordered)";
    case -EMSGSIZE:
        return "a record longer than allowed";
    case -ETIMEDOUT:
        return "timed out";
    case -ECONNRESET:
        return "the connection ended without the peer closing it";
    case -ESHUTDOWN:
        return "the peer closed the connection";
    case -ECANCELED:
        return "the transfer was refused, and read to its end";
    case -ECONNABORTED:
        return "the sender aborted the transfer";
    case -EPIPE:
        return "the connection is closed for sending";
    case -ENOTSUP:
        return "this CPU has no AES-256-GCM";
    default:
        return rc < 0 ? strerror(-rc) : "not an error";
    }
}

/* ---- endpoints ---------------------------------------------------------------- */

int shoal_xfer_endpoint_split(const char *ep, char *host, size_t hlen, char *port, size_t plen)
{
    if (strncmp(ep, "tcp://", 6) != 0)
        return -EINVAL;
    ep += 6;
    const char *colon = strrchr(ep, ':');
    if (!colon || colon == ep)
        return -EINVAL;
    const char *h = ep, *he = colon;
    if (*h == '[' && he[-1] == ']')
        h++, he--;
    if ((size_t)(he - h) >= hlen || strlen(colon + 1) >= plen || !colon[1])
        return -EINVAL;
    memcpy(host, h, (size_t)(he - h));
    host[he - h] = '\0';
    strcpy(port, colon + 1);
    return 0;
}

int shoal_xfer_connect(const char *ep, int timeout_ms)
{
    char host[256], port[16];
    if (shoal_xfer_endpoint_split(ep, host, sizeof host, port, sizeof port) < 0)
        return -EINVAL;
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *ai;
    if (getaddrinfo(host, port, &hints, &ai) != 0)
        return -EHOSTUNREACH;
    int rc;
    int fd = socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) {
        rc = -errno;
        goto out;
    }
    if (connect(fd, ai->ai_addr, ai->ai_addrlen) < 0) {
        if (errno != EINPROGRESS) {
            rc = -errno;
            goto fail;
        }
        struct pollfd p = {fd, POLLOUT, 0};
        int err = 0;
        socklen_t el = sizeof err;
        if (poll(&p, 1, timeout_ms) != 1) {
            rc = -ETIMEDOUT;
            goto fail;
        }
        if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &el) < 0 || err) {
            rc = -(err ? err : errno);
            goto fail;
        }
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    freeaddrinfo(ai);
    return fd;
fail:
    close(fd);
out:
    freeaddrinfo(ai);
    return rc;
}
