/*
 * node_agent/bulk.h - the agent's bulk server (docs/machines.md, "The bulk
 * path"; docs/agent.md, "The bulk server"): a TCP port where clients and
 * other agents send transfers (include/shoal/xfer.h), received straight
 * into arena blocks and passed on along a chain of agents. The agent's
 * main loop takes what arrived (shoal__bulk_take) when the eventfd says so.
 */
#ifndef SHOAL_AGENT_BULK_H
#define SHOAL_AGENT_BULK_H

#include <shoal/arena.h>
#include <shoal/xfer.h>

#include <stddef.h>
#include <stdint.h>

typedef struct shoal_bulk shoal_bulk;

/* What a shoal_bulk_arrival is. */
enum {
    SHOAL_BULK_ARRIVED = 0, /* a transfer: the block of a TASK that names it */
    SHOAL_BULK_DIRECT = 1,  /* a client's direct task (docs/machines.md, "Direct tasks") */
    SHOAL_BULK_ABORT = 2,   /* a client's abort of its direct task `task` */
};

/* A transfer that ended here: arrived whole (status 0, the block in h,
 * held by this process: the taker owns that reference) or failed (status
 * a negative errno, why says what happened; no block). A direct task also
 * says whose it is (token: the client's connection, task: the client's id
 * for it), its targets (nt engine ids, malloc'd: the taker frees them),
 * and xid: the transfer its block is (0: the block is h). */
typedef struct shoal_bulk_arrival {
    uint64_t id;
    int status;
    int kind;
    shoal_handle h;
    uint64_t token, task, xid;
    uint32_t *targets;
    uint32_t nt;
    char why[200];
} shoal_bulk_arrival;

/*
 * Starts the server: a listening TCP socket on the address of this host's
 * interface that reaches ctl_endpoint ("tcp://HOST:PORT", the controller's;
 * 127.0.0.1 when that is on loopback), an ephemeral port, and a thread that
 * accepts (then a thread per connection). key is the cluster key (copied);
 * encrypt: SHOAL_XFER_ENCRYPT on every connection. Returns 0 and *out, or a
 * negative errno (why[len] says what failed). The arena must outlive it.
 */
int shoal__bulk_start(shoal_arena *arena, const uint8_t key[SHOAL_XFER_KEY], int encrypt,
                      const char *ctl_endpoint, shoal_bulk **out, char *why, size_t len);

/* "tcp://IP:PORT", where peers reach the server. */
const char *shoal__bulk_endpoint(const shoal_bulk *b);

/* An eventfd that becomes readable when transfers ended (read it to reset). */
int shoal__bulk_eventfd(const shoal_bulk *b);

/* Moves up to max transfers that ended into out; returns how many. Thread-safe. */
size_t shoal__bulk_take(shoal_bulk *b, shoal_bulk_arrival *out, size_t max);

/*
 * Results over the bulk channel (docs/machines.md, "The bulk path",
 * results): a client that sends the record SHOAL_BULK_TOKEN (8 bytes, its
 * token) on its connection has that connection registered under the token.
 * shoal__bulk_send_result queues the first len bytes of block h (a reply's
 * message block) as transfer xid on that connection, to be sent by the
 * connection's sender thread from the arena, without a copy. Returns 0:
 * queued, and the server owns our reference to h from then on (it releases
 * it once the block is sent, or the connection failed); or -ENOENT (no live
 * connection has that token), -ENOMEM: the caller keeps h. Thread-safe; it
 * never blocks on a socket.
 */
#define SHOAL_BULK_TOKEN 128u /* = SHOAL_XFER_APP: the record a client's token comes in */
int shoal__bulk_send_result(shoal_bulk *b, uint64_t token, uint64_t xid, shoal_handle h, uint64_t len);

/*
 * Direct tasks (docs/machines.md, "Direct tasks"): a client sends a task for
 * engines of this node as a transfer whose metadata is {"task": ID,
 * "targets": [engine ids], "xid": "HEX"} ("xid", optional: the task's block
 * is that transfer's, sent along a chain; this one's is then ignored), and
 * an abort as the record SHOAL_BULK_ABORT_RECORD (8 bytes: the task's ID).
 * shoal__bulk_send_reply sends an engine's reply (or output) to such a task
 * back on the client's connection: the first len bytes of block h as
 * transfer xid, its metadata {"task": ID, "engine": engine, "type": type}
 * (type: SHOAL_MSG_RESULT or SHOAL_MSG_OUTPUT). Ownership and returns as
 * shoal__bulk_send_result's. While replies of direct tasks are due on a
 * connection (one per target of each), its sender sends
 * SHOAL_BULK_KEEPALIVE (no payload) after each second with nothing to
 * send, so that the client tells a quiet agent from a lost one.
 */
#define SHOAL_BULK_ABORT_RECORD 129u
#define SHOAL_BULK_KEEPALIVE 130u
#define SHOAL_BULK_KEEPALIVE_MS 1000
int shoal__bulk_send_reply(shoal_bulk *b, uint64_t token, uint64_t xid, uint64_t task, uint32_t engine,
                           unsigned type, shoal_handle h, uint64_t len);

/* Stops accepting, cuts every connection, waits (up to 2 s) for their
 * threads, releases the blocks of arrivals not taken, and frees b.
 * Accepts NULL. */
void shoal__bulk_stop(shoal_bulk *b);

#endif /* SHOAL_AGENT_BULK_H */
