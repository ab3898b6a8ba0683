/*
 * bridge/wire.c - encoding, signing and checking shoal's wire messages.
 *
 * The header frame is written and read byte by byte in little-endian order,
 * so it means the same on every host; docs/protocol.md has the table. The
 * decoder checks structure and limits first (cheap, and tells an oversized
 * message apart before any hashing), then the signature in constant time.
 */
#include <shoal/wire.h>

#include <errno.h>
#include <pthread.h>
#include <sodium.h>
#include <string.h>

const shoal_wire_limits shoal_wire_default_limits = {
    .max_frame = 4ull << 30,
    .max_body = 16ull << 30,
};

/* Header offsets (docs/protocol.md). */
enum {
    OFF_MAGIC = 0,
    OFF_VERSION = 4,
    OFF_TYPE = 6,
    OFF_FLAGS = 8,
    OFF_NPAYLOAD = 10,
    OFF_NBUFFERS = 12,
    OFF_RESERVED = 14,
    OFF_MSG_ID = 16,
    OFF_TASK_ID = 24,
    OFF_SENDER = 32,
    OFF_TARGET = 36,
    OFF_REPLY_TO = 40,
    OFF_BODY_LEN = 48,
    OFF_STAMP = 56,
    OFF_MAC = 64,
};

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

static pthread_once_t sodium_once = PTHREAD_ONCE_INIT;
static int sodium_rc;

static void init_sodium(void)
{
    sodium_rc = sodium_init() < 0 ? -EIO : 0;
}

int shoal_wire_init(void)
{
    pthread_once(&sodium_once, init_sodium);
    return sodium_rc;
}

int shoal_wire_keygen(uint8_t key[SHOAL_WIRE_KEY])
{
    int rc = shoal_wire_init();
    if (rc < 0)
        return rc;
    randombytes_buf(key, SHOAL_WIRE_KEY);
    return 0;
}

/*
 * A message carries two MACs, HMAC-SHA256 under the cluster key, each cut
 * to its first 16 bytes:
 *   - the header's (bytes 64-79): header bytes 0-63, then every frame's
 *     length as 8 bytes. Checking it costs the same for every message,
 *     however large, so a sender without the key costs nothing more to
 *     refuse than that (it is checked before the body is hashed);
 *   - the body's (bytes 80-95): header bytes 0-79 (the first MAC included),
 *     then each payload frame's bytes. Buffer frames are covered by their
 *     lengths alone (docs/protocol.md says why).
 * Lengths make the framing unambiguous: bytes cannot move from one frame to
 * the next.
 */
static void mac_header(const uint8_t key[SHOAL_WIRE_KEY], const uint8_t *hdr, const shoal_frame *frames, size_t n,
                       uint8_t out[SHOAL_WIRE_MAC_PART])
{
    crypto_auth_hmacsha256_state st;
    uint8_t len[8], full[crypto_auth_hmacsha256_BYTES];
    crypto_auth_hmacsha256_init(&st, key, SHOAL_WIRE_KEY);
    crypto_auth_hmacsha256_update(&st, hdr, SHOAL_WIRE_SIGNED);
    for (size_t i = 0; i < n; i++) {
        put64(len, frames[i].len);
        crypto_auth_hmacsha256_update(&st, len, sizeof len);
    }
    crypto_auth_hmacsha256_final(&st, full);
    memcpy(out, full, SHOAL_WIRE_MAC_PART);
    sodium_memzero(&st, sizeof st);
}

static void mac_body(const uint8_t key[SHOAL_WIRE_KEY], const uint8_t *hdr, const shoal_frame *frames,
                     size_t n_payload, uint8_t out[SHOAL_WIRE_MAC_PART])
{
    crypto_auth_hmacsha256_state st;
    uint8_t full[crypto_auth_hmacsha256_BYTES];
    crypto_auth_hmacsha256_init(&st, key, SHOAL_WIRE_KEY);
    crypto_auth_hmacsha256_update(&st, hdr, SHOAL_WIRE_SIGNED + SHOAL_WIRE_MAC_PART);
    for (size_t i = 0; i < n_payload; i++)
        if (frames[i].len)
            crypto_auth_hmacsha256_update(&st, frames[i].data, frames[i].len);
    crypto_auth_hmacsha256_final(&st, full);
    memcpy(out, full, SHOAL_WIRE_MAC_PART);
    sodium_memzero(&st, sizeof st);
}

