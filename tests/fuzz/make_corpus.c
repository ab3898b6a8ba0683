/*
 * tests/fuzz/make_corpus.c - writes the seed corpus of the fuzz targets,
 * tests/fuzz/corpus/<target>/<name>, with the project's own encoders (the
 * wire messages signed under fuzz.h's key, the bulk channel's headers), so
 * that the seeds follow the formats as the code has them. Run from the
 * repository's root after changing a format:
 *   build/fuzz/tests/fuzz/make_corpus tests/fuzz/corpus
 * docs/fuzzing.md says what each target's input is.
 */
#include "fuzz.h"

#include <shoal/array.h>
#include <shoal/ring.h>
#include <shoal/wire.h>
#include <shoal/xfer.h>

#include "../../bridge/xfer_format.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static const char *root;
static uint8_t key[SHOAL_WIRE_KEY];

static void die(const char *what)
{
    fprintf(stderr, "make_corpus: %s\n", what);
    exit(1);
}

static void put(const char *target, const char *name, const void *data, size_t len)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", root, target);
    if (mkdir(path, 0755) < 0 && errno != EEXIST)
        die(path);
    snprintf(path, sizeof path, "%s/%s/%s", root, target, name);
    FILE *f = fopen(path, "wb");
    if (!f || (len && fwrite(data, 1, len, f) != len) || fclose(f) != 0)
        die(path);
}

/* ---- wire: a flags byte, then parts as 2-byte length + bytes ---- */

struct buf {
    uint8_t b[1 << 16];
    size_t n;
};

static void add_part(struct buf *o, const void *p, size_t len)
{
    if (o->n + 2 + len > sizeof o->b)
        die("seed too large");
    o->b[o->n++] = (uint8_t)len;
    o->b[o->n++] = (uint8_t)(len >> 8);
    memcpy(o->b + o->n, p, len);
    o->n += len;
}

/* A signed message: the header part then the frames, after flags and route. */
static void wire_seed(const char *name, uint8_t flags, const char *route, const shoal_msg_header *h,
                      const shoal_frame *frames, size_t n, void (*spoil)(uint8_t *hdr))
{
    static struct buf o;
    o.n = 0;
    o.b[o.n++] = flags;
    if (route)
        add_part(&o, route, strlen(route));
    uint8_t hdr[SHOAL_WIRE_HDR];
    if (shoal_wire_encode(key, h, frames, n, hdr) < 0)
        die("encode");
    if (spoil)
        spoil(hdr);
    add_part(&o, hdr, sizeof hdr);
    for (size_t i = 0; i < n; i++)
        add_part(&o, frames[i].data, frames[i].len);
    put("wire", name, o.b, o.n);
}

static void flip_mac(uint8_t *hdr)
{
    hdr[SHOAL_WIRE_HDR - 1] ^= 1;
}

static void version_other(uint8_t *hdr)
{
    hdr[4] = (uint8_t)(SHOAL_WIRE_VERSION + 1);
}

static void flip_header_mac(uint8_t *hdr)
{
    hdr[64] ^= 1;
}

static void reserved(uint8_t *hdr)
{
    hdr[14] = 1;
}

static void body_len(uint8_t *hdr)
{
    hdr[48] ^= 1;
}

