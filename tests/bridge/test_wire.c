/*
 * tests/bridge/test_wire.c - encoding, signing and the total decoder.
 */
#include <criterion/criterion.h>

#include <shoal/wire.h>

#include <errno.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static uint8_t key[SHOAL_WIRE_KEY];

static void setup(void)
{
    cr_assert_eq(shoal_wire_keygen(key), 0);
}

TestSuite(wire, .init = setup);

/* A message with two payload frames and one buffer frame. */
struct sample {
    uint8_t hdr[SHOAL_WIRE_HDR];
    char p0[16], p1[32];
    uint8_t buf[1000];
    shoal_frame frames[4]; /* header, p0, p1, buf */
    shoal_msg_header h;
};

static void make(struct sample *s)
{
    memset(s, 0, sizeof *s);
    strcpy(s->p0, "hello");
    strcpy(s->p1, "{\"code\": \"1+1\"}");
    for (size_t i = 0; i < sizeof s->buf; i++)
        s->buf[i] = (uint8_t)i;
    s->h = (shoal_msg_header){.type = SHOAL_MSG_TASK, .flags = 3, .n_payload = 2, .n_buffers = 1,
                              .msg_id = 77, .task_id = 1234567890123ull, .sender = 5,
                              .target = SHOAL_WIRE_TARGET_ALL, .reply_to = 9, .stamp_ns = 42};
    s->frames[1] = (shoal_frame){s->p0, 5};
    s->frames[2] = (shoal_frame){s->p1, strlen(s->p1)};
    s->frames[3] = (shoal_frame){s->buf, sizeof s->buf};
    cr_assert_eq(shoal_wire_encode(key, &s->h, s->frames + 1, 3, s->hdr), 0);
    s->frames[0] = (shoal_frame){s->hdr, sizeof s->hdr};
}

static int decode(struct sample *s, shoal_msg_header *out)
{
    return shoal_wire_decode(key, s->frames, 4, NULL, out);
}

Test(wire, round_trip)
{
    struct sample s;
    make(&s);
    shoal_msg_header out;
    cr_assert_eq(decode(&s, &out), 0);
    cr_assert_eq(out.type, SHOAL_MSG_TASK);
    cr_assert_eq(out.flags, 3);
    cr_assert_eq(out.n_payload, 2);
    cr_assert_eq(out.n_buffers, 1);
    cr_assert_eq(out.msg_id, 77);
    cr_assert_eq(out.task_id, 1234567890123ull);
    cr_assert_eq(out.sender, 5);
    cr_assert_eq(out.target, SHOAL_WIRE_TARGET_ALL);
    cr_assert_eq(out.reply_to, 9);
    cr_assert_eq(out.stamp_ns, 42);
    cr_assert_eq(out.body_len, 5 + strlen(s.p1) + sizeof s.buf);
}

Test(wire, header_only_message)
{
    shoal_msg_header h = {.type = SHOAL_MSG_HEARTBEAT}, out;
    uint8_t hdr[SHOAL_WIRE_HDR];
    cr_assert_eq(shoal_wire_encode(key, &h, NULL, 0, hdr), 0);
    shoal_frame f = {hdr, sizeof hdr};
    cr_assert_eq(shoal_wire_decode(key, &f, 1, NULL, &out), 0);
    cr_assert_eq(out.type, SHOAL_MSG_HEARTBEAT);
    cr_assert_eq(out.body_len, 0);
}

Test(wire, encode_rejects_bad_counts)
{
    struct sample s;
    make(&s);
    uint8_t hdr[SHOAL_WIRE_HDR];
    cr_assert_eq(shoal_wire_encode(key, &s.h, s.frames + 1, 2, hdr), -EINVAL);
    s.h.n_payload = SHOAL_WIRE_MAX_FRAMES;
    cr_assert_eq(shoal_wire_encode(key, &s.h, s.frames + 1, SHOAL_WIRE_MAX_FRAMES + 1, hdr), -EINVAL);
}

