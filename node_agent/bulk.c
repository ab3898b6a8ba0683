/*
 * node_agent/bulk.c - the agent's bulk server: large task data from clients
 * (and from the agent before this one in a chain) over the bulk channel
 * (include/shoal/xfer.h), received straight into arena blocks, and passed
 * on to the next agent of the chain record by record as it comes, so that
 * a broadcast to n hosts crosses each link once and takes about one
 * transfer's time plus a chunk per hop. A thread accepts; a thread per
 * connection receives (the transfers of one connection come one after the
 * other, and each is forwarded from that thread). What ended - a block, or
 * why it failed - waits in a table for the main loop, which an eventfd
 * wakes; the main loop matches it with the task that names it
 * (agent.c, route_task). docs/machines.md, "The bulk path", has the formats.
 *
 * Results go the other way on a client's own connection: a client that
 * sends its token (SHOAL_BULK_TOKEN) has its connection registered under
 * it, and the main loop queues large reply blocks for it
 * (shoal__bulk_send_result); a sender thread per such connection sends
 * them from the arena, so that the main loop never waits on a socket. The
 * receiving thread and the sender thread share the connection, as
 * xfer.h allows (one of each).
 */
#define _GNU_SOURCE
#include "bulk.h"

#include <shoal/wire.h>

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/sockios.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_CONNS 256      /* connections served at once; more are refused */
#define MAX_CHAIN 64       /* hops a transfer's metadata may name */
#define MAX_HOPS 8         /* connections to next hops a connection's thread keeps */
#define EP_LEN 80          /* "tcp://[v6 address]:port" */
#define OPEN_TIMEOUT_MS 10000
#define CONNECT_TIMEOUT_MS 3000
#define INLINE_MAX (16u << 10) /* a reply the main loop may send itself, when the connection is idle */

struct conn;

struct shoal_bulk {
    shoal_arena *arena;
    uint8_t key[SHOAL_XFER_KEY];
    unsigned flags; /* of shoal_xfer_open */
    int listen_fd, efd;
    char endpoint[EP_LEN];
    pthread_t acceptor;
    _Atomic int stopping;
    pthread_mutex_t mu; /* guards what follows */
    pthread_cond_t idle;
    int conn_fds[MAX_CONNS]; /* -1: free */
    struct conn *conns[MAX_CONNS]; /* the connection of each slot (NULL: free) */
    int nconns;
    shoal_bulk_arrival *done;
    size_t ndone, capdone;
};

/* A connection to the next hop of a chain, kept by one connection's thread. */
struct hop {
    char ep[EP_LEN];
    int fd;
    shoal_xfer *x;
};

/* A reply block to send to a client (shoal__bulk_send_result). */
struct job {
    uint64_t xid, len;
    shoal_handle h; /* our reference, released once sent (or given up) */
    char *meta;     /* its transfer's metadata (malloc'd; NULL: none) */
    int ends;       /* a direct task's RESULT: one reply fewer due on the connection */
};

struct conn {
    shoal_bulk *b;
    int fd, slot;
    struct hop hops[MAX_HOPS];
    int nhops;
    /* Results to the client; guarded by b->mu. */
    shoal_xfer *x;   /* the connection, once its handshake is done */
    uint64_t token;  /* the client's (0: none, or the connection failed: no more results on it) */
    int has_sender;  /* the sender thread was started */
    int closing;     /* the connection ends: the sender sends nothing more */
    uint64_t due;    /* replies of direct tasks still to send (one per target): keepalives while any */
    int busy;        /* the sender has taken a job and is sending it */
    int err;         /* a send failed: nothing more is sent on it */
    /* Held by whoever sends on x: the sender thread, or the main loop when
     * it sends a small reply itself (queue_job). Not under b->mu. */
    pthread_mutex_t tx;
    pthread_t sender;
    pthread_cond_t more; /* a job was queued, or closing was set */
    struct job *q;
    size_t nq, capq;
};

/* One transfer as it is received (the accept callback's context). */
struct rx {
    struct conn *c;
    shoal_handle h;
    int have_block;
    int alloc_err;
    char chain[MAX_CHAIN][EP_LEN];
    int nchain, next; /* chain[next] is where it goes on to (next == nchain: nowhere) */
    struct hop *hop;
    char *route_meta;
    shoal_xfer_route route;
    /* A direct task: the client's id for it, its targets and the transfer of its block (0: this one). */
    int direct;
    uint64_t task, xid;
    uint32_t *targets;
    uint32_t nt;
};