static void wire(void)
{
    shoal_msg_header hb = {.type = SHOAL_MSG_HEARTBEAT, .msg_id = 1, .sender = 7};
    wire_seed("heartbeat", 0, NULL, &hb, NULL, 0, NULL);
    wire_seed("heartbeat-flood", FUZZ_WIRE_FLOOD, NULL, &hb, NULL, 0, NULL);
    wire_seed("heartbeat-bad-mac", 0, NULL, &hb, NULL, 0, flip_mac);
    wire_seed("heartbeat-version-other", 0, NULL, &hb, NULL, 0, version_other);
    wire_seed("heartbeat-bad-header-mac", 0, NULL, &hb, NULL, 0, flip_header_mac);
    wire_seed("heartbeat-reserved", 0, NULL, &hb, NULL, 0, reserved);

    uint32_t targets[2] = {0, 3};
    static uint8_t big[300];
    memset(big, 'x', sizeof big);
    shoal_frame task[5] = {{targets, sizeof targets}, {"{\"code\": \"x = 1\"}", 17}, {"\x80\x05N.", 4},
                           {big, 100}, {"", 0}};
    shoal_msg_header th = {.type = SHOAL_MSG_TASK, .n_payload = 3, .n_buffers = 2, .msg_id = 2, .task_id = 9,
                           .target = SHOAL_WIRE_TARGET_ALL, .stamp_ns = 1700000000000000000ull};
    wire_seed("task", 0, NULL, &th, task, 5, NULL);
    wire_seed("task-router", FUZZ_WIRE_ROUTER, "\x00\x6b\x8b\x45\x67", &th, task, 5, NULL);
    wire_seed("task-body-len", 0, NULL, &th, task, 5, body_len);
    task[3].len = sizeof big;
    wire_seed("task-tight-oversized", FUZZ_WIRE_TIGHT, NULL, &th, task, 5, NULL);

    shoal_frame reg[1] = {{"{\"host\": \"h\", \"pid\": 1}", 23}};
    shoal_msg_header rh = {.type = SHOAL_MSG_REGISTER, .flags = SHOAL_REG_NODE, .n_payload = 1, .msg_id = 3};
    wire_seed("register-tight", FUZZ_WIRE_TIGHT | FUZZ_WIRE_ROUTER, "peer", &rh, reg, 1, NULL);

    uint8_t only_route[] = {FUZZ_WIRE_ROUTER, 4, 0, 'p', 'e', 'e', 'r'};
    put("wire", "route-only", only_route, sizeof only_route);
    uint8_t nothing[] = {0};
    put("wire", "no-parts", nothing, sizeof nothing);
}

/* ---- slot: a ring image, then a message block ---- */

static void slot_set(uint8_t *s, uint32_t kind, uint64_t offset, uint64_t length, uint64_t generation)
{
    memset(s, 0, SHOAL_RING_SLOT);
    uint64_t task = 42;
    memcpy(s + SLOT_TASK_ID, &task, 8);
    memcpy(s + SLOT_KIND, &kind, 4);
    memcpy(s + SLOT_OFFSET, &offset, 8);
    memcpy(s + SLOT_LENGTH, &length, 8);
    memcpy(s + SLOT_GENERATION, &generation, 8);
}

/* A message block (docs/engine.md) of the given frames. */
static size_t msgblock(uint8_t *out, const shoal_frame *f, uint32_t n, uint32_t npayload)
{
    uint32_t w[4] = {0x464D4853u, n, npayload, 0};
    memcpy(out, w, sizeof w);
    size_t pos = 16 + 8 * (size_t)n;
    for (uint32_t i = 0; i < n; i++) {
        uint64_t len = f[i].len;
        memcpy(out + 16 + 8 * i, &len, 8);
        memcpy(out + pos, f[i].data, f[i].len);
        pos += f[i].len;
    }
    return pos;
}

static _Alignas(64) uint8_t ring_mem[FUZZ_SLOT_RING];

static void slot_seed(const char *name, const uint8_t *block, size_t block_len)
{
    static uint8_t seed[FUZZ_SLOT_RING + 4096];
    memcpy(seed, ring_mem, FUZZ_SLOT_RING);
    memcpy(seed + FUZZ_SLOT_RING, block, block_len);
    put("slot", name, seed, FUZZ_SLOT_RING + block_len);
}