Test(wire, wrong_key_is_a_bad_signature)
{
    struct sample s;
    make(&s);
    uint8_t other[SHOAL_WIRE_KEY];
    memcpy(other, key, sizeof other);
    other[0] ^= 1;
    shoal_msg_header out = {.msg_id = 999};
    cr_assert_eq(shoal_wire_decode(other, s.frames, 4, NULL, &out), -EACCES);
    cr_assert_eq(out.msg_id, 999, "untouched on failure");
}

Test(wire, every_header_bit_flip_is_refused)
{
    struct sample s;
    make(&s);
    shoal_msg_header out;
    for (size_t bit = 0; bit < SHOAL_WIRE_HDR * 8; bit++) {
        s.hdr[bit / 8] ^= (uint8_t)(1u << (bit % 8));
        int rc = decode(&s, &out);
        cr_assert(rc == -EACCES || rc == -EBADMSG || rc == -EPROTO, "bit %zu: %d", bit, rc);
        s.hdr[bit / 8] ^= (uint8_t)(1u << (bit % 8));
    }
    cr_assert_eq(decode(&s, &out), 0);
}

Test(wire, payload_is_signed)
{
    struct sample s;
    make(&s);
    shoal_msg_header out;
    s.p1[0] ^= 1;
    cr_assert_eq(decode(&s, &out), -EACCES);
    s.p1[0] ^= 1;
    /* The same bytes split differently between the two payload frames. */
    char joined[64];
    snprintf(joined, sizeof joined, "hello%s", s.p1);
    s.frames[1] = (shoal_frame){joined, 4};
    s.frames[2] = (shoal_frame){joined + 4, strlen(joined) - 4};
    cr_assert_eq(decode(&s, &out), -EACCES, "framing is signed too");
}

Test(wire, buffer_lengths_are_signed_but_not_their_bytes)
{
    struct sample s;
    make(&s);
    shoal_msg_header out;
    s.buf[500] ^= 0xff;
    cr_assert_eq(decode(&s, &out), 0, "buffer bytes are not signed (docs/protocol.md says why)");
    s.frames[3].len = 999;
    cr_assert_eq(decode(&s, &out), -EBADMSG, "body_len disagrees");
    /* Shift a byte from the buffer into the payload: same body, other lengths. */
    s.frames[2].len += 1;
    cr_assert_eq(decode(&s, &out), -EACCES);
}

Test(wire, two_macs_the_header_s_then_the_body_s)
{
    struct sample s;
    make(&s);
    shoal_msg_header out;
    cr_assert_eq(decode(&s, &out), 0);
    s.hdr[64] ^= 1;
    cr_assert_eq(decode(&s, &out), -EACCES, "the header's MAC");
    s.hdr[64] ^= 1;
    s.hdr[80] ^= 1;
    cr_assert_eq(decode(&s, &out), -EACCES, "the body's MAC");
    s.hdr[80] ^= 1;
    s.hdr[24] ^= 1;
    cr_assert_eq(decode(&s, &out), -EACCES, "a header field, under both");
    s.hdr[24] ^= 1;
    cr_assert_eq(decode(&s, &out), 0, "as it was");
}

Test(wire, structural_errors)
{
    struct sample s;
    make(&s);
    shoal_msg_header out;
    cr_assert_eq(shoal_wire_decode(key, s.frames, 0, NULL, &out), -EBADMSG, "no frames");
    cr_assert_eq(shoal_wire_decode(key, s.frames, 3, NULL, &out), -EBADMSG, "a frame missing");
    shoal_frame extra[5];
    memcpy(extra, s.frames, sizeof s.frames);
    extra[4] = (shoal_frame){"x", 1};
    cr_assert_eq(shoal_wire_decode(key, extra, 5, NULL, &out), -EBADMSG, "a frame too many");
    s.frames[0].len = SHOAL_WIRE_HDR - 1;
    cr_assert_eq(decode(&s, &out), -EBADMSG, "short header");
    s.frames[0].len = SHOAL_WIRE_HDR;
    s.hdr[4] = 1;
    cr_assert_eq(decode(&s, &out), -EPROTO, "version 1 (one MAC over everything)");
    s.hdr[4] = 3;
    cr_assert_eq(decode(&s, &out), -EPROTO, "version 3");
    s.hdr[4] = 2;
    s.hdr[0] ^= 1;
    cr_assert_eq(decode(&s, &out), -EBADMSG, "magic");
}