/* ---- addresses ------------------------------------------------------------------- */

static void format_endpoint(const struct sockaddr *sa, char *out, size_t len)
{
    char ip[INET6_ADDRSTRLEN] = "?";
    if (sa->sa_family == AF_INET6) {
        const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)sa;
        inet_ntop(AF_INET6, &s6->sin6_addr, ip, sizeof ip);
        snprintf(out, len, "tcp://[%s]:%u", ip, (unsigned)ntohs(s6->sin6_port));
    } else {
        const struct sockaddr_in *s4 = (const struct sockaddr_in *)sa;
        inet_ntop(AF_INET, &s4->sin_addr, ip, sizeof ip);
        snprintf(out, len, "tcp://%s:%u", ip, (unsigned)ntohs(s4->sin_port));
    }
}

static int resolve(const char *ep, int socktype, struct addrinfo **out)
{
    char host[256], port[16];
    if (shoal_xfer_endpoint_split(ep, host, sizeof host, port, sizeof port) < 0)
        return -EINVAL;
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = socktype};
    return getaddrinfo(host, port, &hints, out) == 0 ? 0 : -EHOSTUNREACH;
}

/* The address of this host's interface that reaches ep: a UDP socket
 * connected there (nothing is sent) says which one the routes pick. */
static int local_addr_for(const char *ep, struct sockaddr_storage *ss, socklen_t *sslen)
{
    struct addrinfo *ai;
    int rc = resolve(ep, SOCK_DGRAM, &ai);
    if (rc < 0)
        return rc;
    int fd = socket(ai->ai_family, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    rc = fd < 0 ? -errno : 0;
    if (rc == 0 && connect(fd, ai->ai_addr, ai->ai_addrlen) < 0)
        rc = -errno;
    *sslen = sizeof *ss;
    if (rc == 0 && getsockname(fd, (struct sockaddr *)ss, sslen) < 0)
        rc = -errno;
    if (fd >= 0)
        close(fd);
    freeaddrinfo(ai);
    return rc;
}

/* ---- what ended, for the main loop --------------------------------------------------- */

static void publish_arrival(shoal_bulk *b, const shoal_bulk_arrival *what);

static void publish(shoal_bulk *b, uint64_t id, int status, shoal_handle h, const char *why)
{
    shoal_bulk_arrival a = {.id = id, .status = status, .h = h};
    snprintf(a.why, sizeof a.why, "%s", why ? why : "");
    publish_arrival(b, &a);
}

/* Puts what ended in the table for the main loop, and wakes it. On no
 * memory it is dropped (a transfer's task fails when its wait runs out; a
 * direct task fails its client when its connection is given up). */
static void publish_arrival(shoal_bulk *b, const shoal_bulk_arrival *what)
{
    pthread_mutex_lock(&b->mu);
    if (b->ndone == b->capdone) {
        size_t cap = b->capdone ? 2 * b->capdone : 16;
        shoal_bulk_arrival *d = realloc(b->done, cap * sizeof *d);
        if (!d) {
            pthread_mutex_unlock(&b->mu);
            if (what->status == 0 && what->h.length)
                shoal_arena_release(b->arena, what->h);
            free(what->targets);
            return;
        }
        b->done = d;
        b->capdone = cap;
    }
    b->done[b->ndone++] = *what;
    pthread_mutex_unlock(&b->mu);
    uint64_t one = 1;
    ssize_t w = write(b->efd, &one, sizeof one);
    (void)w; /* an eventfd at its maximum is readable already */
}

size_t shoal__bulk_take(shoal_bulk *b, shoal_bulk_arrival *out, size_t max)
{
    pthread_mutex_lock(&b->mu);
    size_t n = b->ndone < max ? b->ndone : max;
    memcpy(out, b->done, n * sizeof *out);
    memmove(b->done, b->done + n, (b->ndone - n) * sizeof *out);
    b->ndone -= n;
    pthread_mutex_unlock(&b->mu);
    return n;
}

/* ---- receiving a transfer --------------------------------------------------------------- */

static void hop_drop(struct hop *h)
{
    shoal_xfer_close(h->x);
    if (h->fd >= 0)
        close(h->fd);
    h->x = NULL;
    h->fd = -1;
    h->ep[0] = '\0';
}

/* The connection of this thread to ep, made if need be; NULL if it cannot be. */
static struct hop *hop_for(struct conn *c, const char *ep)
{
    for (int i = 0; i < c->nhops; i++)
        if (c->hops[i].x && strcmp(c->hops[i].ep, ep) == 0)
            return &c->hops[i];
    int i = 0;
    while (i < c->nhops && c->hops[i].x)
        i++;
    if (i == MAX_HOPS) {
        i = 0; /* full: the oldest goes */
        hop_drop(&c->hops[0]);
    }
    int fd = shoal_xfer_connect(ep, CONNECT_TIMEOUT_MS);
    if (fd < 0)
        return NULL;
    shoal_xfer *x;
    if (shoal_xfer_open(fd, SHOAL_XFER_CLIENT, c->b->key, c->b->flags, OPEN_TIMEOUT_MS, &x) < 0) {
        close(fd);
        return NULL;
    }
    c->hops[i] = (struct hop){.fd = fd, .x = x};
    snprintf(c->hops[i].ep, sizeof c->hops[i].ep, "%s", ep);
    if (i == c->nhops)
        c->nhops++;
    return &c->hops[i];
}

/* {"chain": [the hops after chain[from]]}: the metadata the next hop gets. */
static char *chain_meta(const struct rx *r, int from)
{
    cJSON *j = cJSON_CreateObject();
    cJSON *arr = cJSON_AddArrayToObject(j, "chain");
    for (int i = from + 1; i < r->nchain; i++)
        cJSON_AddItemToArray(arr, cJSON_CreateString(r->chain[i]));
    char *s = cJSON_PrintUnformatted(j);
    cJSON_Delete(j);
    return s;
}

/* Connects to the first hop of the chain from r->next on that answers
 * (a dead agent is stepped over); sets r->hop, r->next and the metadata. */
static void pick_hop(struct rx *r)
{
    free(r->route_meta);
    r->route_meta = NULL;
    r->hop = NULL;
    for (; r->next < r->nchain; r->next++) {
        struct hop *h = hop_for(r->c, r->chain[r->next]);
        if (h && (r->route_meta = chain_meta(r, r->next))) {
            r->hop = h;
            return;
        }
    }
}

/* A direct task's metadata (j, with "task"): into r. -EPROTO if malformed. */
#define MAX_TARGETS 4096
static int direct_meta(struct rx *r, const cJSON *j)
{
    const cJSON *task = cJSON_GetObjectItemCaseSensitive(j, "task");
    const cJSON *targets = cJSON_GetObjectItemCaseSensitive(j, "targets");
    const cJSON *xid = cJSON_GetObjectItemCaseSensitive(j, "xid");
    if (!cJSON_IsNumber(task) || task->valuedouble < 1 || task->valuedouble > 9007199254740992.0 ||
        !cJSON_IsArray(targets) || cJSON_GetArraySize(targets) < 1 || cJSON_GetArraySize(targets) > MAX_TARGETS ||
        (xid && (!cJSON_IsString(xid) || strlen(xid->valuestring) != 16)))
        return -EPROTO;
    r->direct = 1;
    r->task = (uint64_t)task->valuedouble;
    if (xid) {
        char *end;
        errno = 0;
        r->xid = strtoull(xid->valuestring, &end, 16);
        if (errno || *end || !r->xid)
            return -EPROTO;
    }
    r->targets = malloc((size_t)cJSON_GetArraySize(targets) * 4);
    if (!r->targets)
        return -ENOMEM;
    const cJSON *t;
    cJSON_ArrayForEach(t, targets) {
        if (!cJSON_IsNumber(t) || t->valuedouble < 0 || t->valuedouble > 4294967295.0)
            return -EPROTO;
        r->targets[r->nt++] = (uint32_t)t->valuedouble;
    }
    return 0;
}

static int on_begin(void *ctx, const shoal_xfer_begin *bg, shoal_xfer_sink *sink)
{
    struct rx *r = ctx;
    cJSON *j = cJSON_ParseWithLength(bg->meta, bg->metalen);
    cJSON *chain = cJSON_GetObjectItemCaseSensitive(j, "chain");
    cJSON *task = cJSON_GetObjectItemCaseSensitive(j, "task");
    int rc = 0;
    if (task) {
        rc = direct_meta(r, j);
        chain = NULL;
    } else if (!cJSON_IsArray(chain) || cJSON_GetArraySize(chain) > MAX_CHAIN) {
        rc = -EPROTO;
    }
    const cJSON *ep;
    cJSON_ArrayForEach(ep, chain) {
        if (rc == 0 && (!cJSON_IsString(ep) || strlen(ep->valuestring) >= EP_LEN))
            rc = -EPROTO;
        if (rc == 0)
            snprintf(r->chain[r->nchain++], EP_LEN, "%s", ep->valuestring);
    }
    cJSON_Delete(j);
    if (rc < 0)
        return rc;
    if (bg->total == 0)
        return -EINVAL;
    /* A block that cannot be had here is still passed on: the hosts after
     * this one get their data, and this one's task fails (alloc_err). */
    r->alloc_err = shoal_arena_alloc(r->c->b->arena, bg->total, &r->h);
    if (r->alloc_err == 0) {
        r->have_block = 1;
        shoal_arena_ptr(r->c->b->arena, r->h, &sink->dst);
    }
    pick_hop(r);
    if (r->hop) {
        r->route = (shoal_xfer_route){.conn = r->hop->x, .meta = r->route_meta, .metalen = strlen(r->route_meta)};
        sink->routes = &r->route;
        sink->nroutes = 1;
    }
    if (!r->have_block && !r->hop)
        return r->alloc_err;
    return 0;
}

/* Receives the transfer that begin starts; returns the error that ends the
 * connection (sticky), or 0. */
static int receive_transfer(struct conn *c, shoal_xfer *x, const shoal_xfer_hdr *begin)
{
    struct rx *r = calloc(1, sizeof *r);
    if (!r)
        return -ENOMEM;
    r->c = c;
    shoal_bulk *b = c->b;
    shoal_xfer_begin info;
    int rc = shoal_xfer_recv_buffer(x, begin, -1, on_begin, r, &info);
    char why[200];
    if (r->hop && r->route.status < 0) {
        /* The next hop failed mid-transfer (its agent died, say): the rest
         * of the chain gets it from here, once it is all here. */
        hop_drop(r->hop);
        r->next++;
        if (rc == 0 && r->have_block) {
            void *p;
            shoal_arena_ptr(b->arena, r->h, &p);
            for (pick_hop(r); r->hop; pick_hop(r)) {
                if (shoal_xfer_send_buffer(r->hop->x, begin->id, r->route_meta, strlen(r->route_meta), p,
                                           r->h.length < begin->offset ? r->h.length : begin->offset, 0) == 0)
                    break;
                hop_drop(r->hop);
                r->next++;
            }
        }
    }
    if (r->direct) {
        shoal_bulk_arrival a = {.id = begin->id, .kind = SHOAL_BULK_DIRECT, .task = r->task, .xid = r->xid,
                                .targets = r->targets, .nt = r->nt};
        pthread_mutex_lock(&b->mu);
        a.token = c->token;
        pthread_mutex_unlock(&b->mu);
        if (rc == 0 && r->have_block && r->xid) {
            shoal_arena_release(b->arena, r->h); /* its block is the other transfer's */
        } else if (rc == 0 && r->have_block) {
            a.h = r->h;
        } else {
            if (r->have_block)
                shoal_arena_release(b->arena, r->h);
            a.status = rc < 0 ? rc : r->alloc_err ? r->alloc_err : -EIO;
            snprintf(a.why, sizeof a.why, "%s%s", rc < 0 ? "the transfer failed: " : "no arena memory for it: ",
                     rc < 0 ? shoal_xfer_strerror(rc) : strerror(-a.status));
        }
        if (a.token && r->nt) {
            pthread_mutex_lock(&b->mu);
            c->due += r->nt; /* a reply per target */
            pthread_mutex_unlock(&b->mu);
            publish_arrival(b, &a); /* the targets go with it */
            r->targets = NULL;
        } else if (a.h.length) {
            shoal_arena_release(b->arena, a.h); /* no token: nowhere to answer (the client sends it first) */
        }
    } else if (rc == 0 && r->have_block) {
        publish(b, begin->id, 0, r->h, NULL);
    } else {
        if (r->have_block)
            shoal_arena_release(b->arena, r->h);
        int err = rc < 0 ? rc : r->alloc_err;
        snprintf(why, sizeof why, "%s%s", rc < 0 ? "the transfer failed: " : "no arena memory for it: ",
                 rc < 0 ? shoal_xfer_strerror(rc) : strerror(-err));
        publish(b, begin->id, err ? err : -EIO, (shoal_handle){0}, why);
    }
    free(r->route_meta);
    free(r->targets);
    free(r);
    /* Refused, aborted or a bad sink: the connection goes on. */
    return rc == -ECANCELED || rc == -ECONNABORTED || rc == -EINVAL ? 0 : rc;
}

/* ---- results to the client ------------------------------------------------------------ */

/* The sender thread of a client's connection: sends each queued reply
 * block as one transfer, from the arena, and releases it. After a failed
 * send (the client is gone, or it stopped reading for the idle timeout)
 * the connection's token is withdrawn, so the next results go through the
 * controller, and what is queued is released unsent; the client, whose
 * connection broke, fails the results it was told to expect on it. */
static void *sender_main(void *arg)
{
    struct conn *c = arg;
    shoal_bulk *b = c->b;
    pthread_mutex_lock(&b->mu);
    for (;;) {
        int quiet = 0;
        while (c->nq == 0 && !c->closing && !quiet) {
            struct timespec until;
            clock_gettime(CLOCK_MONOTONIC, &until);
            until.tv_sec += SHOAL_BULK_KEEPALIVE_MS / 1000;
            quiet = pthread_cond_timedwait(&c->more, &b->mu, &until) == ETIMEDOUT;
        }
        if (c->nq == 0 && c->closing)
            break; /* closing, and nothing left */
        if (c->nq == 0) {
            /* A second with nothing to send: a keepalive, while the client
             * waits for replies of its direct tasks (it reads the
             * connection only then: keepalives sent to a client that does
             * not read would fill its socket, and then block us). */
            int send = !c->err && c->token && c->due, err = 0;
            pthread_mutex_unlock(&b->mu);
            if (send) {
                shoal_xfer_hdr kh = {.type = SHOAL_BULK_KEEPALIVE};
                pthread_mutex_lock(&c->tx);
                err = shoal_xfer_send(c->x, &kh, NULL, 0);
                pthread_mutex_unlock(&c->tx);
            }
            pthread_mutex_lock(&b->mu);
            if (err) {
                c->err = err;
                c->token = 0;
            }
            continue;
        }
        struct job j = c->q[0];
        memmove(c->q, c->q + 1, (c->nq - 1) * sizeof *c->q);
        c->nq--;
        int skip = c->err || c->closing, err = 0;
        c->busy = 1;
        pthread_mutex_unlock(&b->mu);
        void *p;
        if (!skip && shoal_arena_ptr(b->arena, j.h, &p) == 0) {
            pthread_mutex_lock(&c->tx);
            err = shoal_xfer_send_buffer(c->x, j.xid, j.meta, j.meta ? strlen(j.meta) : 0, p, j.len, 0);
            pthread_mutex_unlock(&c->tx);
        }
        shoal_arena_release(b->arena, j.h);
        free(j.meta);
        pthread_mutex_lock(&b->mu);
        c->busy = 0;
        if (err) {
            c->err = err;
            c->token = 0;
        }
    }
    pthread_mutex_unlock(&b->mu);
    return NULL;
}

static int queue_job(shoal_bulk *b, uint64_t token, struct job j);

int shoal__bulk_send_result(shoal_bulk *b, uint64_t token, uint64_t xid, shoal_handle h, uint64_t len)
{
    return queue_job(b, token, (struct job){xid, len, h, NULL, 0});
}

int shoal__bulk_send_reply(shoal_bulk *b, uint64_t token, uint64_t xid, uint64_t task, uint32_t engine,
                           unsigned type, shoal_handle h, uint64_t len)
{
    char *meta = malloc(96);
    if (!meta)
        return -ENOMEM;
    snprintf(meta, 96, "{\"task\":%llu,\"engine\":%u,\"type\":%u}", (unsigned long long)task, engine, type);
    int rc = queue_job(b, token, (struct job){xid, len, h, meta, type == SHOAL_MSG_RESULT});
    if (rc < 0)
        free(meta);
    return rc;
}

/* Whether fd's send buffer has room for need bytes now (a send then does not wait). */
static int room_for(int fd, size_t need)
{
    int queued = 0, size = 0;
    socklen_t len = sizeof size;
    if (ioctl(fd, SIOCOUTQ, &queued) < 0 || getsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, &len) < 0)
        return 0;
    return size / 2 - queued >= (int)need; /* SO_SNDBUF says twice what it holds of payload */
}