int shoal_wire_encode(const uint8_t key[SHOAL_WIRE_KEY], const shoal_msg_header *h, const shoal_frame *frames,
                      size_t nframes, uint8_t out[SHOAL_WIRE_HDR])
{
    int rc = shoal_wire_init();
    if (rc < 0)
        return rc;
    if ((size_t)h->n_payload + h->n_buffers != nframes || nframes > SHOAL_WIRE_MAX_FRAMES)
        return -EINVAL;
    uint64_t body = 0;
    for (size_t i = 0; i < nframes; i++)
        body += frames[i].len;
    memset(out, 0, SHOAL_WIRE_HDR);
    put32(out + OFF_MAGIC, SHOAL_WIRE_MAGIC);
    put16(out + OFF_VERSION, SHOAL_WIRE_VERSION);
    put16(out + OFF_TYPE, h->type);
    put16(out + OFF_FLAGS, h->flags);
    put16(out + OFF_NPAYLOAD, h->n_payload);
    put16(out + OFF_NBUFFERS, h->n_buffers);
    put64(out + OFF_MSG_ID, h->msg_id);
    put64(out + OFF_TASK_ID, h->task_id);
    put32(out + OFF_SENDER, h->sender);
    put32(out + OFF_TARGET, h->target);
    put64(out + OFF_REPLY_TO, h->reply_to);
    put64(out + OFF_BODY_LEN, body);
    put64(out + OFF_STAMP, h->stamp_ns);
    mac_header(key, out, frames, nframes, out + OFF_MAC);
    mac_body(key, out, frames, h->n_payload, out + OFF_MAC + SHOAL_WIRE_MAC_PART);
    return 0;
}

int shoal_wire_decode(const uint8_t key[SHOAL_WIRE_KEY], const shoal_frame *frames, size_t nframes,
                      const shoal_wire_limits *limits, shoal_msg_header *h)
{
    int rc = shoal_wire_init();
    if (rc < 0)
        return rc;
    if (!limits)
        limits = &shoal_wire_default_limits;
    if (nframes < 1 || frames[0].len != SHOAL_WIRE_HDR)
        return -EBADMSG;
    const uint8_t *p = frames[0].data;
    if (get32(p + OFF_MAGIC) != SHOAL_WIRE_MAGIC)
        return -EBADMSG;
    if (get16(p + OFF_VERSION) != SHOAL_WIRE_VERSION)
        return -EPROTO;
    uint16_t np = get16(p + OFF_NPAYLOAD), nb = get16(p + OFF_NBUFFERS);
    if (get16(p + OFF_RESERVED) != 0 || (size_t)np + nb > SHOAL_WIRE_MAX_FRAMES || (size_t)np + nb + 1 != nframes)
        return -EBADMSG;
    uint64_t body = 0;
    int too_big = 0;
    for (size_t i = 1; i < nframes; i++) {
        too_big |= frames[i].len > limits->max_frame;
        body += frames[i].len; /* cannot wrap: at most 4096 frames, each of bytes received */
        too_big |= body > limits->max_body;
        /* The payload is what the body's MAC hashes: bounded before any
         * hashing, so that no sender, key or no key, buys seconds of our time. */
        too_big |= i == (size_t)np && limits->max_payload && body > limits->max_payload;
    }
    if (get64(p + OFF_BODY_LEN) != body)
        return too_big ? -EMSGSIZE : -EBADMSG;
    /* The header's MAC first (the header and the frames' lengths: cheap at
     * any size): without the key, nothing of the body is hashed. */
    uint8_t want[SHOAL_WIRE_MAC_PART];
    mac_header(key, p, frames + 1, (size_t)np + nb, want);
    if (sodium_memcmp(want, p + OFF_MAC, sizeof want) != 0)
        return too_big ? -EMSGSIZE : -EACCES;
    if (!too_big) {
        mac_body(key, p, frames + 1, np, want);
        if (sodium_memcmp(want, p + OFF_MAC + SHOAL_WIRE_MAC_PART, sizeof want) != 0)
            return -EACCES;
    }
    shoal_msg_header out = {
        .type = get16(p + OFF_TYPE),
        .flags = get16(p + OFF_FLAGS),
        .n_payload = np,
        .n_buffers = nb,
        .msg_id = get64(p + OFF_MSG_ID),
        .task_id = get64(p + OFF_TASK_ID),
        .sender = get32(p + OFF_SENDER),
        .target = get32(p + OFF_TARGET),
        .reply_to = get64(p + OFF_REPLY_TO),
        .body_len = body,
        .stamp_ns = get64(p + OFF_STAMP),
    };
    *h = out;
    return too_big ? -EFBIG : 0; /* too large, from a sender that holds the key: *h says which message */
}

const char *shoal_wire_strerror(int rc)
{
    switch (rc) {
    case 0:
        return "ok";
    case -EBADMSG:
        return "malformed message";
    case -EPROTO:
        return "unsupported protocol version";
    case -EMSGSIZE:
    case -EFBIG:
        return "message too large";
    case -EACCES:
        return "bad signature";
    case -ESTALE:
        return "stamp outside the receiver's window (a replay, or a clock that is off)";
    case -EIO:
        return "crypto library unavailable";
    default:
        return "error";
    }
}
