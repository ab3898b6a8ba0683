/*
 * shoal/curve.h - CurveZMQ on the controller's TCP sockets: keys, their Z85
 * text, setting up a server (the controller) and its members (clients and
 * agents), admitting members through ZAP, and watching handshakes.
 *
 * A cluster has two key pairs, both made fresh by the controller at each
 * start: the server's, whose secret half never leaves the controller's
 * memory, and the members' one, which the connection file carries whole
 * (docs/controller.md). Curve encrypts every frame and makes fresh session
 * keys for each connection; the ZAP handler admits only connections that
 * prove they hold the member secret key. docs/protocol.md, "Security", says
 * what this protects and what it does not.
 *
 * Everything here is plain computation or calls on sockets the caller owns:
 * safe from any thread as long as each socket is used from one.
 */
#ifndef SHOAL_CURVE_H
#define SHOAL_CURVE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SHOAL_CURVE_KEY 32u /* bytes of a Curve25519 key */
#define SHOAL_CURVE_Z85 40u /* characters of a key in Z85 text (without the NUL) */
/* ZAP domains the controller gives its two sockets: a ZAP request names
 * the socket the connection came to. */
#define SHOAL_CURVE_DOMAIN_CLIENTS "shoal-clients"
#define SHOAL_CURVE_DOMAIN_AGENTS "shoal-agents"
/* Bytes CurveZMQ adds to each frame on the wire: its MESSAGE command's name
 * (8), nonce (8), MAC (16) and flags (1). libzmq applies ZMQ_MAXMSGSIZE to
 * the frame as it arrives, so a socket that speaks Curve and takes frames
 * of up to N bytes sets N + SHOAL_CURVE_FRAME_OVERHEAD. */
#define SHOAL_CURVE_FRAME_OVERHEAD 33

/* What a member (a client, an agent) needs to connect: the server's public
 * key, and the member key pair. */
typedef struct shoal_curve_member {
    uint8_t server_key[SHOAL_CURVE_KEY];
    uint8_t public_key[SHOAL_CURVE_KEY];
    uint8_t secret_key[SHOAL_CURVE_KEY];
} shoal_curve_member;

/* 1 if this libzmq was built with CURVE (zmq_has("curve")), else 0. */
int shoal_curve_available(void);

/* Makes a fresh key pair (zmq_curve_keypair). Returns 0, -ENOTSUP (libzmq
 * without CURVE) or -EIO. Leaves the outputs untouched on failure. */
int shoal_curve_keypair(uint8_t public_key[SHOAL_CURVE_KEY], uint8_t secret_key[SHOAL_CURVE_KEY]);

/* Writes key as Z85 text, NUL-terminated, into out. Cannot fail. */
void shoal_curve_z85_encode(const uint8_t key[SHOAL_CURVE_KEY], char out[SHOAL_CURVE_Z85 + 1]);

/*
 * Reads a key from its Z85 text. Returns 0 with key set, or
 *   -ENOENT  text is NULL (the caller's "missing, or not a string");
 *   -EINVAL  text is not 40 characters long;
 *   -EILSEQ  a character outside Z85's alphabet;
 *   -ERANGE  a group of 5 characters stands for more than 32 bits (not
 *            text that Z85 makes).
 * key is untouched on failure. shoal_curve_strerror says which in words.
 */
int shoal_curve_z85_decode(const char *text, uint8_t key[SHOAL_CURVE_KEY]);

/*
 * Reads a member's three keys, as the connection file gives them, and
 * checks that public_key is secret_key's public half. Returns 0 with *out
 * set, a shoal_curve_z85_decode error, -EKEYREJECTED (the halves do not
 * match) or -EIO (libsodium did not initialise). On failure *field (if field is not NULL) names the culprit:
 * "server_key", "public_key" or "secret_key", and *out is untouched.
 */
int shoal_curve_member_parse(const char *server_key, const char *public_key, const char *secret_key,
                             shoal_curve_member *out, const char **field);