/*
 * Sends small job j on c from the calling thread (the agent's main loop):
 * called with b->mu held and c->tx taken, returns with neither. A hand-off
 * to the sender thread costs a round trip one wake-up; the loop does it
 * itself only when nothing else is queued or being sent (the replies keep
 * their order) and the socket has room (it never waits on a client).
 */
static void send_inline(shoal_bulk *b, struct conn *c, struct job j)
{
    if (j.ends && c->due)
        c->due--;
    pthread_mutex_unlock(&b->mu);
    void *p;
    int err = -EFAULT;
    if (shoal_arena_ptr(b->arena, j.h, &p) == 0)
        err = shoal_xfer_send_buffer(c->x, j.xid, j.meta, j.meta ? strlen(j.meta) : 0, p, j.len, 0);
    if (err) {
        /* Under tx still: c is not freed before tx is let go (conn_main).
         * Nobody waits for tx holding b->mu, so taking it here is safe. */
        pthread_mutex_lock(&b->mu);
        c->err = err;
        c->token = 0;
        pthread_mutex_unlock(&b->mu);
    }
    pthread_mutex_unlock(&c->tx);
    shoal_arena_release(b->arena, j.h);
    free(j.meta);
}

static int queue_job(shoal_bulk *b, uint64_t token, struct job j)
{
    if (!token)
        return -ENOENT;
    int rc = -ENOENT;
    pthread_mutex_lock(&b->mu);
    for (int i = 0; i < MAX_CONNS; i++) {
        struct conn *c = b->conns[i];
        if (!c || c->token != token || c->closing || !c->has_sender)
            continue;
        if (c->nq == 0 && !c->busy && !c->err && j.len <= INLINE_MAX && room_for(c->fd, j.len + 1024) &&
            pthread_mutex_trylock(&c->tx) == 0) {
            send_inline(b, c, j);
            return 0;
        }
        if (c->nq == c->capq) {
            size_t cap = c->capq ? 2 * c->capq : 16;
            struct job *q = realloc(c->q, cap * sizeof *q);
            if (!q) {
                rc = -ENOMEM;
                break;
            }
            c->q = q;
            c->capq = cap;
        }
        c->q[c->nq++] = j;
        if (j.ends && c->due)
            c->due--;
        pthread_cond_signal(&c->more);
        rc = 0;
        break;
    }
    pthread_mutex_unlock(&b->mu);
    return rc;
}

