/*
 * shoal/xfer.h - the bulk channel: large buffers between machines, straight
 * from and into arena memory, over a connected stream socket of their own.
 *
 * Both ends of a connection know the 32-byte cluster key. The handshake
 * (shoal_xfer_open) exchanges fresh X25519 keys and nonces, proves to each
 * side that the other holds the cluster key, and derives one key per
 * direction from both. The stream is then a sequence of records: a 48-byte
 * header (sealed, or MACed when encryption is off) and a payload, sealed
 * with AES-256-GCM or ChaCha20-Poly1305 when encryption is on. A transfer is
 * a BEGIN record (its size and a small blob of metadata), DATA records of
 * one chunk each, and an END record; a receiver can forward every DATA
 * record to further connections as soon as it has it, so that a broadcast
 * along a chain of hosts is pipelined. docs/xfer.md has the byte tables,
 * the key derivation and the figures.
 *
 * Conventions: functions return 0 on success and a negative errno on
 * failure. shoal_xfer_open writes through its out-parameter and leaves it
 * untouched on failure; shoal_xfer_close accepts NULL. Errors a connection
 * cannot recover from (everything but the ones each function calls
 * harmless) are sticky, per direction: after a failed send every later send
 * returns the same error, after a failed receive every later receive; the
 * caller should then close the connection.
 *
 * Threads: one thread may send and one other thread receive on the same
 * connection at once (their state is separate; the sticky error is atomic);
 * two threads must not both send, or both receive, on one connection.
 * shoal_xfer_recv_buffer sends on the connections it forwards to: nothing
 * else may send on those while it runs. Connections share no state: the
 * library has none beyond libsodium's one-time initialisation.
 */
#ifndef SHOAL_XFER_H
#define SHOAL_XFER_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct shoal_xfer shoal_xfer;

#define SHOAL_XFER_KEY 32u                /* bytes of the cluster key */
#define SHOAL_XFER_HELLO 96u              /* bytes of a hello on the wire */
#define SHOAL_XFER_PROOF 32u              /* bytes of a proof on the wire */
#define SHOAL_XFER_HDR 32u                /* bytes of a record header, in the clear */
#define SHOAL_XFER_WIRE_HDR 48u           /* ... on the wire: sealed or MACed, with its tag */
#define SHOAL_XFER_TAG 16u                /* the tag after an encrypted payload */
#define SHOAL_XFER_MAX_RECORD (16u << 20) /* the longest payload a receiver accepts */
#define SHOAL_XFER_MAX_META (64u << 10)   /* the most metadata a BEGIN carries */
#define SHOAL_XFER_CHUNK (1u << 20)       /* the default chunk of shoal_xfer_send_buffer */
#define SHOAL_XFER_IDLE_MS 60000          /* the default of shoal_xfer_set_idle_timeout */

/* Roles: the side that connected is the client, the side that accepted the
 * server. The two sides of a connection must have different roles. */
enum { SHOAL_XFER_CLIENT = 1, SHOAL_XFER_SERVER = 2 };

/* Flags of shoal_xfer_open. Both sides must agree on ENCRYPT. */
enum {
    SHOAL_XFER_ENCRYPT = 1u << 0, /* seal every record; without it only headers are authenticated */
    SHOAL_XFER_CHACHA = 1u << 1,  /* offer ChaCha20-Poly1305 only, even where AES-256-GCM would do */
    SHOAL_XFER_AESGCM = 1u << 2,  /* offer AES-256-GCM only (-ENOTSUP where this CPU lacks it) */
};

/* The cipher a connection uses (shoal_xfer_cipher). */
enum { SHOAL_XFER_CIPHER_NONE = 0, SHOAL_XFER_CIPHER_AES256GCM = 1, SHOAL_XFER_CIPHER_CHACHA20POLY1305 = 2 };

/*
 * Record types. Values are part of the protocol: append, never renumber.
 * Types from SHOAL_XFER_APP up are the caller's: the library carries them
 * and never looks inside.
 */
enum {
    SHOAL_XFER_BEGIN = 1, /* a transfer starts: offset = its total length, payload = its metadata */
    SHOAL_XFER_DATA = 2,  /* bytes of a transfer: offset = where they go in it */
    SHOAL_XFER_END = 3,   /* the transfer is complete: offset = its total length, no payload */
    SHOAL_XFER_ABORT = 4, /* the sender gives the transfer up: no payload */
    SHOAL_XFER_CLOSE = 5, /* the sender will send nothing more (shoal_xfer_shutdown) */
    SHOAL_XFER_APP = 128, /* first of the caller's types (up to 255) */
};