/* What a shoal_curve_* error means, as the end of a sentence that starts with
 * the field's name ("... is not 40 characters long (a Z85 key is)"). */
const char *shoal_curve_strerror(int rc);

/*
 * Makes sock (not yet connected) a Curve client of the member: sets
 * ZMQ_CURVE_SERVERKEY, ZMQ_CURVE_PUBLICKEY and ZMQ_CURVE_SECRETKEY. Returns
 * 0 or a negative errno from ZeroMQ (-EINVAL: libzmq without CURVE).
 */
int shoal_curve_client(void *sock, const shoal_curve_member *k);

/*
 * Makes sock (not yet bound) a Curve server with secret_key, whose
 * connections the ZAP handler is asked about under zap_domain. Bind the
 * ZAP handler (shoal_curve_zap_bind) before binding sock: a connection
 * accepted while no handler is bound is admitted unasked (libzmq 4.3
 * without ZMQ_ZAP_ENFORCE_DOMAIN). Returns 0 or a negative errno.
 */
int shoal_curve_server(void *sock, const uint8_t secret_key[SHOAL_CURVE_KEY], const char *zap_domain);

/*
 * A ZAP handler (RFC 27) in ctx: a REP socket bound to
 * inproc://zeromq.zap.01, the address libzmq asks. One per context.
 * On success *zap is the socket (the caller's to zmq_close) and 0 is
 * returned; else a negative errno (-EADDRINUSE: ctx has one already).
 */
int shoal_curve_zap_bind(void *ctx, void **zap);

/* One ZAP request answered. */
typedef struct shoal_curve_zap_request {
    int admitted;       /* 1: status 200; 0: status 400 */
    char domain[64];    /* the socket's ZMQ_ZAP_DOMAIN */
    char address[64];   /* the peer's IP address, as libzmq gives it */
    char mechanism[16]; /* "CURVE" for our sockets */
} shoal_curve_zap_request;

/*
 * Answers one request waiting on zap without waiting for one: admits a
 * CURVE connection whose client key is member_public, and refuses anything
 * else (status 400), a malformed request included. Returns 1 with *req
 * describing it, 0 when nothing waits, or a negative errno. Never blocks:
 * the reply goes with ZMQ_DONTWAIT (an inproc pipe that holds one reply).
 */
int shoal_curve_zap_serve(void *zap, const uint8_t member_public[SHOAL_CURVE_KEY], shoal_curve_zap_request *req);

/* A handshake that a socket monitor reported. */
typedef struct shoal_curve_event {
    unsigned event; /* ZMQ_EVENT_HANDSHAKE_SUCCEEDED, _FAILED_NO_DETAIL, _FAILED_PROTOCOL or _FAILED_AUTH */
    uint32_t value; /* _FAILED_AUTH: the ZAP status code; _FAILED_PROTOCOL: a ZMQ_PROTOCOL_ERROR_* */
    char endpoint[256];
} shoal_curve_event;

/*
 * Watches sock's handshakes: *monitor is a PAIR socket in ctx on which
 * shoal_curve_monitor_read reads them (the caller's to zmq_close, before
 * sock). Call before sock connects or binds, so that no handshake goes
 * unseen. Returns 0 or a negative errno.
 */
int shoal_curve_monitor(void *ctx, void *sock, void **monitor);

/* Reads one event without waiting: 1 with *ev set, 0 when none waits, or a
 * negative errno. */
int shoal_curve_monitor_read(void *monitor, shoal_curve_event *ev);

/*
 * Whether ev ends every hope of connecting with these keys: the server
 * refused them (ZAP), the keys do not fit (a cryptographic error), or one
 * side speaks Curve and the other does not. A handshake cut short without
 * detail (a peer that went away) is not. Writes why, in words, into
 * why[len] when it returns 1.
 */
int shoal_curve_event_fatal(const shoal_curve_event *ev, char *why, size_t len);

#ifdef __cplusplus
}
#endif

#endif /* SHOAL_CURVE_H */