static void slot(void)
{
    static uint8_t block[2048];
    shoal_frame reply[3] = {{"{\"status\": \"ok\"}", 16}, {"\x80\x05K\x01.", 5}, {"0123456789abcdef", 16}};
    size_t len = msgblock(block, reply, 3, 2);
    shoal_ring r;
    uint8_t s[4][SHOAL_RING_SLOT];

    if (shoal_ring_init(ring_mem, sizeof ring_mem, FUZZ_SLOT_NSLOTS, &r) < 0)
        die("ring_init");
    slot_set(s[0], KIND_RESULT, 0, len, 0);
    shoal_ring_push(&r, s, 1);
    slot_seed("result", block, len);

    shoal_ring_init(ring_mem, sizeof ring_mem, FUZZ_SLOT_NSLOTS, &r);
    slot_set(s[0], KIND_OUTPUT, 0, len, 0);
    slot_set(s[1], 1 /* TASK: not the agent's to read */, 0, len, 0);
    slot_set(s[2], KIND_RESULT, 0, len, 0);
    slot_set(s[3], KIND_RESULT, 0, len, 1); /* a stale generation */
    shoal_ring_push(&r, s, 4);
    slot_seed("output-task-result-stale", block, len);

    shoal_ring_init(ring_mem, sizeof ring_mem, FUZZ_SLOT_NSLOTS, &r);
    slot_set(s[0], KIND_RESULT, 64, len, 0); /* inside the block: no block header there */
    slot_set(s[1], KIND_RESULT, 0, FUZZ_SLOT_BLOCK + 1, 0); /* longer than the block */
    shoal_ring_push(&r, s, 2);
    slot_seed("bad-handles", block, len);

    shoal_ring_init(ring_mem, sizeof ring_mem, FUZZ_SLOT_NSLOTS, &r);
    slot_set(s[0], KIND_RESULT, 0, len, 0);
    shoal_ring_push(&r, s, 1);
    uint64_t huge = 1000;
    memcpy(block + 16 + 8, &huge, 8); /* frame 1 runs past the block */
    slot_seed("frame-past-block", block, len);
    len = msgblock(block, NULL, 0, 0);
    slot_set(s[0], KIND_RESULT, 0, len, 0);
    shoal_ring_init(ring_mem, sizeof ring_mem, FUZZ_SLOT_NSLOTS, &r);
    shoal_ring_push(&r, s, 1);
    slot_seed("no-frames", block, len);

    len = msgblock(block, reply, 3, 2);
    shoal_ring_init(ring_mem, sizeof ring_mem, FUZZ_SLOT_NSLOTS, &r);
    shoal_ring_push(&r, s, 1);
    shoal_ring_close(&r);
    slot_seed("closed", block, len);

    shoal_ring_init(ring_mem, sizeof ring_mem, FUZZ_SLOT_NSLOTS, &r);
    uint64_t head = 5; /* past tail: scribbled */
    memcpy(ring_mem + 128, &head, 8);
    slot_seed("head-past-tail", block, len);

    shoal_ring_init(ring_mem, sizeof ring_mem, 2, &r);
    slot_set(s[0], KIND_RESULT, 0, len, 0);
    shoal_ring_push(&r, s, 1);
    slot_seed("two-slots", block, len);

    if (shoal_pool_init(ring_mem, sizeof ring_mem, FUZZ_SLOT_NSLOTS, &r) < 0)
        die("pool_init");
    uint64_t pos;
    slot_set(s[0], KIND_RESULT, 0, len, 0);
    shoal_pool_push(&r, s[0], &pos);
    slot_set(s[0], KIND_OUTPUT, 0, len, 0);
    shoal_pool_push(&r, s[0], &pos);
    slot_seed("pool", block, len);
}

/* ---- array: the block's length, then a descriptor ---- */

static void array_seed(const char *name, uint64_t block_len, const shoal_array_desc *d)
{
    uint8_t seed[8 + SHOAL_ARRAY_DESC_FIXED + 16 * SHOAL_ARRAY_MAXDIM];
    for (int i = 0; i < 8; i++)
        seed[i] = (uint8_t)(block_len >> (8 * i));
    size_t len;
    if (shoal_array_desc_encode(d, seed + 8, sizeof seed - 8, &len) < 0)
        die("array_desc_encode");
    put("array", name, seed, 8 + len);
}