/* The client's token record: registers the connection under it and starts
 * its sender thread (once). */
static int take_token(struct conn *c, shoal_xfer *x, const shoal_xfer_hdr *h)
{
    uint64_t token;
    if (h->length != sizeof token)
        return shoal_xfer_skip_payload(x);
    int rc = shoal_xfer_recv_payload(x, &token, sizeof token);
    if (rc < 0)
        return rc;
    shoal_bulk *b = c->b;
    pthread_mutex_lock(&b->mu);
    c->x = x;
    if (!c->has_sender && pthread_create(&c->sender, NULL, sender_main, c) == 0)
        c->has_sender = 1;
    if (c->has_sender)
        c->token = token;
    pthread_mutex_unlock(&b->mu);
    return 0;
}

/* A client's abort of its direct task: to the main loop. */
static int take_abort(struct conn *c, shoal_xfer *x, const shoal_xfer_hdr *h)
{
    uint64_t task;
    if (h->length != sizeof task)
        return shoal_xfer_skip_payload(x);
    int rc = shoal_xfer_recv_payload(x, &task, sizeof task);
    if (rc < 0)
        return rc;
    shoal_bulk_arrival a = {.kind = SHOAL_BULK_ABORT, .task = task};
    pthread_mutex_lock(&c->b->mu);
    a.token = c->token;
    pthread_mutex_unlock(&c->b->mu);
    if (a.token)
        publish_arrival(c->b, &a);
    return 0;
}