/* A record header, in the clear. */
typedef struct shoal_xfer_hdr {
    uint8_t type;    /* one of the types above */
    uint16_t flags;  /* free for the caller's types; 0 for the library's */
    uint32_t length; /* payload bytes that follow */
    uint64_t seq;    /* the record's number in its direction (the library sets it) */
    uint64_t id;     /* the transfer it belongs to */
    uint64_t offset; /* per type, above */
} shoal_xfer_hdr;

/*
 * Runs the handshake on fd, a connected stream socket (TCP or Unix; -ENOTSOCK
 * or -EPROTOTYPE otherwise), as role, with key, the cluster key. flags are
 * SHOAL_XFER_*; timeout_ms bounds the whole handshake (-1: no bound, which is
 * not advised for a socket that reaches another machine).
 *
 * Returns 0 and *out, or:
 *   -EINVAL          bad role or flags;
 *   -ENOTSUP         SHOAL_XFER_AESGCM on a CPU without AES-256-GCM;
 *   -EPROTO          the peer's hello is malformed (size, magic, version, a
 *                    role like ours, non-zero reserved bytes, our own key
 *                    reflected), or its connection closed mid-hello;
 *   -EACCES          the peer's proof is wrong: it does not hold key, or the
 *                    bytes are a replay of another connection's;
 *   -EPROTONOSUPPORT the peer holds key but wants the other mode (encrypted
 *                    or not), or the two offer no cipher in common;
 *   -ETIMEDOUT       the handshake did not finish within timeout_ms;
 *   -ECONNRESET      the peer closed the connection before its hello or
 *                    its proof;
 *   -ENOMEM, or the errno of a failed send, recv or poll.
 * The peer's proof is checked before anything after it is read.
 *
 * Ownership: the caller keeps fd (shoal_xfer_close does not close it) and
 * key (used during the call only, not kept: the connection holds only the
 * keys derived from it); the caller owns *out.
 * On failure fd is left mid-handshake: close it. The fd's O_NONBLOCK flag
 * does not matter and is not changed. Thread-safe (separate connections).
 */
int shoal_xfer_open(int fd, int role, const uint8_t key[SHOAL_XFER_KEY], unsigned flags, int timeout_ms,
                    shoal_xfer **out);

/*
 * Frees a connection and wipes its keys. Does not close the fd nor send
 * anything (shoal_xfer_shutdown does). Accepts NULL. No other call may be
 * running on c.
 */
void shoal_xfer_close(shoal_xfer *c);

/*
 * Sends a CLOSE record: the peer's next shoal_xfer_recv_hdr returns
 * -ESHUTDOWN, where an EOF without it would give -ECONNRESET (so a peer can
 * tell the end of a connection from a cut). The caller then closes the fd;
 * it should read until its own -ESHUTDOWN first if the peer may still be
 * sending, or the kernel may reset the connection and drop what is in
 * flight. Returns 0 or a send error; nothing can be sent after it (-EPIPE).
 */
int shoal_xfer_shutdown(shoal_xfer *c);

/* The connection's socket (for poll: POLLIN means a record may be there).
 * Owned by the caller. */
int shoal_xfer_fd(const shoal_xfer *c);

/* The cipher the handshake chose: SHOAL_XFER_CIPHER_*. */
int shoal_xfer_cipher(const shoal_xfer *c);

/*
 * Sets how long a send or a receive that has started may wait for the
 * socket to make any progress (-1: for ever). Default SHOAL_XFER_IDLE_MS.
 * A call that waits longer fails with -ETIMEDOUT, and the connection with
 * it. Call it when no other call is running on c.
 */
void shoal_xfer_set_idle_timeout(shoal_xfer *c, int idle_ms);

/*
 * While set, records go to the socket with MSG_MORE: the kernel keeps a
 * segment that is not full for the next send. Set it before a burst of
 * records that leave together, and clear it before the burst's last (a
 * record sent with it set and nothing after waits up to 200 ms).
 * shoal_xfer_send_buffer does so itself. Call it from the sending thread.
 */
void shoal_xfer_set_more(shoal_xfer *c, int more);