static shoal_array_desc desc(const char *dtype, uint64_t itemsize, uint32_t ndim)
{
    shoal_array_desc d;
    memset(&d, 0, sizeof d);
    strcpy(d.dtype, dtype);
    d.itemsize = itemsize;
    d.ndim = ndim;
    return d;
}

static void array(void)
{
    shoal_array_desc d = desc("<f8", 8, 2);
    d.shape[0] = 3, d.shape[1] = 5, d.strides[0] = 40, d.strides[1] = 8;
    array_seed("f8-3x5", 120, &d);
    array_seed("f8-3x5-too-long", 119, &d);
    d.strides[0] = 8, d.strides[1] = 24; /* Fortran order */
    array_seed("f8-3x5-fortran", 120, &d);
    d.shape[0] = 0;
    array_seed("f8-0x5", 0, &d);

    d = desc("<i4", 4, 0);
    array_seed("i4-scalar", 4, &d);
    d = desc("<f8", 8, 1);
    d.shape[0] = 10, d.strides[0] = -8, d.offset = 72;
    array_seed("f8-reversed", 80, &d);
    d = desc("|u1", 1, 2);
    d.shape[0] = 1000, d.shape[1] = 3, d.strides[0] = 0, d.strides[1] = 1;
    array_seed("u1-broadcast", 3, &d);
    d = desc("<U7", 28, 1);
    d.shape[0] = 2, d.strides[0] = 28, d.offset = 64;
    array_seed("U7-offset", 120, &d);
    d = desc("|b1", 1, SHOAL_ARRAY_MAXDIM);
    for (uint32_t i = 0; i < d.ndim; i++)
        d.shape[i] = 1, d.strides[i] = 1;
    array_seed("b1-64-dims", 1, &d);
    d = desc("<c16", 16, 2);
    d.shape[0] = INT64_MAX / 2, d.shape[1] = 2, d.strides[0] = INT64_MAX / 4, d.strides[1] = -16;
    array_seed("c16-huge", UINT64_MAX, &d);
    d = desc("|u1", 1, 3); /* spans that add up past 2^127 (a bug the fuzzer found) */
    for (uint32_t i = 0; i < d.ndim; i++)
        d.shape[i] = INT64_MAX, d.strides[i] = INT64_MAX;
    array_seed("u1-spans-past-2-127", 1u << 20, &d);
    d = desc("<f8", 8, 2); /* a negative shape behind an empty one (a bug the fuzzer found) */
    d.shape[0] = 0, d.shape[1] = -5, d.strides[0] = 40, d.strides[1] = 8;
    array_seed("f8-0x-5", 1000, &d);
}

/* ---- request: lines as a process sends them ---- */

static void request_seed(const char *name, const char *text)
{
    put("request", name, text, strlen(text));
}

static void request(void)
{
    request_seed("engine", "{\"role\": \"engine\", \"index\": 0}\n");
    request_seed("lane", "{\"lane\": 3}\n");
    request_seed("three", "{\"lane\": 1}\n{\"role\": \"engine\", \"index\": 2}\nnot json\n");
    request_seed("lane-odd-ids", "{\"lane\": -1}\n{\"lane\": 1e10}\n{\"lane\": \"x\"}\n{\"lane\": null}\n");
    request_seed("unfinished", "{\"lane\": 3}");
    request_seed("nested", "[[[[[[[[[[[[[[[[{\"lane\": [{\"role\": \"engine\"}]}]]]]]]]]]]]]]]]]\n");
    request_seed("escapes", "{\"role\": \"eng\\u0069ne\", \"\\u006cane\": 1}\n");
    char long_line[700];
    memset(long_line, ' ', sizeof long_line);
    memcpy(long_line, "{\"lane\": 1}", 11);
    long_line[sizeof long_line - 2] = '\n';
    long_line[sizeof long_line - 1] = '\0';
    request_seed("long", long_line);
}

/* ---- xfer: a flags byte, then records: 32-byte clear header, 2-byte
 * payload length, payload ---- */