Test(wire, limits_are_checked_before_hashing)
{
    struct sample s;
    make(&s);
    shoal_msg_header out;
    uint8_t other[SHOAL_WIRE_KEY];
    memcpy(other, key, sizeof other);
    other[0] ^= 1;
    shoal_wire_limits small = {.max_frame = 999, .max_body = 1 << 20};
    /* Signed with our key: refused, and its header (authentic) says which message. */
    out.msg_id = 0;
    cr_assert_eq(shoal_wire_decode(key, s.frames, 4, &small, &out), -EFBIG);
    cr_assert_eq(out.msg_id, 77, "the header of a signed message too large");
    cr_assert_eq(out.body_len, 5 + strlen(s.p1) + sizeof s.buf);
    /* Without the key: refused as too large, nothing of it trusted. */
    out.msg_id = 999;
    cr_assert_eq(shoal_wire_decode(other, s.frames, 4, &small, &out), -EMSGSIZE);
    cr_assert_eq(out.msg_id, 999, "untouched without the key");
    small = (shoal_wire_limits){.max_frame = 1 << 20, .max_body = 1000};
    cr_assert_eq(shoal_wire_decode(key, s.frames, 4, &small, &out), -EFBIG);
    cr_assert_eq(shoal_wire_decode(other, s.frames, 4, &small, &out), -EMSGSIZE);
    small.max_body = 5 + strlen(s.p1) + 1000;
    cr_assert_eq(shoal_wire_decode(key, s.frames, 4, &small, &out), 0, "exactly at the limit");
}

Test(wire, random_frames_never_decode_and_never_crash)
{
    unsigned seed = 11;
    static uint8_t bytes[8][256];
    shoal_frame f[8];
    shoal_msg_header out;
    for (int k = 0; k < 20000; k++) {
        size_t n = (size_t)rand_r(&seed) % 8;
        for (size_t i = 0; i < n; i++) {
            size_t len = (size_t)rand_r(&seed) % sizeof bytes[i];
            if (i == 0 && rand_r(&seed) % 2)
                len = SHOAL_WIRE_HDR; /* often the right size, to get past the first check */
            for (size_t j = 0; j < len; j++)
                bytes[i][j] = (uint8_t)rand_r(&seed);
            if (i == 0 && len >= 8 && rand_r(&seed) % 2) {
                bytes[0][0] = 'S', bytes[0][1] = 'H', bytes[0][2] = 'W', bytes[0][3] = 'P';
                bytes[0][4] = 1, bytes[0][5] = 0;
            }
            f[i] = (shoal_frame){bytes[i], len};
        }
        int rc = shoal_wire_decode(key, f, n, NULL, &out);
        cr_assert(rc < 0, "random bytes decoded (iteration %d)", k);
    }
}

Test(wire, strerror_names_each_error)
{
    cr_assert_str_eq(shoal_wire_strerror(-EACCES), "bad signature");
    cr_assert_str_eq(shoal_wire_strerror(-EBADMSG), "malformed message");
    cr_assert_str_eq(shoal_wire_strerror(-EPROTO), "unsupported protocol version");
    cr_assert_str_eq(shoal_wire_strerror(-EMSGSIZE), "message too large");
    cr_assert(strstr(shoal_wire_strerror(-ESTALE), "stamp"));
}