/*
 * Sends one record: hdr's type, flags, id and offset (its seq and length are
 * ignored: the library numbers records, and the length is len), then len
 * bytes of payload (at most SHOAL_XFER_MAX_RECORD; payload may be NULL when
 * len is 0). Encrypted, the payload is sealed into a staging buffer the
 * connection keeps (grown to the largest payload sent so far); plain, it is
 * written from payload itself. Blocks until the socket has taken all of it,
 * bounded by the idle timeout.
 * The record is checked as its receiver will check it; what would be
 * refused there is refused here, harmlessly (nothing is sent):
 * -EINVAL (type 0, CLOSE or another between ABORT and SHOAL_XFER_APP -
 * CLOSE goes through shoal_xfer_shutdown -, flags on a library type, a
 * payload on END or ABORT, payload NULL with len not 0), -EMSGSIZE (len
 * over SHOAL_XFER_MAX_RECORD, or over SHOAL_XFER_MAX_META on BEGIN),
 * -ENOMEM. Otherwise returns 0 or a sticky error: -EPIPE or -ECONNRESET
 * (the peer is gone), -ETIMEDOUT, another sendmsg errno.
 * The caller keeps payload. One sending thread at a time (see the top).
 */
int shoal_xfer_send(shoal_xfer *c, const shoal_xfer_hdr *hdr, const void *payload, size_t len);

/*
 * Sends a whole transfer: BEGIN (len, meta), DATA records of chunk bytes
 * (0: SHOAL_XFER_CHUNK; the last one shorter), END. Memory in flight is
 * the socket buffers plus, encrypted, one chunk of staging. buf may be NULL
 * when len is 0; meta may be NULL when metalen is 0.
 * Returns 0 once the last byte is in the socket (not: received), -EINVAL,
 * -EMSGSIZE (chunk over SHOAL_XFER_MAX_RECORD, metalen over
 * SHOAL_XFER_MAX_META) before anything is sent, or an error of
 * shoal_xfer_send. The caller keeps buf and meta.
 */
int shoal_xfer_send_buffer(shoal_xfer *c, uint64_t id, const void *meta, size_t metalen, const void *buf,
                           size_t len, size_t chunk);

/*
 * Receives the next record's header into *out, waiting up to timeout_ms for
 * its first byte (-1: for ever; 0: only if it is there already), the rest
 * within the idle timeout. Checks it before returning: authenticated
 * (encrypted: opened; plain: its MAC), the expected sequence number, a
 * known type, its length within SHOAL_XFER_MAX_RECORD (and no payload on
 * END, ABORT and CLOSE, at most SHOAL_XFER_MAX_META on BEGIN).
 * If out->length is not 0, the payload must be taken next, with
 * shoal_xfer_recv_payload or shoal_xfer_skip_payload.
 * Returns 0, or harmlessly -ETIMEDOUT (nothing had arrived in timeout_ms:
 * try again) or -EBUSY (a payload is still to be taken); or, sticky:
 *   -ESHUTDOWN   the peer sent CLOSE: it will send nothing more;
 *   -ECONNRESET  the connection ended (EOF without CLOSE, or a reset);
 *   -EBADMSG     the header failed authentication or has another sequence
 *                number (a record altered, dropped, repeated or reordered);
 *   -EPROTO      an unknown type, non-zero reserved bytes, a payload on a
 *                record that has none;
 *   -EMSGSIZE    a payload longer than the limits above;
 *   -ETIMEDOUT   the header started but did not finish within the idle
 *                timeout; or the errno of recv or poll.
 * One receiving thread at a time (see the top).
 */
int shoal_xfer_recv_hdr(shoal_xfer *c, shoal_xfer_hdr *out, int timeout_ms);

/*
 * Receives the payload announced by the last header, len bytes (exactly
 * its length), into dst, which the caller owns (an arena block, say). The
 * bytes are received straight into dst and, encrypted, opened there in
 * place; 0 means they are authentic. On any error dst holds garbage.
 * Returns 0, or harmlessly -EINVAL (no payload is pending, or len is not
 * its length), or a sticky -EBADMSG (failed authentication), -ECONNRESET,
 * -ETIMEDOUT (idle), or a recv/poll errno.
 */
int shoal_xfer_recv_payload(shoal_xfer *c, void *dst, size_t len);

/*
 * Receives the pending payload into memory of the connection's own (kept,
 * grown to the largest payload skipped) and drops it, after checking it as
 * shoal_xfer_recv_payload does. Returns 0 (also when nothing is pending), or
 * -ENOMEM (harmless) or an error of shoal_xfer_recv_payload.
 */
int shoal_xfer_skip_payload(shoal_xfer *c);

/* What a BEGIN record says; meta points into the connection's memory (see
 * each use for how long it stays valid). */
typedef struct shoal_xfer_begin {
    uint64_t id;      /* the transfer's id */
    uint64_t total;   /* its length in bytes */
    const void *meta; /* the metadata the sender gave (up to SHOAL_XFER_MAX_META) */
    size_t metalen;
} shoal_xfer_begin;

