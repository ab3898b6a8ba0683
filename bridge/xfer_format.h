/*
 * bridge/xfer_format.h - the bulk channel's byte formats (docs/xfer.md): the
 * hello and the record header, encoded and decoded without any I/O, so that
 * the fuzz target (tests/fuzz/fuzz_xfer.c) and the tests can run the very
 * checks a connection runs on its peer's bytes (pure computation on caller
 * memory: safe from any thread); and a way for them to send records that a
 * real sender never would.
 */
#ifndef SHOAL_XFER_FORMAT_H
#define SHOAL_XFER_FORMAT_H

#include <shoal/xfer.h>

#include <stddef.h>
#include <stdint.h>

#define SHOAL__XFER_MAGIC 0x46584853u /* "SHXF" little-endian */
#define SHOAL__XFER_VERSION 1u

/* Ciphers a hello offers (a bit each). */
enum { SHOAL__XFER_OFFER_AESGCM = 1u << 0, SHOAL__XFER_OFFER_CHACHA = 1u << 1 };
/* Wire flags of a hello. */
enum { SHOAL__XFER_WIRE_ENCRYPT = 1u << 0 };

/* A hello's fields. */
typedef struct shoal__xfer_hello {
    uint8_t role;        /* SHOAL_XFER_CLIENT or SHOAL_XFER_SERVER */
    uint8_t ciphers;     /* SHOAL__XFER_OFFER_* */
    uint32_t flags;      /* SHOAL__XFER_WIRE_* */
    uint32_t max_record; /* the longest payload the sender accepts */
    uint8_t pk[32];      /* its ephemeral X25519 public key */
    uint8_t nonce[32];   /* fresh random bytes */
} shoal__xfer_hello;

/* Writes h as SHOAL_XFER_HELLO bytes. */
void shoal__xfer_hello_encode(const shoal__xfer_hello *h, uint8_t out[SHOAL_XFER_HELLO]);

/*
 * Decodes a hello of len bytes. Returns 0, or -EPROTO: len is not
 * SHOAL_XFER_HELLO, or the magic, version, length field, role, a flag
 * this version does not know or a reserved byte is wrong, or max_record is
 * below 64 KiB (a peer could not take a BEGIN's metadata).
 */
int shoal__xfer_hello_decode(const uint8_t *in, size_t len, shoal__xfer_hello *h);

/* Writes h (seq included) as SHOAL_XFER_HDR clear bytes. */
void shoal__xfer_hdr_encode(const shoal_xfer_hdr *h, uint8_t out[SHOAL_XFER_HDR]);

/*
 * Decodes a header's SHOAL_XFER_HDR clear bytes (already authenticated) and
 * checks what can be checked without the connection's state. Returns 0, or
 * -EPROTO (the reserved byte, an unknown type, flags on a library type, a
 * payload on END, ABORT or CLOSE), or -EMSGSIZE (a payload over
 * SHOAL_XFER_MAX_RECORD, or a BEGIN's over SHOAL_XFER_MAX_META). *h is
 * written either way.
 */
int shoal__xfer_hdr_decode(const uint8_t in[SHOAL_XFER_HDR], shoal_xfer_hdr *h);

/*
 * For the tests and the fuzz target: a peer that holds the key but breaks
 * the rules. Seals (or MACs) the clear header bytes raw as they are, with
 * len bytes of payload whatever raw's length field says, under the
 * connection's next record number (which raw's seq field need not match).
 * Returns 0, -EINVAL (payload NULL with len, len over
 * SHOAL_XFER_MAX_RECORD) or an error of shoal_xfer_send. Never use it to
 * talk to a real peer.
 */
int shoal__xfer_send_raw(shoal_xfer *c, const uint8_t raw[SHOAL_XFER_HDR], const void *payload, size_t len);

/* The number the connection's next record will have. */
uint64_t shoal__xfer_tx_seq(const shoal_xfer *c);

#endif /* SHOAL_XFER_FORMAT_H */
