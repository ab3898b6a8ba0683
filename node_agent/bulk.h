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

/* A transfer that ended here: arrived whole (status 0, the block in h,
 * held by this process: the taker owns that reference) or failed (status
 * a negative errno, why says what happened; no block). */
typedef struct shoal_bulk_arrival {
    uint64_t id;
    int status;
    shoal_handle h;
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

/* Stops accepting, cuts every connection, waits (up to 2 s) for their
 * threads, releases the blocks of arrivals not taken, and frees b.
 * Accepts NULL. */
void shoal__bulk_stop(shoal_bulk *b);

#endif /* SHOAL_AGENT_BULK_H */