static void *conn_main(void *arg)
{
    struct conn *c = arg;
    shoal_bulk *b = c->b;
    shoal_xfer *x = NULL;
    if (shoal_xfer_open(c->fd, SHOAL_XFER_SERVER, b->key, b->flags, OPEN_TIMEOUT_MS, &x) == 0) {
        while (!atomic_load(&b->stopping)) {
            shoal_xfer_hdr h;
            int rc = shoal_xfer_recv_hdr(x, &h, 500);
            if (rc == -ETIMEDOUT)
                continue;
            if (rc < 0)
                break;
            if (h.type == SHOAL_XFER_BEGIN)
                rc = receive_transfer(c, x, &h);
            else if (h.type == SHOAL_BULK_TOKEN)
                rc = take_token(c, x, &h);
            else if (h.type == SHOAL_BULK_ABORT_RECORD)
                rc = take_abort(c, x, &h);
            else if (h.length)
                rc = shoal_xfer_skip_payload(x); /* records of later versions (the caller's types) */
            if (rc < 0)
                break;
        }
    }
    /* The sender stops: a send it is blocked in fails at once (the socket
     * is shut), and what is queued is released. */
    pthread_mutex_lock(&b->mu);
    c->closing = 1;
    c->token = 0;
    pthread_cond_signal(&c->more);
    int joined = c->has_sender;
    pthread_mutex_unlock(&b->mu);
    if (joined) {
        shutdown(c->fd, SHUT_RDWR);
        pthread_join(c->sender, NULL);
    }
    /* A send of the main loop's that started before closing was set ends
     * (the socket is shut: at once) before the connection goes. */
    pthread_mutex_lock(&c->tx);
    pthread_mutex_unlock(&c->tx);
    shoal_xfer_close(x);
    for (int i = 0; i < c->nhops; i++)
        if (c->hops[i].x) {
            shoal_xfer_shutdown(c->hops[i].x);
            hop_drop(&c->hops[i]);
        }
    pthread_mutex_lock(&b->mu);
    close(c->fd);
    b->conn_fds[c->slot] = -1;
    b->conns[c->slot] = NULL;
    b->nconns--;
    pthread_cond_broadcast(&b->idle);
    pthread_mutex_unlock(&b->mu);
    pthread_cond_destroy(&c->more);
    pthread_mutex_destroy(&c->tx);
    free(c->q);
    free(c);
    return NULL;
}