static void add_record(struct buf *o, uint8_t type, uint64_t id, uint64_t offset, const void *p, size_t len)
{
    shoal_xfer_hdr h = {.type = type, .length = (uint32_t)len, .id = id, .offset = offset};
    if (o->n + SHOAL_XFER_HDR + 2 + len > sizeof o->b)
        die("seed too large");
    shoal__xfer_hdr_encode(&h, o->b + o->n); /* seq 0: the target puts the right one */
    o->n += SHOAL_XFER_HDR;
    o->b[o->n++] = (uint8_t)len;
    o->b[o->n++] = (uint8_t)(len >> 8);
    memcpy(o->b + o->n, p, len);
    o->n += len;
}

/* BEGIN (100 bytes, metadata "next=b"), DATA 60 + 40, END. */
static void xfer_transfer(struct buf *o, uint64_t id)
{
    static uint8_t bytes[100];
    for (size_t i = 0; i < sizeof bytes; i++)
        bytes[i] = (uint8_t)i;
    add_record(o, SHOAL_XFER_BEGIN, id, 100, "next=b", 6);
    add_record(o, SHOAL_XFER_DATA, id, 0, bytes, 60);
    add_record(o, SHOAL_XFER_DATA, id, 60, bytes + 60, 40);
    add_record(o, SHOAL_XFER_END, id, 100, NULL, 0);
}

static void xfer_seed(const char *name, uint8_t flags, void (*records)(struct buf *))
{
    static struct buf o;
    o.n = 0;
    o.b[o.n++] = flags;
    records(&o);
    put("xfer", name, o.b, o.n);
}

static void two_transfers(struct buf *o)
{
    xfer_transfer(o, 1);
    xfer_transfer(o, 2);
}

static void aborted(struct buf *o)
{
    add_record(o, SHOAL_XFER_BEGIN, 7, 1000, NULL, 0);
    add_record(o, SHOAL_XFER_DATA, 7, 0, "abcdefgh", 8);
    add_record(o, SHOAL_XFER_ABORT, 7, 8, NULL, 0);
    xfer_transfer(o, 8);
}

static void app_and_close(struct buf *o)
{
    add_record(o, SHOAL_XFER_APP, 0, 0, "hello", 5);
    add_record(o, SHOAL_XFER_APP + 5, 1, 2, NULL, 0);
    add_record(o, SHOAL_XFER_CLOSE, 0, 0, NULL, 0);
}

/* A hello as the first bytes (for the decoders), then what follows. */
static void hello_first(struct buf *o)
{
    shoal__xfer_hello h = {.role = SHOAL_XFER_CLIENT, .ciphers = 3, .flags = 1, .max_record = SHOAL_XFER_MAX_RECORD};
    for (int i = 0; i < 32; i++) {
        h.pk[i] = (uint8_t)i;
        h.nonce[i] = (uint8_t)(255 - i);
    }
    shoal__xfer_hello_encode(&h, o->b + o->n);
    o->n += SHOAL_XFER_HELLO;
}

static void xfer(void)
{
    xfer_seed("transfers-plain", 0, two_transfers);
    xfer_seed("transfers-encrypted", FUZZ_XFER_ENCRYPT, two_transfers);
    xfer_seed("transfers-headers", FUZZ_XFER_HEADERS, two_transfers);
    xfer_seed("transfers-refused", FUZZ_XFER_REFUSE, two_transfers);
    xfer_seed("transfers-discarded", FUZZ_XFER_DISCARD | FUZZ_XFER_ENCRYPT, two_transfers);
    xfer_seed("transfers-raw-seq", FUZZ_XFER_RAW_SEQ, two_transfers);
    xfer_seed("aborted", 0, aborted);
    xfer_seed("app-close", FUZZ_XFER_HEADERS, app_and_close);
    xfer_seed("hello", 0, hello_first);
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s CORPUS_DIR\n", argv[0]);
        return 2;
    }
    root = argv[1];
    if (mkdir(root, 0755) < 0 && errno != EEXIST)
        die(root);
    fuzz_key(key);
    wire();
    slot();
    array();
    request();
    xfer();
    return 0;
}