/* One connection to forward a transfer to. */
typedef struct shoal_xfer_route {
    shoal_xfer *conn; /* owned by the caller; nothing else may send on it meanwhile */
    const void *meta; /* the metadata of the BEGIN it gets (may differ from the one received) */
    size_t metalen;
    int status; /* out: 0, or the error that made the library stop sending on conn */
} shoal_xfer_route;

/* Where a transfer goes, as the accept callback decides it. */
typedef struct shoal_xfer_sink {
    void *dst;                /* total bytes, owned by the caller; NULL: not kept here */
    shoal_xfer_route *routes; /* forward every record to these (NULL: none) */
    size_t nroutes;
} shoal_xfer_sink;

/*
 * Called by shoal_xfer_recv_buffer once it has the BEGIN record: fills
 * *sink (zeroed before the call) and returns 0 to take the transfer, or a
 * negative errno to refuse it. b->meta is valid during the call only.
 * Everything sink points to must stay valid until shoal_xfer_recv_buffer
 * returns.
 */
typedef int (*shoal_xfer_accept_fn)(void *ctx, const shoal_xfer_begin *b, shoal_xfer_sink *sink);

/*
 * Receives one whole transfer. begin is a BEGIN header the caller just
 * took with shoal_xfer_recv_hdr (its metadata still pending), or NULL: then
 * the next record is read, waiting up to timeout_ms for it, and must be a
 * BEGIN. accept (called once) says where the bytes go. Each DATA record is
 * received into sink->dst at its offset (or, dst NULL, into the
 * connection's own memory) and authenticated, then sent on every route
 * (re-sealed with that connection's keys, with the route's metadata in its
 * BEGIN) before the next record is read: along a chain of hosts the whole
 * transfer takes about one transfer's time plus one chunk's per hop.
 * A route whose send fails is dropped: its status says why, and the rest of
 * the transfer still arrives here and on the other routes. DATA records must
 * come in order, back to back from offset 0, none empty, none past BEGIN's
 * total; END must come at the total.
 * Returns 0 (the transfer is all in dst, authenticated; look at each route's
 * status), or:
 *   -ECANCELED     accept refused: the rest of the transfer was read and
 *                  dropped (authenticated all the same); the connection
 *                  stays usable;
 *   -ECONNABORTED  the sender sent ABORT: passed on to the routes; the
 *                  connection stays usable; dst holds part of the transfer;
 *   -EINVAL        (harmless) begin is not the BEGIN last read, with its
 *                  metadata still to be taken (nothing was read); or the
 *                  sink's routes are NULL or include c itself (the transfer
 *                  was then read and dropped, as if refused);
 *   -EPROTO        (sticky) the first record is not BEGIN, or a record out
 *                  of place: another type or id within the transfer, a DATA
 *                  record not at the next offset or empty, END early;
 *   -EMSGSIZE      (sticky) a DATA record that goes past BEGIN's total;
 *   or a sticky error of shoal_xfer_recv_hdr or _recv_payload. After a
 *   sticky error, the routes are sent ABORT (best effort).
 * info (may be NULL) gets BEGIN's id, total and metadata; info->meta points
 * into c and stays valid until the next receive on c.
 */
int shoal_xfer_recv_buffer(shoal_xfer *c, const shoal_xfer_hdr *begin, int timeout_ms,
                           shoal_xfer_accept_fn accept, void *ctx, shoal_xfer_begin *info);

/*
 * Splits "tcp://HOST:PORT" (HOST may be a bracketed IPv6 address) into host
 * and port, NUL-terminated, within hlen and plen bytes. Returns 0, or
 * -EINVAL for anything else (no scheme, no port, too long). Thread-safe.
 */
int shoal_xfer_endpoint_split(const char *ep, char *host, size_t hlen, char *port, size_t plen);

/*
 * Connects a TCP socket to ep ("tcp://HOST:PORT"), waiting up to
 * timeout_ms for the connection, with TCP_NODELAY set. Returns the fd
 * (close-on-exec and non-blocking; the caller owns it: shoal_xfer_open
 * takes it as it is), or -EINVAL (not such an endpoint), -EHOSTUNREACH
 * (the host does not resolve), -ETIMEDOUT, or the errno of socket or
 * connect (-ECONNREFUSED...). Thread-safe.
 */
int shoal_xfer_connect(const char *ep, int timeout_ms);

/* A short English name for an error these functions return. */
const char *shoal_xfer_strerror(int rc);

#ifdef __cplusplus
}
#endif

#endif /* SHOAL_XFER_H */