static void *accept_main(void *arg)
{
    shoal_bulk *b = arg;
    while (!atomic_load(&b->stopping)) {
        struct pollfd p = {b->listen_fd, POLLIN, 0};
        if (poll(&p, 1, 200) <= 0)
            continue;
        int fd = accept4(b->listen_fd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0)
            continue;
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        struct conn *c = calloc(1, sizeof *c);
        pthread_mutex_lock(&b->mu);
        int slot = -1;
        for (int i = 0; c && i < MAX_CONNS && slot < 0; i++)
            if (b->conn_fds[i] < 0)
                slot = i;
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        if (slot >= 0) {
            *c = (struct conn){.b = b, .fd = fd, .slot = slot};
            pthread_condattr_t ca;
            pthread_condattr_init(&ca);
            pthread_condattr_setclock(&ca, CLOCK_MONOTONIC); /* the sender's keepalive wait */
            pthread_cond_init(&c->more, &ca);
            pthread_condattr_destroy(&ca);
            pthread_mutex_init(&c->tx, NULL);
            b->conn_fds[slot] = fd;
            b->conns[slot] = c;
            b->nconns++;
            if (pthread_create(&t, &attr, conn_main, c) != 0) {
                pthread_cond_destroy(&c->more);
                pthread_mutex_destroy(&c->tx);
                b->conns[slot] = NULL;
                b->conn_fds[slot] = -1;
                b->nconns--;
                slot = -1;
            }
        }
        pthread_attr_destroy(&attr);
        pthread_mutex_unlock(&b->mu);
        if (slot < 0) {
            free(c);
            close(fd); /* the sender sees the connection end in its handshake */
        }
    }
    return NULL;
}

/* ---- start and stop ----------------------------------------------------------------------- */

int shoal__bulk_start(shoal_arena *arena, const uint8_t key[SHOAL_XFER_KEY], int encrypt,
                      const char *ctl_endpoint, shoal_bulk **out, char *why, size_t len)
{
    struct sockaddr_storage ss;
    socklen_t sslen;
    int rc = local_addr_for(ctl_endpoint, &ss, &sslen);
    if (rc < 0) {
        snprintf(why, len, "no address of this host reaches %s: %s", ctl_endpoint, strerror(-rc));
        return rc;
    }
    shoal_bulk *b = calloc(1, sizeof *b);
    if (!b) {
        snprintf(why, len, "out of memory");
        return -ENOMEM;
    }
    b->arena = arena;
    memcpy(b->key, key, SHOAL_XFER_KEY);
    b->flags = encrypt ? SHOAL_XFER_ENCRYPT : 0;
    for (int i = 0; i < MAX_CONNS; i++)
        b->conn_fds[i] = -1;
    pthread_mutex_init(&b->mu, NULL);
    pthread_cond_init(&b->idle, NULL);
    ((struct sockaddr_in *)&ss)->sin_port = 0; /* the same place in sockaddr_in6 */
    b->listen_fd = socket(ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (b->listen_fd < 0) {
        rc = -errno;
        snprintf(why, len, "socket: %s", strerror(errno));
        goto fail_socket;
    }
    int one = 1;
    setsockopt(b->listen_fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    sslen = ss.ss_family == AF_INET6 ? sizeof(struct sockaddr_in6) : sizeof(struct sockaddr_in);
    if (bind(b->listen_fd, (struct sockaddr *)&ss, sslen) < 0 || listen(b->listen_fd, 64) < 0 ||
        getsockname(b->listen_fd, (struct sockaddr *)&ss, &sslen) < 0) {
        rc = -errno;
        snprintf(why, len, "cannot listen: %s", strerror(errno));
        goto fail_listen;
    }
    format_endpoint((struct sockaddr *)&ss, b->endpoint, sizeof b->endpoint);
    b->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (b->efd < 0) {
        rc = -errno;
        snprintf(why, len, "eventfd: %s", strerror(errno));
        goto fail_listen;
    }
    if ((rc = -pthread_create(&b->acceptor, NULL, accept_main, b)) < 0) {
        snprintf(why, len, "cannot start its thread: %s", strerror(-rc));
        goto fail_thread;
    }
    *out = b;
    return 0;
fail_thread:
    close(b->efd);
fail_listen:
    close(b->listen_fd);
fail_socket:
    explicit_bzero(b->key, sizeof b->key);
    free(b);
    return rc;
}

const char *shoal__bulk_endpoint(const shoal_bulk *b)
{
    return b->endpoint;
}

int shoal__bulk_eventfd(const shoal_bulk *b)
{
    return b->efd;
}

void shoal__bulk_stop(shoal_bulk *b)
{
    if (!b)
        return;
    atomic_store(&b->stopping, 1);
    pthread_join(b->acceptor, NULL);
    close(b->listen_fd);
    pthread_mutex_lock(&b->mu);
    for (int i = 0; i < MAX_CONNS; i++)
        if (b->conn_fds[i] >= 0)
            shutdown(b->conn_fds[i], SHUT_RDWR); /* a thread in a receive wakes at once */
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += 2;
    while (b->nconns > 0 && pthread_cond_timedwait(&b->idle, &b->mu, &until) == 0)
        ;
    int left = b->nconns;
    for (size_t i = 0; i < b->ndone; i++) {
        if (b->done[i].status == 0 && b->done[i].h.length)
            shoal_arena_release(b->arena, b->done[i].h);
        free(b->done[i].targets);
    }
    b->ndone = 0;
    pthread_mutex_unlock(&b->mu);
    if (left)
        return; /* threads still run (stuck in a send to a next hop): they keep b; the process ends */
    close(b->efd);
    free(b->done);
    explicit_bzero(b->key, sizeof b->key);
    pthread_mutex_destroy(&b->mu);
    pthread_cond_destroy(&b->idle);
    free(b);
}
