/*
 * controller/controller.c - shoal-controller: the one central process.
 *
 * It binds two ROUTER sockets (clients, node agents), writes the profile's
 * connection file with their addresses and a fresh cluster key, keeps the
 * registry of nodes and engines, answers queries, sends heartbeats to the
 * agents and notices the ones that stop answering. It never unpickles
 * anything: message bodies that are not its own business pass through.
 *
 * It routes direct tasks - one message per node, whatever the number of
 * engines there - and tracks each until every target engine has answered
 * or failed; results pass through to the client without being copied.
 * Bad input is counted, logged and answered with an ERROR where the sender
 * can be told.
 *
 * Beyond loopback (or with --curve) both sockets speak CurveZMQ: every frame
 * encrypted, fresh session keys per connection, and a ZAP handler served
 * from the poll loop that admits only the member key of the connection file.
 * A signed message stamped further than --max-skew-ms from our clock is
 * refused: a replay, on plaintext clusters too.
 */
#define _GNU_SOURCE
#include <shoal/curve.h>
#include <shoal/util.h>
#include <shoal/zwire.h>

#include <arpa/inet.h>
#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define MAX_NODES 1024
#define MAX_ENGINES 65536
#define ROUTE_MAX 256

struct route {
    uint8_t id[ROUTE_MAX];
    size_t len;
};

/*
 * A message that waits for its peer's ZeroMQ queue to have room. Sends
 * never block the controller's one thread: a send that would wait
 * (EAGAIN) leaves the message here, its frames shared with the received
 * message by reference (zmq_msg_copy), and the loop tries again shortly.
 * Messages to a peer leave in the order they were queued.
 */
struct qmsg {
    struct qmsg *next;
    shoal_msg_header h;
    uint8_t hdr[SHOAL_WIRE_HDR]; /* signed once, when queued: a retry does not hash it again */
    uint64_t bytes;
    size_t n;
    zmq_msg_t frames[];
};

struct outq {
    struct qmsg *head, **tail;
    uint64_t n, bytes;
};

struct node {
    struct route route;
    int alive;
    int32_t pid;
    char host[64];
    char agent_id[33]; /* the agent's own id (hex): which host's agent this is, for clients */
    char socket[108];  /* the agent's Unix socket, for local clients */
    char loop[16];    /* the agent's event-loop backend */
    char bulk[80];    /* where its bulk server listens, "tcp://IP:PORT" ("": none; docs/machines.md) */
    int64_t last_seen_ns;
    struct outq q;    /* tasks, aborts and signals waiting for room */
};

struct engine {
    uint32_t node;
    uint32_t local;
    int32_t pid;
    int alive;
};

/* What a result dropped for a client that did not read leaves behind, so
 * that the client is told which tasks failed, and why, once it reads. */
struct lost {
    uint64_t task_id, client_msg;
    uint32_t engine;
};

/*
 * A client with tasks in flight or messages waiting for it. Made at its
 * first TASK, freed when nothing of it is left (no parts in flight, nothing
 * queued, nothing lost to tell).
 */
struct client {
    struct client *next; /* hash chain */
    struct route route;
    uint64_t parts;      /* targets of its tasks yet to answer */
    struct outq q;
    struct lost *lost;   /* results dropped past its backlog's limit */
    size_t nlost, lost_cap;
    uint64_t dropped_bytes; /* of those results, for the error that tells */
    int gone;            /* its connection is gone: what is for it is dropped */
    int queued;          /* counted in controller.nqueued */
};

/* A task in flight: who asked, and which engines have yet to answer. */
struct task {
    struct task *next; /* hash chain */
    uint64_t id;
    struct client *cl;
    uint64_t client_msg; /* the client's msg_id: results reply to it */
    uint32_t n, remaining;
    uint32_t *engines;
    uint8_t *done;
};

#define TASK_BUCKETS 4096
#define CLIENT_BUCKETS 1024
/* Task parts (targets yet to answer) one client may have in flight; a TASK
 * past it is refused with an ERROR. shoal's Client keeps far fewer in flight
 * (CONTROLLER_WINDOW in client.py) and reads as it submits. */
#define MAX_CLIENT_PARTS (1u << 20) /* the default of --max-client-parts */
/* Messages queued for one peer at most; the bytes are --client-backlog
 * (clients) and NODE_BACKLOG_BYTES (agents). */
#define MAX_QUEUED_MSGS (1u << 20)
#define NODE_BACKLOG_BYTES (4ull << 30)
/* A drain of one socket yields to the other socket, the heartbeats and the
 * queues after this long, whatever is still waiting. */
#define DRAIN_SLICE_NS (20 * 1000000ll)
/* Refused messages logged per REFUSAL_WINDOW_NS at most; the rest are
 * counted and summed up in one line. */
#define REFUSALS_LOGGED 10
#define REFUSAL_WINDOW_NS (10 * 1000000000ll)

/* Where a refusal came from: the sockets, and what QUERY_REPLY calls them. */
enum { FROM_CLIENTS, FROM_AGENTS };
static const char *const from_names[2] = {"from_clients", "from_agents"};

struct controller {
    void *ctx, *clients, *agents;
    uint8_t key[SHOAL_WIRE_KEY];
    /* Curve (curve set): the server's key pair, whose secret half never
     * leaves this process, and the members' public key, the one the ZAP
     * handler admits (the pair goes into the connection file). */
    int curve;
    uint8_t server_public[SHOAL_CURVE_KEY], server_secret[SHOAL_CURVE_KEY];
    uint8_t member_public[SHOAL_CURVE_KEY], member_secret[SHOAL_CURVE_KEY];
    void *zap;         /* the ZAP handler (curve only) */
    void *monitors[2]; /* handshake events of the two sockets */
    uint64_t unauthenticated[2];  /* connections ZAP refused: not the member key */
    uint64_t handshake_failed[2]; /* connections whose handshake failed (a replay, a plaintext peer) */
    char client_ep[256], agent_ep[256];
    char conn_path[PATH_MAX + 32];
    int64_t heartbeat_ns;
    int64_t node_timeout_ns; /* silence after which a node is lost (--node-timeout-ms) */
    int64_t next_beat_ns;
    struct node nodes[MAX_NODES];
    uint32_t nnodes;
    struct engine *engines;
    uint32_t nengines;
    shoal_wire_counters client_counters, agent_counters;
    shoal_wire_limits client_limits, agent_limits;
    uint64_t next_msg_id;
    uint64_t next_task_id;
    struct task *tasks[TASK_BUCKETS];
    uint64_t ntasks;
    struct client *clients_by_route[CLIENT_BUCKETS];
    uint64_t nclients;
    uint64_t client_backlog_max; /* bytes queued for one client at most */
    uint64_t max_client_parts;   /* task parts one client may have in flight */
    uint32_t nqueued;            /* peers with messages queued */
    int64_t next_flush_ns, flush_backoff_ns;
    uint64_t results_dropped;    /* past a client's backlog limit */
    int64_t refusal_window_ns;
    uint64_t max_skew_ms; /* --max-skew-ms; 0: stamps unchecked */
    uint64_t refusals_in_window, refusals_unlogged;
    int stopping;
};

#define now_ns shoal_now_ns
#define logf_(...) shoal_log("shoal-controller", __VA_ARGS__)

/* ---- the profile directory and the connection file ------------------------ */

static int mkdir_private(const char *path)
{
    if (mkdir(path, 0700) < 0 && errno != EEXIST)
        return -errno;
    return 0;
}

/* Whether the connection file at path names a controller that still runs. */
static int running_pid(const char *path)
{
    FILE *f = fopen(path, "r");
    if (!f)
        return 0;
    char buf[4096];
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    cJSON *j = cJSON_Parse(buf);
    int pid = 0;
    cJSON *p = cJSON_GetObjectItemCaseSensitive(j, "pid");
    if (cJSON_IsNumber(p) && p->valueint > 0 && kill(p->valueint, 0) == 0)
        pid = p->valueint;
    cJSON_Delete(j);
    return pid;
}

/* The first line of a small file in /proc, or "" (for the connection file). */
static void read_line(const char *path, char *out, size_t size)
{
    out[0] = '\0';
    FILE *f = fopen(path, "r");
    if (!f)
        return;
    if (fgets(out, (int)size, f))
        out[strcspn(out, "\n")] = '\0';
    fclose(f);
}

/* When this process started, in clock ticks after boot (/proc/self/stat's
 * field 22), or 0. With the boot id, it tells a reader of the connection
 * file whether the controller it names is a process on its own machine:
 * a pid alone may be another process there, or one on another machine. */
static unsigned long long start_ticks(void)
{
    char stat[1024];
    read_line("/proc/self/stat", stat, sizeof stat);
    const char *p = strrchr(stat, ')'); /* the command's name may hold spaces */
    for (int field = 2; p && field < 22; field++)
        p = strchr(p + 1, ' ');
    return p ? strtoull(p + 1, NULL, 10) : 0;
}

static int write_connection_file(struct controller *c, const char *ip)
{
    char hex[2 * SHOAL_WIRE_KEY + 1];
    for (unsigned i = 0; i < SHOAL_WIRE_KEY; i++)
        snprintf(hex + 2 * i, 3, "%02x", c->key[i]);
    cJSON *j = cJSON_CreateObject();
    cJSON_AddNumberToObject(j, "version", 1);
    cJSON_AddNumberToObject(j, "pid", getpid());
    char boot_id[64];
    read_line("/proc/sys/kernel/random/boot_id", boot_id, sizeof boot_id);
    cJSON_AddStringToObject(j, "boot_id", boot_id);
    cJSON_AddNumberToObject(j, "start_time", (double)start_ticks());
    /* Containers on one kernel share the boot id, not the pid namespace:
     * the pid means this process only to readers of the same one. */
    char pid_ns[64];
    ssize_t ns_len = readlink("/proc/self/ns/pid", pid_ns, sizeof pid_ns - 1);
    pid_ns[ns_len > 0 ? ns_len : 0] = '\0';
    cJSON_AddStringToObject(j, "pid_ns", pid_ns);
    cJSON_AddStringToObject(j, "ip", ip);
    cJSON_AddStringToObject(j, "client", c->client_ep);
    cJSON_AddStringToObject(j, "agent", c->agent_ep);
    cJSON_AddStringToObject(j, "key", hex);
    cJSON_AddStringToObject(j, "signature_scheme", "hmac-sha256");
    /* The server's public key and the member key pair: whoever holds this
     * file is a member (it is 0600, as for the HMAC key). Never the
     * server's secret key. */
    char z85[3][SHOAL_CURVE_Z85 + 1];
    if (c->curve) {
        shoal_curve_z85_encode(c->server_public, z85[0]);
        shoal_curve_z85_encode(c->member_public, z85[1]);
        shoal_curve_z85_encode(c->member_secret, z85[2]);
        cJSON *k = cJSON_AddObjectToObject(j, "curve");
        cJSON_AddStringToObject(k, "server_key", z85[0]);
        cJSON_AddStringToObject(k, "public_key", z85[1]);
        cJSON_AddStringToObject(k, "secret_key", z85[2]);
        memset(z85, 0, sizeof z85);
    } else {
        cJSON_AddNullToObject(j, "curve");
    }
    /* How far from the controller's clock a message's stamp may be. */
    cJSON_AddNumberToObject(j, "max_skew_ms", (double)c->max_skew_ms);
    /* So that a client refuses what we would refuse, with a clear error,
     * before sending it. */
    cJSON_AddNumberToObject(j, "max_frame", (double)c->client_limits.max_frame);
    cJSON_AddNumberToObject(j, "max_payload", (double)c->client_limits.max_payload);
    /* How long a client may wait on a silent controller before giving up. */
    cJSON_AddNumberToObject(j, "node_timeout_ms", (double)(c->node_timeout_ns / 1000000));
    char *text = cJSON_Print(j);
    if (c->curve) /* cJSON keeps its copy of the secret in memory it frees */
        memset(cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(j, "curve"), "secret_key")
                   ->valuestring, 0, SHOAL_CURVE_Z85);
    memset(cJSON_GetObjectItemCaseSensitive(j, "key")->valuestring, 0, 2 * SHOAL_WIRE_KEY);
    cJSON_Delete(j);
    memset(hex, 0, sizeof hex);
    if (!text)
        return -ENOMEM;
    /* Written to a temporary file created 0600, then renamed: a reader never
     * sees half a file, and the key is never readable by anyone else. */
    char tmp[sizeof c->conn_path + 32];
    snprintf(tmp, sizeof tmp, "%s.%d.tmp", c->conn_path, (int)getpid());
    int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    int rc = 0;
    if (fd < 0) {
        rc = -errno;
        goto out;
    }
    size_t len = strlen(text);
    if (write(fd, text, len) != (ssize_t)len || write(fd, "\n", 1) != 1 || fsync(fd) < 0)
        rc = -EIO;
    close(fd);
    if (rc == 0 && rename(tmp, c->conn_path) < 0)
        rc = -errno;
    if (rc < 0)
        unlink(tmp);
out:
    memset(text, 0, strlen(text));
    free(text);
    return rc;
}

/* ---- replies ---------------------------------------------------------------- */

static struct client **client_slot(struct controller *c, const struct route *r);
static struct client *client_of(struct controller *c, const struct route *r);
static void client_release(struct controller *c, struct client *cl);
static void client_send(struct controller *c, struct client *cl, const shoal_msg_header *h,
                        const shoal_frame *new_frames, size_t n_new, zmq_msg_t *msgs, size_t n_msgs);

static int reply_json(struct controller *c, void *sock, const struct route *to, uint16_t type, uint64_t reply_to,
                      cJSON *body)
{
    char *text = cJSON_PrintUnformatted(body);
    if (!text)
        return -ENOMEM;
    shoal_msg_header h = {.type = type, .n_payload = 1, .msg_id = ++c->next_msg_id, .reply_to = reply_to,
                          .target = SHOAL_WIRE_TARGET_ALL};
    shoal_frame route = {to->id, to->len}, body_f = {text, strlen(text)};
    int rc = 0;
    int known = sock == c->clients && *client_slot(c, to);
    struct client *cl = sock == c->clients ? client_of(c, to) : NULL;
    if (cl) {
        /* In its turn after the results queued for this client, if any. */
        client_send(c, cl, &h, &body_f, 1, NULL, 0);
        if (!known)
            client_release(c, cl); /* one the caller holds is the caller's to release */
    } else {
        rc = shoal_wire_send(sock, c->key, &route, &h, &body_f, 1);
    }
    free(text);
    return rc;
}

static void reply_error(struct controller *c, void *sock, const struct route *to, uint64_t reply_to,
                        const char *fmt, ...)
{
    char text[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(text, sizeof text, fmt, ap);
    va_end(ap);
    cJSON *j = cJSON_CreateObject();
    cJSON_AddStringToObject(j, "error", text);
    reply_json(c, sock, to, SHOAL_MSG_ERROR, reply_to, j);
    cJSON_Delete(j);
}

/* Parses payload frame 0 as a JSON object; NULL if it is not one. */
static cJSON *json_body(shoal_wire_msg *m)
{
    if (m->hdr.n_payload < 1)
        return NULL;
    shoal_frame f = shoal_wire_frame(m, 0);
    cJSON *j = cJSON_ParseWithLength(f.data, f.len);
    if (j && !cJSON_IsObject(j)) {
        cJSON_Delete(j);
        return NULL;
    }
    return j;
}

/* ---- the registry ----------------------------------------------------------- */

static cJSON *registry_json(struct controller *c)
{
    cJSON *j = cJSON_CreateObject();
    cJSON *nodes = cJSON_AddArrayToObject(j, "nodes");
    for (uint32_t i = 0; i < c->nnodes; i++) {
        cJSON *n = cJSON_CreateObject();
        cJSON_AddNumberToObject(n, "id", i);
        cJSON_AddStringToObject(n, "host", c->nodes[i].host);
        cJSON_AddStringToObject(n, "agent_id", c->nodes[i].agent_id);
        cJSON_AddStringToObject(n, "socket", c->nodes[i].socket);
        cJSON_AddStringToObject(n, "loop", c->nodes[i].loop);
        if (c->nodes[i].bulk[0])
            cJSON_AddStringToObject(n, "bulk", c->nodes[i].bulk);
        cJSON_AddNumberToObject(n, "pid", c->nodes[i].pid);
        cJSON_AddBoolToObject(n, "alive", c->nodes[i].alive);
        cJSON_AddItemToArray(nodes, n);
    }
    cJSON *engines = cJSON_AddArrayToObject(j, "engines");
    for (uint32_t i = 0; i < c->nengines; i++) {
        cJSON *e = cJSON_CreateObject();
        cJSON_AddNumberToObject(e, "id", i);
        cJSON_AddNumberToObject(e, "node", c->engines[i].node);
        cJSON_AddNumberToObject(e, "pid", c->engines[i].pid);
        cJSON_AddBoolToObject(e, "alive", c->engines[i].alive);
        cJSON_AddItemToArray(engines, e);
    }
    return j;
}

static cJSON *status_json(struct controller *c)
{
    cJSON *j = registry_json(c);
    cJSON_AddNumberToObject(j, "tasks_pending", (double)c->ntasks);
    uint64_t qn = 0, qb = 0, lost = 0;
    for (uint32_t b = 0; b < CLIENT_BUCKETS; b++)
        for (struct client *cl = c->clients_by_route[b]; cl; cl = cl->next) {
            qn += cl->q.n;
            qb += cl->q.bytes;
            lost += cl->nlost;
        }
    cJSON *cj = cJSON_AddObjectToObject(j, "clients");
    cJSON_AddNumberToObject(cj, "with_tasks_or_queued", (double)c->nclients);
    cJSON_AddNumberToObject(cj, "queued_messages", (double)qn);
    cJSON_AddNumberToObject(cj, "queued_bytes", (double)qb);
    cJSON_AddNumberToObject(cj, "results_dropped", (double)c->results_dropped);
    cJSON_AddNumberToObject(cj, "dropped_to_tell", (double)lost);
    cJSON *queues = cJSON_AddArrayToObject(j, "queue");
    for (uint32_t e = 0; e < c->nengines; e++) {
        uint32_t q = 0;
        for (uint32_t b = 0; b < TASK_BUCKETS; b++)
            for (struct task *t = c->tasks[b]; t; t = t->next)
                for (uint32_t i = 0; i < t->n; i++)
                    q += t->engines[i] == e && !t->done[i];
        cJSON_AddItemToArray(queues, cJSON_CreateNumber(q));
    }
    cJSON *in = cJSON_AddObjectToObject(j, "refused");
    shoal_wire_counters *k[2] = {&c->client_counters, &c->agent_counters};
    for (int i = 0; i < 2; i++) {
        cJSON *o = cJSON_AddObjectToObject(in, from_names[i]);
        cJSON_AddNumberToObject(o, "malformed", (double)k[i]->malformed);
        cJSON_AddNumberToObject(o, "oversized", (double)k[i]->oversized);
        cJSON_AddNumberToObject(o, "bad_signature", (double)k[i]->bad_signature);
        cJSON_AddNumberToObject(o, "stale", (double)k[i]->stale);
        cJSON_AddNumberToObject(o, "unauthenticated", (double)c->unauthenticated[i]);
        cJSON_AddNumberToObject(o, "handshake_failed", (double)c->handshake_failed[i]);
    }
    cJSON_AddBoolToObject(j, "curve", c->curve);
    return j;
}

static void route_of(shoal_wire_msg *m, struct route *r)
{
    r->len = m->has_route ? zmq_msg_size(&m->route) : 0;
    if (r->len > ROUTE_MAX)
        r->len = ROUTE_MAX;
    memcpy(r->id, m->has_route ? zmq_msg_data(&m->route) : "", r->len);
}

/* The live node at route r, or -1. */
static int find_node(struct controller *c, const struct route *r)
{
    for (uint32_t i = 0; i < c->nnodes; i++)
        if (c->nodes[i].alive && c->nodes[i].route.len == r->len && !memcmp(c->nodes[i].route.id, r->id, r->len))
            return (int)i;
    return -1;
}

/* The node (alive or lost) whose agent is process pid on host, or -1. */
/* The node of an agent that registered before: by its agent id where it
 * gives one (pids and hostnames repeat across containers), else by host
 * and pid. */
static int find_node_by_agent(struct controller *c, const char *host, int32_t pid, const char *agent_id)
{
    for (uint32_t i = 0; i < c->nnodes; i++) {
        const struct node *nd = &c->nodes[i];
        if (agent_id ? !strcmp(nd->agent_id, agent_id)
                     : !nd->agent_id[0] && nd->pid == pid && !strncmp(nd->host, host, sizeof nd->host - 1))
            return (int)i;
    }
    return -1;
}

static void fail_engine_tasks(struct controller *c, uint32_t e, uint32_t n, const char *why);
static void outq_init(struct outq *q);

static void outq_clear(struct outq *q);

static void node_lost(struct controller *c, uint32_t n, const char *why)
{
    c->nodes[n].alive = 0;
    outq_clear(&c->nodes[n].q); /* its tasks fail below, with the others it had */
    for (uint32_t i = 0; i < c->nengines; i++)
        if (c->engines[i].node == n)
            c->engines[i].alive = 0;
    logf_("node %u (%s, pid %d) lost: %s", n, c->nodes[n].host, c->nodes[n].pid, why);
    /* The user is told which node, on which host, and why: with many
     * machines, "its node" alone does not say where to look. */
    char text[320];
    snprintf(text, sizeof text, "was lost with its node %u (host %s, agent pid %d): %s", n, c->nodes[n].host,
             c->nodes[n].pid, why);
    fail_engine_tasks(c, UINT32_MAX, n, text);
}

/* ---- queues: sends that never block ----------------------------------------- */

static void outq_init(struct outq *q)
{
    q->head = NULL;
    q->tail = &q->head;
    q->n = q->bytes = 0;
}

static void qmsg_free(struct qmsg *m)
{
    for (size_t i = 0; i < m->n; i++)
        zmq_msg_close(&m->frames[i]);
    free(m);
}

static void outq_clear(struct outq *q)
{
    while (q->head) {
        struct qmsg *m = q->head;
        q->head = m->next;
        qmsg_free(m);
    }
    outq_init(q);
}

/* Appends a message (new frames copied, received ones shared) to q, unless
 * that would take q past max_bytes or MAX_QUEUED_MSGS. Returns 0, -ENOBUFS
 * (over a limit: the caller decides what that means) or -ENOMEM. */
static int outq_push(const uint8_t *key, struct outq *q, uint64_t max_bytes, const shoal_msg_header *h,
                     const shoal_frame *new_frames, size_t n_new, zmq_msg_t *msgs, size_t n_msgs)
{
    uint64_t bytes = 0;
    for (size_t i = 0; i < n_new; i++)
        bytes += new_frames[i].len;
    for (size_t i = 0; i < n_msgs; i++)
        bytes += zmq_msg_size(&msgs[i]);
    if (q->n >= MAX_QUEUED_MSGS || q->bytes + bytes > max_bytes)
        return -ENOBUFS;
    size_t n = n_new + n_msgs;
    struct qmsg *m = malloc(sizeof *m + n * sizeof m->frames[0]);
    if (!m)
        return -ENOMEM;
    m->next = NULL;
    m->h = *h;
    m->bytes = bytes;
    m->n = 0;
    for (size_t i = 0; i < n_new; i++, m->n++)
        if (zmq_msg_init_size(&m->frames[i], new_frames[i].len) < 0) {
            qmsg_free(m);
            return -ENOMEM;
        } else if (new_frames[i].len) {
            memcpy(zmq_msg_data(&m->frames[i]), new_frames[i].data, new_frames[i].len);
        }
    for (size_t i = 0; i < n_msgs; i++, m->n++) {
        zmq_msg_init(&m->frames[n_new + i]);
        zmq_msg_copy(&m->frames[n_new + i], &msgs[i]);
    }
    int rc = shoal_wire_sign(key, h, NULL, 0, m->frames, m->n, m->hdr);
    if (rc < 0) {
        qmsg_free(m);
        return rc;
    }
    *q->tail = m;
    q->tail = &m->next;
    q->n++;
    q->bytes += bytes;
    return 0;
}

/* Sends what q holds, in order, until the peer's queue is full. Returns 0
 * when q is empty, -EAGAIN when something is left, or the send's error
 * (-EHOSTUNREACH: the peer is gone), the failed message still queued. */
static int outq_flush(void *sock, const struct route *to, struct outq *q)
{
    shoal_frame route = {to->id, to->len};
    while (q->head) {
        struct qmsg *m = q->head;
        int rc = shoal_wire_send_signed(sock, &route, m->hdr, NULL, 0, m->frames, m->n);
        if (rc < 0)
            return rc;
        q->head = m->next;
        if (!q->head)
            q->tail = &q->head;
        q->n--;
        q->bytes -= m->bytes;
        qmsg_free(m);
    }
    return 0;
}

/*
 * Sends a message to a peer without waiting: straight away when nothing is
 * queued for it and its ZeroMQ queue has room, else at the end of q.
 * Returns 0 (sent or queued), -EHOSTUNREACH (the peer is gone), -ENOBUFS
 * (q is full) or another negative errno.
 */
static int peer_send(struct controller *c, void *sock, const struct route *to, struct outq *q, uint64_t max_bytes,
                     const shoal_msg_header *h, const shoal_frame *new_frames, size_t n_new, zmq_msg_t *msgs,
                     size_t n_msgs)
{
    if (!q->head) {
        shoal_frame route = {to->id, to->len};
        int rc = shoal_wire_forward(sock, c->key, &route, h, new_frames, n_new, msgs, n_msgs);
        if (rc != -EAGAIN)
            return rc;
        c->nqueued++;
        c->flush_backoff_ns = 1000000;
        c->next_flush_ns = now_ns() + c->flush_backoff_ns;
    }
    int rc = outq_push(c->key, q, max_bytes, h, new_frames, n_new, msgs, n_msgs);
    if (rc < 0 && !q->head)
        c->nqueued--;
    return rc;
}

/* ---- clients ------------------------------------------------------------------ */

static uint32_t route_hash(const struct route *r)
{
    uint32_t h = 2166136261u; /* FNV-1a */
    for (size_t i = 0; i < r->len; i++)
        h = (h ^ r->id[i]) * 16777619u;
    return h % CLIENT_BUCKETS;
}

static struct client **client_slot(struct controller *c, const struct route *r)
{
    struct client **p = &c->clients_by_route[route_hash(r)];
    while (*p && ((*p)->route.len != r->len || memcmp((*p)->route.id, r->id, r->len)))
        p = &(*p)->next;
    return p;
}

/* The client at route r, made if it is new; NULL without memory. */
static struct client *client_of(struct controller *c, const struct route *r)
{
    struct client **slot = client_slot(c, r);
    if (*slot)
        return *slot;
    struct client *cl = calloc(1, sizeof *cl);
    if (!cl)
        return NULL;
    cl->route = *r;
    outq_init(&cl->q);
    *slot = cl;
    c->nclients++;
    return cl;
}

/* Frees cl if nothing of it is left: no parts in flight, nothing queued
 * and nothing lost that it has yet to be told of. */
static void client_release(struct controller *c, struct client *cl)
{
    if (cl->parts || cl->q.head || cl->nlost)
        return;
    struct client **slot = client_slot(c, &cl->route);
    if (*slot == cl)
        *slot = cl->next;
    free(cl->lost);
    free(cl);
    c->nclients--;
}

/* cl's connection is gone (ROUTER_MANDATORY said so): what waits for it is
 * dropped, and what comes for it later too. */
static void client_gone(struct client *cl)
{
    if (cl->gone)
        return;
    cl->gone = 1;
    if (cl->q.head || cl->nlost)
        logf_("a client is gone: %" PRIu64 " message(s) for it dropped, the results of %" PRIu64
              " task part(s) in flight will be too", cl->q.n + cl->nlost, cl->parts);
    else if (cl->parts)
        logf_("a client is gone: the results of its %" PRIu64 " task part(s) in flight will be dropped", cl->parts);
    outq_clear(&cl->q);
    cl->nlost = 0;
}

/*
 * Sends a message to client cl, or queues it while cl's ZeroMQ queue is
 * full. Past cl's backlog limit a RESULT is dropped and recorded as lost
 * (cl is told which tasks failed, and why, when it reads again); an OUTPUT
 * is dropped (its text is also in the RESULT). Nothing is dropped silently.
 */
static void client_send(struct controller *c, struct client *cl, const shoal_msg_header *h,
                        const shoal_frame *new_frames, size_t n_new, zmq_msg_t *msgs, size_t n_msgs)
{
    if (cl->gone)
        return;
    int rc = peer_send(c, c->clients, &cl->route, &cl->q, c->client_backlog_max, h, new_frames, n_new, msgs, n_msgs);
    if (rc == -EHOSTUNREACH) {
        client_gone(cl);
    } else if (rc < 0 && h->type == SHOAL_MSG_RESULT) {
        if (cl->nlost == cl->lost_cap) {
            size_t cap = cl->lost_cap ? 2 * cl->lost_cap : 64;
            struct lost *more = realloc(cl->lost, cap * sizeof *more);
            if (!more) {
                logf_("a result of task %" PRIu64 " is lost: no memory to queue it or to say so", h->task_id);
                return;
            }
            cl->lost = more;
            cl->lost_cap = cap;
        }
        if (!cl->nlost && !cl->q.head)
            c->nqueued++; /* flushed, and told, with the queues */
        if (!cl->nlost)
            logf_("a client is not reading its results: %" PRIu64 " message(s), %" PRIu64 " MiB wait for it; "
                  "results past that are dropped, and it is told", cl->q.n, cl->q.bytes >> 20);
        cl->lost[cl->nlost++] = (struct lost){h->task_id, h->reply_to, h->sender};
        for (size_t i = 0; i < n_msgs; i++)
            cl->dropped_bytes += zmq_msg_size(&msgs[i]);
        c->results_dropped++;
    } else if (rc < 0) {
        logf_("output of task %" PRIu64 " dropped: its client is not reading (%s)", h->task_id,
              rc == -ENOBUFS ? "its backlog is full" : zmq_strerror(-rc));
    }
}

/* Tells cl of the results it lost, once its queue is empty; -EAGAIN while
 * its ZeroMQ queue is still full. */
static int client_tell_lost(struct controller *c, struct client *cl)
{
    while (cl->nlost) {
        struct lost *l = &cl->lost[cl->nlost - 1];
        char why[256];
        snprintf(why, sizeof why, "answered task %" PRIu64 ", but the controller dropped the result: this client "
                 "did not read its results while %" PRIu64 " MiB of them waited (the limit is %" PRIu64 " MiB, "
                 "shoal start --client-backlog)", l->task_id, (cl->dropped_bytes >> 20) + 1,
                 c->client_backlog_max >> 20);
        shoal_msg_header h = {.msg_id = ++c->next_msg_id, .task_id = l->task_id, .reply_to = l->client_msg};
        shoal_frame route = {cl->route.id, cl->route.len};
        int rc = shoal_wire_send_engine_error(c->clients, c->key, &route, &h, l->engine, why);
        if (rc == -EAGAIN)
            return rc;
        if (rc == -EHOSTUNREACH) {
            client_gone(cl);
            return 0;
        }
        cl->nlost--;
    }
    cl->dropped_bytes = 0;
    return 0;
}

/* Tries every queue again: clients', then nodes'. */
static void flush_queues(struct controller *c)
{
    uint32_t before = c->nqueued, left = 0;
    for (uint32_t b = 0; b < CLIENT_BUCKETS; b++) {
        struct client *next;
        for (struct client *cl = c->clients_by_route[b]; cl; cl = next) {
            next = cl->next;
            if (!cl->q.head && !cl->nlost)
                continue;
            int rc = outq_flush(c->clients, &cl->route, &cl->q);
            if (rc == 0)
                rc = client_tell_lost(c, cl);
            if (rc == -EHOSTUNREACH)
                client_gone(cl);
            if (cl->q.head || cl->nlost)
                left++;
            else
                client_release(c, cl);
        }
    }
    uint32_t gone[MAX_NODES], ngone = 0;
    for (uint32_t i = 0; i < c->nnodes; i++) {
        struct node *nd = &c->nodes[i];
        if (!nd->q.head)
            continue;
        if (outq_flush(c->agents, &nd->route, &nd->q) == -EHOSTUNREACH)
            gone[ngone++] = i;
        else
            left += nd->q.head != NULL;
    }
    /* Soon again after progress; less often while nothing moves. */
    if (left < before || c->flush_backoff_ns == 0)
        c->flush_backoff_ns = 1000000;
    else if (c->flush_backoff_ns < 64 * 1000000)
        c->flush_backoff_ns *= 2;
    c->nqueued = left;
    c->next_flush_ns = now_ns() + c->flush_backoff_ns;
    /* A node whose connection is gone is lost now: its tasks fail (their
     * errors queue for the clients, counted above by peer_send), rather
     * than waiting for a heartbeat that a re-registration could pre-empt. */
    for (uint32_t k = 0; k < ngone; k++)
        if (c->nodes[gone[k]].alive)
            node_lost(c, gone[k], "its connection is gone (its agent died, or reconnects)");
        else
            outq_clear(&c->nodes[gone[k]].q);
}

/* ---- tasks ------------------------------------------------------------------ */

static struct task **task_slot(struct controller *c, uint64_t id)
{
    struct task **p = &c->tasks[id % TASK_BUCKETS];
    while (*p && (*p)->id != id)
        p = &(*p)->next;
    return p;
}

static void task_free(struct controller *c, struct task **slot)
{
    struct task *t = *slot;
    *slot = t->next;
    free(t->engines);
    free(t->done);
    free(t);
    c->ntasks--;
}

/* Tells client cl that engine `engine` could not run its task: an
 * EngineError RESULT, in its turn after what is queued for cl. */
static void fail_target(struct controller *c, struct client *cl, uint64_t client_msg, uint64_t task_id,
                        uint32_t engine, const char *why)
{
    char evalue[256], meta[SHOAL_WIRE_ENGINE_ERROR_MAX];
    snprintf(evalue, sizeof evalue, "engine %u %s (task %" PRIu64 ")", engine, why, task_id);
    int n = shoal_wire_engine_error_meta(engine, evalue, meta, sizeof meta);
    if (n < 0)
        return;
    shoal_frame f[2] = {{meta, (size_t)n}, {"", 0}};
    shoal_msg_header h = {.type = SHOAL_MSG_RESULT, .n_payload = 2, .msg_id = ++c->next_msg_id,
                          .task_id = task_id, .sender = engine, .target = engine, .reply_to = client_msg};
    client_send(c, cl, &h, f, 2, NULL, 0);
}

/* Whether engine e's part of task t is yet to answer. */
static int part_pending(const struct task *t, uint32_t e)
{
    for (uint32_t i = 0; i < t->n; i++)
        if (t->engines[i] == e && !t->done[i])
            return 1;
    return 0;
}

/* Marks engine e's part of task t done; frees t when nothing is left. */
static void task_target_done(struct controller *c, struct task **slot, uint32_t e)
{
    struct task *t = *slot;
    for (uint32_t i = 0; i < t->n; i++)
        if (t->engines[i] == e && !t->done[i]) {
            t->done[i] = 1;
            t->remaining--;
            t->cl->parts--;
            break;
        }
    if (t->remaining == 0) {
        struct client *cl = t->cl;
        task_free(c, slot);
        client_release(c, cl);
    }
}

/* Fails every unanswered part of every task that engine e (or, with e ==
 * UINT32_MAX, any engine of node n) was running. */
static void fail_engine_tasks(struct controller *c, uint32_t e, uint32_t n, const char *why)
{
    for (uint32_t b = 0; b < TASK_BUCKETS; b++) {
        struct task **p = &c->tasks[b];
        while (*p) {
            struct task *t = *p;
            for (uint32_t i = 0; i < t->n && t->remaining; i++) {
                uint32_t te = t->engines[i];
                if (t->done[i] || (e != UINT32_MAX ? te != e : c->engines[te].node != n))
                    continue;
                fail_target(c, t->cl, t->client_msg, t->id, te, why);
                t->done[i] = 1;
                t->remaining--;
                t->cl->parts--;
            }
            if (t->remaining == 0) {
                struct client *cl = t->cl;
                task_free(c, p);
                client_release(c, cl);
            } else {
                p = &t->next;
            }
        }
    }
}

/*
 * A client's TASK: payload frame 0 lists the target engine ids (u32,
 * little-endian; empty means every live engine). The rest of the message is
 * the engines' business and goes on untouched: one message to each node
 * that runs targets, with frame 0 replaced by that node's targets.
 */
static void route_task(struct controller *c, shoal_wire_msg *m, const struct route *from)
{
    if (m->hdr.n_payload < 1) {
        reply_error(c, c->clients, from, m->hdr.msg_id, "a TASK needs its targets in payload frame 0");
        return;
    }
    shoal_frame tf = shoal_wire_frame(m, 0);
    if (tf.len % 4 || tf.len / 4 > c->nengines) {
        reply_error(c, c->clients, from, m->hdr.msg_id, "bad target list (%zu bytes)", tf.len);
        return;
    }
    struct client *cl = client_of(c, from);
    if (!cl) {
        reply_error(c, c->clients, from, m->hdr.msg_id, "the controller is out of memory");
        return;
    }
    uint32_t n = (uint32_t)(tf.len / 4);
    if (cl->parts + (n ? n : c->nengines) > c->max_client_parts) {
        reply_error(c, c->clients, from, m->hdr.msg_id, "this client has %" PRIu64 " task parts in flight, "
                    "the most one client may have is %" PRIu64 ": take results before submitting more",
                    cl->parts, c->max_client_parts);
        client_release(c, cl);
        return;
    }
    uint32_t *targets = malloc((n ? n : c->nengines + 1) * sizeof *targets);
    if (!targets) {
        client_release(c, cl);
        return;
    }
    if (n) {
        memcpy(targets, tf.data, tf.len); /* little-endian hosts only, as the arena */
        /* Each engine answers once per task: a target named twice is an error. */
        uint8_t *seen = calloc(c->nengines + 1, 1);
        for (uint32_t i = 0; seen && i < n; i++) {
            uint32_t e = targets[i] < c->nengines ? targets[i] : c->nengines;
            if (e < c->nengines && seen[e]++) {
                reply_error(c, c->clients, from, m->hdr.msg_id, "engine %u is named twice in the targets", e);
                free(seen);
                free(targets);
                client_release(c, cl);
                return;
            }
        }
        free(seen);
    } else {
        for (uint32_t i = 0; i < c->nengines; i++)
            if (c->engines[i].alive)
                targets[n++] = i;
    }
    uint64_t task_id = ++c->next_task_id;
    struct task *t = calloc(1, sizeof *t);
    uint8_t *done = calloc(n ? n : 1, 1);
    uint32_t *mine = malloc((n ? n : 1) * sizeof *mine);
    if (!t || !done || !mine) {
        free(targets);
        free(t);
        free(done);
        free(mine);
        reply_error(c, c->clients, from, m->hdr.msg_id, "the controller is out of memory");
        client_release(c, cl);
        return;
    }
    *t = (struct task){.id = task_id, .cl = cl, .client_msg = m->hdr.msg_id, .n = n, .engines = targets,
                       .done = done};
    /* In the table first: a failure below (fail_target) may look for it. */
    struct task **slot = task_slot(c, task_id);
    *slot = t;
    c->ntasks++;
    for (uint32_t i = 0; i < n; i++) {
        uint32_t e = targets[i];
        if (e >= c->nengines || !c->engines[e].alive) {
            fail_target(c, cl, m->hdr.msg_id, task_id, e, e >= c->nengines ? "does not exist" : "is not running");
            done[i] = 1;
        } else {
            t->remaining++;
            cl->parts++;
        }
    }
    /* One message per node, carrying that node's live targets. */
    for (uint32_t node = 0; node < c->nnodes; node++) {
        uint32_t k = 0;
        for (uint32_t i = 0; i < n; i++)
            if (!done[i] && c->engines[targets[i]].node == node)
                mine[k++] = targets[i];
        if (!k)
            continue;
        shoal_msg_header h = {.type = SHOAL_MSG_TASK, .flags = m->hdr.flags, .n_payload = m->hdr.n_payload,
                              .n_buffers = m->hdr.n_buffers, .msg_id = ++c->next_msg_id, .task_id = task_id,
                              .target = k == 1 ? mine[0] : SHOAL_WIRE_TARGET_ALL};
        struct node *nd = &c->nodes[node];
        shoal_frame first = {mine, (size_t)k * 4};
        int rc = peer_send(c, c->agents, &nd->route, &nd->q, NODE_BACKLOG_BYTES, &h, &first, 1, m->frames + 1,
                           m->nframes - 1);
        if (rc < 0) {
            const char *why = rc == -ENOBUFS ? "could not be reached: its node's queue is full" :
                              rc == -EHOSTUNREACH ? "could not be reached: its node's connection is gone" :
                              "could not be reached";
            for (uint32_t i = 0; i < n; i++)
                if (!done[i] && c->engines[targets[i]].node == node) {
                    fail_target(c, cl, m->hdr.msg_id, task_id, targets[i], why);
                    done[i] = 1;
                    t->remaining--;
                    cl->parts--;
                }
        }
    }
    free(mine);
    if (t->remaining == 0) {
        task_free(c, slot);
        client_release(c, cl);
    }
}

/* An engine's RESULT (or OUTPUT) on its way to the client that asked. */
static void route_result(struct controller *c, shoal_wire_msg *m)
{
    struct task **slot = task_slot(c, m->hdr.task_id);
    if (!*slot) {
        logf_("dropping a result for task %" PRIu64 ", which is not pending", m->hdr.task_id);
        return;
    }
    struct task *t = *slot;
    if (m->hdr.type == SHOAL_MSG_RESULT && !part_pending(t, m->hdr.sender)) {
        /* Its part failed already (its node was lost, then came back): the
         * client was told, and is told once. */
        logf_("dropping a late result of engine %u for task %" PRIu64 ": its part had failed", m->hdr.sender,
              m->hdr.task_id);
        return;
    }
    shoal_msg_header h = m->hdr;
    h.msg_id = ++c->next_msg_id;
    h.reply_to = t->client_msg;
    h.stamp_ns = 0; /* signed anew here: stamped now */
    client_send(c, t->cl, &h, NULL, 0, m->frames, m->nframes);
    if (m->hdr.type == SHOAL_MSG_RESULT)
        task_target_done(c, slot, m->hdr.sender);
}

/* A result refused from an agent that holds the key (its header
 * authentic; its body unread: past our limits, or stamped outside our
 * window): its part fails, said why, or its client would wait for it for
 * ever. */
static void result_refused(struct controller *c, const shoal_msg_header *h, const char *why)
{
    struct task **slot = task_slot(c, h->task_id);
    if (!*slot || !part_pending(*slot, h->sender))
        return;
    fail_target(c, (*slot)->cl, (*slot)->client_msg, (*slot)->id, h->sender, why);
    task_target_done(c, slot, h->sender);
}

/*
 * A client's ABORT: {"msg_ids": [its TASK msg_ids]}. Each node that has an
 * unanswered part of one of those tasks gets an ABORT for the task, and
 * marks it where its engines have not started it. Answers QUERY_REPLY
 * {"aborting": tasks found}: tasks already answered are not found.
 */
static void abort_tasks(struct controller *c, shoal_wire_msg *m, const struct route *from)
{
    cJSON *body = json_body(m);
    cJSON *ids = cJSON_GetObjectItemCaseSensitive(body, "msg_ids");
    if (!cJSON_IsArray(ids)) {
        reply_error(c, c->clients, from, m->hdr.msg_id, "an ABORT needs {\"msg_ids\": [...]}");
        cJSON_Delete(body);
        return;
    }
    int found = 0;
    uint8_t *node_has = calloc(c->nnodes ? c->nnodes : 1, 1);
    for (uint32_t b = 0; node_has && b < TASK_BUCKETS; b++)
        for (struct task *t = c->tasks[b]; t; t = t->next) {
            if (t->cl->route.len != from->len || memcmp(t->cl->route.id, from->id, from->len))
                continue;
            int wanted = 0;
            const cJSON *id;
            cJSON_ArrayForEach(id, ids)
                if (cJSON_IsNumber(id) && id->valuedouble == (double)t->client_msg)
                    wanted = 1;
            if (!wanted)
                continue;
            found++;
            memset(node_has, 0, c->nnodes ? c->nnodes : 1);
            for (uint32_t i = 0; i < t->n; i++)
                if (!t->done[i])
                    node_has[c->engines[t->engines[i]].node] = 1;
            for (uint32_t n = 0; n < c->nnodes; n++) {
                if (!node_has[n] || !c->nodes[n].alive)
                    continue;
                shoal_msg_header h = {.type = SHOAL_MSG_ABORT, .msg_id = ++c->next_msg_id, .task_id = t->id,
                                      .target = SHOAL_WIRE_TARGET_ALL};
                struct node *nd = &c->nodes[n];
                if (peer_send(c, c->agents, &nd->route, &nd->q, NODE_BACKLOG_BYTES, &h, NULL, 0, NULL, 0) < 0)
                    logf_("could not pass on the abort of task %" PRIu64 " to node %u", t->id, n);
            }
        }
    free(node_has);
    cJSON_Delete(body);
    cJSON *reply = cJSON_CreateObject();
    cJSON_AddNumberToObject(reply, "aborting", found);
    reply_json(c, c->clients, from, SHOAL_MSG_QUERY_REPLY, m->hdr.msg_id, reply);
    cJSON_Delete(reply);
}

/*
 * A client's SIGNAL: {"sig": n, "targets": [engine ids]} (no targets: every
 * live engine). Each node with targets gets a SIGNAL naming its own, and
 * sends the signal to their processes. Answers QUERY_REPLY {"signalled":
 * [ids], "not_running": [ids]}.
 */
static void signal_engines(struct controller *c, shoal_wire_msg *m, const struct route *from)
{
    cJSON *body = json_body(m);
    cJSON *sig = cJSON_GetObjectItemCaseSensitive(body, "sig");
    cJSON *targets = cJSON_GetObjectItemCaseSensitive(body, "targets");
    if (!cJSON_IsNumber(sig) || sig->valuedouble < 0 || sig->valuedouble > 64 ||
        sig->valuedouble != (double)(int)sig->valuedouble || (targets && !cJSON_IsArray(targets) &&
                                                              !cJSON_IsNull(targets))) {
        reply_error(c, c->clients, from, m->hdr.msg_id,
                    "a SIGNAL needs {\"sig\": a signal number 0-64, \"targets\": [engine ids]}");
        cJSON_Delete(body);
        return;
    }
    cJSON *reply = cJSON_CreateObject();
    cJSON *done = cJSON_AddArrayToObject(reply, "signalled");
    cJSON *missing = cJSON_AddArrayToObject(reply, "not_running");
    cJSON **per_node = calloc(c->nnodes ? c->nnodes : 1, sizeof *per_node);
    for (uint32_t e = 0; per_node && e < c->nengines; e++) {
        int wanted = !cJSON_IsArray(targets);
        const cJSON *t;
        cJSON_ArrayForEach(t, targets)
            if (cJSON_IsNumber(t) && t->valuedouble == (double)e)
                wanted = 1;
        if (!wanted || (!cJSON_IsArray(targets) && !c->engines[e].alive))
            continue;
        uint32_t n = c->engines[e].node;
        if (!c->engines[e].alive || !c->nodes[n].alive) {
            cJSON_AddItemToArray(missing, cJSON_CreateNumber(e));
            continue;
        }
        if (!per_node[n])
            per_node[n] = cJSON_CreateArray();
        cJSON_AddItemToArray(per_node[n], cJSON_CreateNumber(e));
        cJSON_AddItemToArray(done, cJSON_CreateNumber(e));
    }
    /* Targets that name no engine at all. */
    const cJSON *t;
    cJSON_ArrayForEach(t, targets)
        if (!cJSON_IsNumber(t) || t->valuedouble < 0 || t->valuedouble >= (double)c->nengines ||
            t->valuedouble != (double)(uint32_t)t->valuedouble)
            cJSON_AddItemToArray(missing, cJSON_Duplicate(t, 1));
    for (uint32_t n = 0; per_node && n < c->nnodes; n++) {
        if (!per_node[n])
            continue;
        cJSON *j = cJSON_CreateObject();
        cJSON_AddNumberToObject(j, "sig", sig->valueint);
        cJSON_AddItemToObject(j, "engines", per_node[n]);
        char *text = cJSON_PrintUnformatted(j);
        if (text) {
            shoal_msg_header h = {.type = SHOAL_MSG_SIGNAL, .n_payload = 1, .msg_id = ++c->next_msg_id,
                                  .target = SHOAL_WIRE_TARGET_ALL};
            shoal_frame f = {text, strlen(text)};
            struct node *nd = &c->nodes[n];
            if (peer_send(c, c->agents, &nd->route, &nd->q, NODE_BACKLOG_BYTES, &h, &f, 1, NULL, 0) < 0)
                logf_("could not pass a signal on to node %u", n);
            free(text);
        }
        cJSON_Delete(j);
    }
    free(per_node);
    reply_json(c, c->clients, from, SHOAL_MSG_QUERY_REPLY, m->hdr.msg_id, reply);
    cJSON_Delete(reply);
    cJSON_Delete(body);
}

/* ---- handlers ---------------------------------------------------------------- */

static void on_client(struct controller *c, shoal_wire_msg *m, const struct route *from)
{
    cJSON *reply = NULL;
    switch (m->hdr.type) {
    case SHOAL_MSG_REGISTER:
        reply = registry_json(c);
        reply_json(c, c->clients, from, SHOAL_MSG_REGISTER_REPLY, m->hdr.msg_id, reply);
        break;
    case SHOAL_MSG_QUERY:
        reply = status_json(c);
        reply_json(c, c->clients, from, SHOAL_MSG_QUERY_REPLY, m->hdr.msg_id, reply);
        break;
    case SHOAL_MSG_HEARTBEAT:
        reply = cJSON_CreateObject();
        reply_json(c, c->clients, from, SHOAL_MSG_HEARTBEAT_ACK, m->hdr.msg_id, reply);
        break;
    case SHOAL_MSG_SHUTDOWN:
        logf_("shutdown asked by a client");
        reply = cJSON_CreateObject();
        cJSON_AddBoolToObject(reply, "stopping", 1);
        reply_json(c, c->clients, from, SHOAL_MSG_QUERY_REPLY, m->hdr.msg_id, reply);
        c->stopping = 1;
        break;
    case SHOAL_MSG_TASK:
        route_task(c, m, from);
        break;
    case SHOAL_MSG_ABORT:
        abort_tasks(c, m, from);
        break;
    case SHOAL_MSG_SIGNAL:
        signal_engines(c, m, from);
        break;
    default:
        reply_error(c, c->clients, from, m->hdr.msg_id, "message type %u is not one a client may send",
                    (unsigned)m->hdr.type);
    }
    cJSON_Delete(reply);
}

/* An agent we have no live node for (we declared it lost, or it
 * reconnected under a new identity): an ERROR that asks it to register
 * again, with its engines. */
static void tell_register_again(struct controller *c, const struct route *to, uint64_t reply_to)
{
    cJSON *j = cJSON_CreateObject();
    cJSON_AddStringToObject(j, "error", "this controller has no live node for this agent (it was declared lost, "
                                        "or its connection changed): register again");
    cJSON_AddBoolToObject(j, "register_again", 1);
    reply_json(c, c->agents, to, SHOAL_MSG_ERROR, reply_to, j);
    cJSON_Delete(j);
}

/*
 * Node n's agent registers again (after we declared it lost, or from a new
 * connection): the node lives again under its new route, and so do the
 * engines it lists ({"id", "pid"}) that were its own, with their ids (and,
 * on the engines, their namespaces). Tasks failed meanwhile stay failed.
 */
/* A REGISTER's "bulk": the agent's bulk server, which clients send large
 * task data to (a string of "tcp://" and at most 79 bytes; else none). */
static void node_bulk(struct node *nd, const cJSON *body)
{
    const cJSON *bulk = cJSON_GetObjectItemCaseSensitive(body, "bulk");
    nd->bulk[0] = '\0';
    if (cJSON_IsString(bulk) && strncmp(bulk->valuestring, "tcp://", 6) == 0 &&
        strlen(bulk->valuestring) < sizeof nd->bulk)
        snprintf(nd->bulk, sizeof nd->bulk, "%s", bulk->valuestring);
}

static void node_back(struct controller *c, int n, const struct route *from, const cJSON *engines)
{
    struct node *nd = &c->nodes[n];
    /* Still live under its old connection: what went that way, or waits
     * for it, may never have arrived, and results sent from the new one
     * before this were refused. Its tasks fail now (said once, as for a
     * node lost), not wait for ever. */
    if (nd->alive)
        node_lost(c, (uint32_t)n, "its agent registered again from a new connection");
    nd->route = *from;
    nd->alive = 1;
    outq_init(&nd->q);
    nd->last_seen_ns = now_ns();
    char ids[256] = "";
    size_t k = 0;
    const cJSON *e;
    cJSON_ArrayForEach(e, engines) {
        cJSON *id = cJSON_GetObjectItemCaseSensitive(e, "id");
        cJSON *pid = cJSON_GetObjectItemCaseSensitive(e, "pid");
        if (!cJSON_IsNumber(id) || !cJSON_IsNumber(pid) || id->valuedouble < 0 ||
            id->valuedouble >= (double)c->nengines)
            continue;
        struct engine *en = &c->engines[(uint32_t)id->valuedouble];
        if (en->node != (uint32_t)n || en->pid != pid->valueint)
            continue;
        en->alive = 1;
        int w = snprintf(ids + k, sizeof ids - k, "%s%u", k ? ", " : "", (uint32_t)id->valuedouble);
        if (w > 0 && (size_t)w < sizeof ids - k)
            k += (size_t)w;
    }
    logf_("node %d (%s, agent pid %d) registered again, with engines [%s]", n, nd->host, nd->pid, ids);
}

static void on_agent(struct controller *c, shoal_wire_msg *m, const struct route *from)
{
    int n = find_node(c, from);
    if (n >= 0)
        c->nodes[n].last_seen_ns = now_ns();
    cJSON *body = json_body(m), *reply = NULL;
    switch (m->hdr.type) {
    case SHOAL_MSG_REGISTER: {
        cJSON *host = cJSON_GetObjectItemCaseSensitive(body, "host");
        cJSON *pid = cJSON_GetObjectItemCaseSensitive(body, "pid");
        if (!cJSON_IsString(host) || !cJSON_IsNumber(pid)) {
            reply_error(c, c->agents, from, m->hdr.msg_id, "REGISTER needs {\"host\": str, \"pid\": int}");
            break;
        }
        cJSON *aid = cJSON_GetObjectItemCaseSensitive(body, "agent_id");
        const char *agent_id = NULL;
        if (cJSON_IsString(aid)) {
            agent_id = aid->valuestring;
            if (strlen(agent_id) != 32 || strspn(agent_id, "0123456789abcdef") != 32) {
                reply_error(c, c->agents, from, m->hdr.msg_id, "REGISTER's agent_id must be 32 hex digits");
                break;
            }
        }
        int back = n < 0 ? find_node_by_agent(c, host->valuestring, pid->valueint, agent_id) : -1;
        if (back >= 0) {
            node_back(c, back, from, cJSON_GetObjectItemCaseSensitive(body, "engines"));
            n = back;
            node_bulk(&c->nodes[n], body);
        } else if (n < 0) {
            if (c->nnodes == MAX_NODES) {
                reply_error(c, c->agents, from, m->hdr.msg_id, "too many nodes (%d)", MAX_NODES);
                break;
            }
            n = (int)c->nnodes++;
            struct node *nd = &c->nodes[n];
            nd->route = *from;
            nd->alive = 1;
            outq_init(&nd->q);
            nd->pid = pid->valueint;
            snprintf(nd->host, sizeof nd->host, "%s", host->valuestring);
            snprintf(nd->agent_id, sizeof nd->agent_id, "%s", agent_id ? agent_id : "");
            cJSON *sock = cJSON_GetObjectItemCaseSensitive(body, "socket");
            if (cJSON_IsString(sock))
                snprintf(nd->socket, sizeof nd->socket, "%s", sock->valuestring);
            cJSON *loop = cJSON_GetObjectItemCaseSensitive(body, "loop");
            if (cJSON_IsString(loop))
                snprintf(nd->loop, sizeof nd->loop, "%s", loop->valuestring);
            node_bulk(nd, body);
            nd->last_seen_ns = now_ns();
            logf_("node %d registered: %s, agent pid %d", n, nd->host, nd->pid);
        }
        reply = cJSON_CreateObject();
        cJSON_AddNumberToObject(reply, "node", n);
        cJSON_AddNumberToObject(reply, "heartbeat_ms", (double)(c->heartbeat_ns / 1000000));
        cJSON_AddNumberToObject(reply, "node_timeout_ms", (double)(c->node_timeout_ns / 1000000));
        reply_json(c, c->agents, from, SHOAL_MSG_REGISTER_REPLY, m->hdr.msg_id, reply);
        break;
    }
    case SHOAL_MSG_HEARTBEAT: /* an agent that has not heard from us for a while asks */
        if (n >= 0) {
            reply = cJSON_CreateObject();
            reply_json(c, c->agents, from, SHOAL_MSG_HEARTBEAT_ACK, m->hdr.msg_id, reply);
        } else {
            tell_register_again(c, from, m->hdr.msg_id);
        }
        break;
    case SHOAL_MSG_ENGINE_EVENT: {
        cJSON *ev = cJSON_GetObjectItemCaseSensitive(body, "event");
        cJSON *local = cJSON_GetObjectItemCaseSensitive(body, "local");
        cJSON *pid = cJSON_GetObjectItemCaseSensitive(body, "pid");
        if (n < 0) {
            tell_register_again(c, from, m->hdr.msg_id);
            break;
        }
        if (!cJSON_IsString(ev) || !cJSON_IsNumber(local) || !cJSON_IsNumber(pid)) {
            reply_error(c, c->agents, from, m->hdr.msg_id,
                        "ENGINE_EVENT needs {\"event\": \"started\"|\"died\", \"local\": int, \"pid\": int}");
            break;
        }
        if (!strcmp(ev->valuestring, "started")) {
            if (c->nengines == MAX_ENGINES) {
                reply_error(c, c->agents, from, m->hdr.msg_id, "too many engines (%d)", MAX_ENGINES);
                break;
            }
            uint32_t id = c->nengines++;
            c->engines[id] = (struct engine){(uint32_t)n, (uint32_t)local->valueint, pid->valueint, 1};
            logf_("engine %u registered: node %d, pid %d", id, n, pid->valueint);
            reply = cJSON_CreateObject();
            cJSON_AddNumberToObject(reply, "engine", id);
            reply_json(c, c->agents, from, SHOAL_MSG_REGISTER_REPLY, m->hdr.msg_id, reply);
        } else if (!strcmp(ev->valuestring, "died")) {
            for (uint32_t i = 0; i < c->nengines; i++)
                if (c->engines[i].node == (uint32_t)n && c->engines[i].pid == pid->valueint && c->engines[i].alive) {
                    c->engines[i].alive = 0;
                    logf_("engine %u (pid %d) died", i, pid->valueint);
                }
        } else {
            reply_error(c, c->agents, from, m->hdr.msg_id, "unknown engine event %.40s", ev->valuestring);
        }
        break;
    }
    case SHOAL_MSG_HEARTBEAT_ACK:
        if (n < 0)
            tell_register_again(c, from, m->hdr.msg_id);
        break;
    case SHOAL_MSG_RESULT:
    case SHOAL_MSG_OUTPUT:
        if (n < 0) {
            /* Of a task failed when its node was lost: dropped, told. */
            tell_register_again(c, from, m->hdr.msg_id);
            break;
        }
        if (m->hdr.sender >= c->nengines || c->engines[m->hdr.sender].node != (uint32_t)n) {
            reply_error(c, c->agents, from, m->hdr.msg_id, "a result from an engine that is not yours");
            break;
        }
        route_result(c, m);
        break;
    default:
        reply_error(c, c->agents, from, m->hdr.msg_id, "message type %u is not one an agent may send",
                    (unsigned)m->hdr.type);
    }
    cJSON_Delete(body);
    cJSON_Delete(reply);
}

/*
 * Logs a refused message, at most REFUSALS_LOGGED a window: a sender of
 * garbage must not fill the disk (90 bytes a message came to 33 GiB an hour
 * from one sender). The rest are counted, and summed up in one line when the
 * window ends.
 */
/* Ends the window of refusals if it is over: the line that counts the
 * ones not logged. Also called by the heartbeats, so that a burst that
 * stops is counted too. */
static void refusal_window(struct controller *c, int64_t now)
{
    if (now - c->refusal_window_ns <= REFUSAL_WINDOW_NS)
        return;
    if (c->refusals_unlogged)
        logf_("... and %" PRIu64 " more message(s) refused in %lld s (the counters in QUERY_REPLY's \"refused\" "
              "have them all)", c->refusals_unlogged, (long long)(REFUSAL_WINDOW_NS / 1000000000));
    c->refusal_window_ns = now;
    c->refusals_in_window = c->refusals_unlogged = 0;
}

/* Logs one refusal (a message, a connection) as fmt says, within the
 * limit of a window. */
static void log_refusal(struct controller *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void log_refusal(struct controller *c, const char *fmt, ...)
{
    refusal_window(c, now_ns());
    if (c->refusals_in_window++ >= REFUSALS_LOGGED) {
        c->refusals_unlogged++;
        return;
    }
    char text[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(text, sizeof text, fmt, ap);
    va_end(ap);
    logf_("%s", text);
}

/* How far stamp is from our clock, in words: "86400 s before" or "after". */
static void skew_words(uint64_t stamp, char *out, size_t len)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    uint64_t now = (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
    uint64_t d = stamp <= now ? now - stamp : stamp - now;
    snprintf(out, len, "%.1f s %s", (double)d / 1e9, stamp <= now ? "before" : "after");
}

/* The answer to a message refused unread: sent at once or not at all, with
 * no queue and no client record (its sender may hold no key, and need not
 * read: what it is sent must not grow here). */
static void tell_refused(struct controller *c, void *sock, const struct route *to, int rc)
{
    char text[128];
    int n = snprintf(text, sizeof text, "{\"error\":\"message refused: %s\"}", shoal_wire_strerror(rc));
    shoal_msg_header h = {.type = SHOAL_MSG_ERROR, .n_payload = 1, .msg_id = ++c->next_msg_id,
                          .target = SHOAL_WIRE_TARGET_ALL};
    shoal_frame route = {to->id, to->len}, body = {text, (size_t)n};
    (void)shoal_wire_send(sock, c->key, &route, &h, &body, 1);
}

/* Receives what is waiting on sock and handles it, for DRAIN_SLICE_NS at
 * most: one busy peer must not starve the other socket, the heartbeats or
 * the queues. */
static void drain_socket(struct controller *c, void *sock, int from_agents)
{
    int64_t until = now_ns() + DRAIN_SLICE_NS;
    for (int budget = 0; budget < 1024 && (budget % 64 || now_ns() < until); budget++) {
        shoal_wire_msg m;
        shoal_wire_counters *k = from_agents ? &c->agent_counters : &c->client_counters;
        int rc = shoal_wire_recv(sock, c->key, true, from_agents ? &c->agent_limits : &c->client_limits,
                                 ZMQ_DONTWAIT, &m, k);
        if (rc == -EAGAIN) {
            shoal_wire_msg_close(&m);
            return;
        }
        struct route from;
        route_of(&m, &from);
        if (rc == -ESTALE) {
            /* Authentic, but signed too long ago (or ahead): a replay, or a
             * clock that is off. Its sender holds the key, so it is told, as
             * for -EFBIG; a replayed request gets the answer, not the run. */
            char skew[64], why[320];
            skew_words(m.hdr.stamp_ns, skew, sizeof skew);
            snprintf(why, sizeof why, "was stamped %s this controller's clock, past --max-skew-ms %" PRIu64
                     ": a replayed message, or a clock that is off (keep the hosts' clocks in step, e.g. NTP)",
                     skew, c->max_skew_ms);
            log_refusal(c, "refused a message (type %u) from %s: it %s", (unsigned)m.hdr.type,
                        from_agents ? "an agent" : "a client", why);
            if (from_agents && m.hdr.type == SHOAL_MSG_RESULT) {
                char part[400];
                snprintf(part, sizeof part, "sent a result that %s", why);
                result_refused(c, &m.hdr, part);
            } else {
                reply_error(c, sock, &from, m.hdr.msg_id, "message refused: it %s", why);
            }
            shoal_wire_msg_close(&m);
            continue;
        }
        if (rc < 0) {
            log_refusal(c, "refused a message from %s: %s", from_agents ? "an agent" : "a client",
                        shoal_wire_strerror(rc));
            if (rc == -EFBIG && from_agents && m.hdr.type == SHOAL_MSG_RESULT) {
                char why[192];
                snprintf(why, sizeof why,
                         "sent a result of %" PRIu64 " bytes, past this controller's limits (--max-payload %" PRIu64
                         ", --max-frame %" PRIu64 ")",
                         m.hdr.body_len, c->agent_limits.max_payload, c->agent_limits.max_frame);
                result_refused(c, &m.hdr, why);
            } else if (rc == -EFBIG && !from_agents) /* a client's, signed: its request fails, said why */
                reply_error(c, sock, &from, m.hdr.msg_id,
                            "message refused: %s, %" PRIu64 " bytes, past this controller's limits (--max-payload %"
                            PRIu64 ", --max-frame %" PRIu64 ")",
                            shoal_wire_strerror(rc), m.hdr.body_len, c->client_limits.max_payload,
                            c->client_limits.max_frame);
            else if (m.has_route)
                tell_refused(c, sock, &from, rc);
            shoal_wire_msg_close(&m);
            if (rc == -ETERM)
                return;
            continue;
        }
        if (from_agents)
            on_agent(c, &m, &from);
        else
            on_client(c, &m, &from);
        shoal_wire_msg_close(&m);
    }
}

/* Answers what the ZAP handler was asked: libzmq holds each Curve
 * connection's handshake until we do, so this runs at every turn of the
 * loop and never waits (shoal_curve_zap_serve does not). */
static void serve_zap(struct controller *c)
{
    for (int budget = 0; budget < 1024; budget++) {
        shoal_curve_zap_request req;
        int rc = shoal_curve_zap_serve(c->zap, c->member_public, &req);
        if (rc == 0)
            return;
        if (rc < 0) {
            log_refusal(c, "the ZAP handler failed: %s", zmq_strerror(-rc));
            return;
        }
        if (req.admitted)
            continue;
        int from = strcmp(req.domain, SHOAL_CURVE_DOMAIN_AGENTS) ? FROM_CLIENTS : FROM_AGENTS;
        c->unauthenticated[from]++;
        log_refusal(c, "refused a connection from %s to the %s port: its Curve key is not this cluster's member "
                    "key (an old connection file, or not a member)", req.address[0] ? req.address : "?",
                    from == FROM_AGENTS ? "agents'" : "clients'");
    }
}

/* Reads the handshake events of socket `from`: a failed handshake (a
 * plaintext peer of a Curve socket, a replayed Curve stream, a peer that
 * closed half-way) is counted and logged like a refused message. Refusals
 * by ZAP are counted by serve_zap. */
static void read_handshakes(struct controller *c, int from)
{
    shoal_curve_event ev;
    for (int budget = 0; budget < 1024 && shoal_curve_monitor_read(c->monitors[from], &ev) == 1; budget++) {
        if (ev.event != ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL && ev.event != ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL)
            continue;
        c->handshake_failed[from]++;
        const char *what = ev.event == ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL ? "the peer went (or was cut off)" :
                           ev.value == ZMQ_PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH ?
                               (c->curve ? "the peer does not speak Curve" : "the peer speaks Curve, we do not") :
                           ev.value == ZMQ_PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC ?
                               "a cryptographic error (another server key, or a replayed handshake)" :
                           c->curve ? "a protocol error (a replayed or corrupted handshake, or not ZeroMQ)" :
                                      "a protocol error (not ZeroMQ?)";
        log_refusal(c, "a connection to the %s port failed its handshake: %s (ZeroMQ event %#x, %#x)",
                    from == FROM_AGENTS ? "agents'" : "clients'", what, ev.event, (unsigned)ev.value);
    }
}

static void heartbeat(struct controller *c)
{
    int64_t now = now_ns();
    refusal_window(c, now);
    for (uint32_t i = 0; i < c->nnodes; i++) {
        struct node *nd = &c->nodes[i];
        if (!nd->alive)
            continue;
        if (now - nd->last_seen_ns > c->node_timeout_ns) {
            char why[128];
            snprintf(why, sizeof why, "no word from it for %lld ms (--node-timeout-ms %lld)",
                     (long long)((now - nd->last_seen_ns) / 1000000), (long long)(c->node_timeout_ns / 1000000));
            node_lost(c, i, why);
            continue;
        }
        shoal_msg_header h = {.type = SHOAL_MSG_HEARTBEAT, .msg_id = ++c->next_msg_id,
                              .target = SHOAL_WIRE_TARGET_ALL};
        shoal_frame route = {nd->route.id, nd->route.len};
        /* A peer whose connection is gone (ROUTER_MANDATORY: EHOSTUNREACH)
         * died, or reconnected under a new identity, which re-registers:
         * either way the node as we knew it is lost now, not after the
         * timeout meant for nodes that are only silent. */
        if (shoal_wire_send(c->agents, c->key, &route, &h, NULL, 0) == -EHOSTUNREACH)
            node_lost(c, i, "its connection closed (its agent died, or reconnects)");
    }
    c->next_beat_ns = now + c->heartbeat_ns;
}

static void shutdown_agents(struct controller *c)
{
    for (uint32_t i = 0; i < c->nnodes; i++) {
        if (!c->nodes[i].alive)
            continue;
        shoal_msg_header h = {.type = SHOAL_MSG_SHUTDOWN, .msg_id = ++c->next_msg_id,
                              .target = SHOAL_WIRE_TARGET_ALL};
        shoal_frame route = {c->nodes[i].route.id, c->nodes[i].route.len};
        shoal_wire_send(c->agents, c->key, &route, &h, NULL, 0);
    }
}

/* ---- main -------------------------------------------------------------------- */

/*
 * Whether listening on ip stays on this machine: "localhost", Linux's
 * loopback interface "lo" (ZeroMQ binds to interface names), an IPv4
 * address in 127.0.0.0/8, or IPv6's ::1. Anything else reaches beyond it,
 * or may: "*", 0.0.0.0 and :: are every interface, and another host or
 * interface name may stand for any address.
 */
static int loopback_only(const char *ip)
{
    if (!strcmp(ip, "localhost") || !strcmp(ip, "lo"))
        return 1;
    struct in_addr a4;
    if (inet_pton(AF_INET, ip, &a4) == 1)
        return (ntohl(a4.s_addr) >> 24) == 127;
    char v6[64];
    size_t n = strlen(ip);
    if (n >= 2 && n < sizeof v6 + 2 && ip[0] == '[' && ip[n - 1] == ']')
        snprintf(v6, sizeof v6, "%.*s", (int)(n - 2), ip + 1);
    else
        snprintf(v6, sizeof v6, "%s", ip);
    struct in6_addr a6;
    return inet_pton(AF_INET6, v6, &a6) == 1 && IN6_IS_ADDR_LOOPBACK(&a6);
}

static void usage(FILE *f)
{
    fprintf(f, "usage: shoal-controller [--profile NAME] [--ip ADDR] [--heartbeat-ms N] [--node-timeout-ms N]\n"
               "                        [--client-backlog BYTES] [--curve | --no-curve] [--max-skew-ms N]\n"
               "                        [--max-frame BYTES] [--max-payload BYTES] [--max-client-parts N]\n"
               "  Binds on ADDR (default 127.0.0.1) and writes the connection file under\n"
               "  $SHOAL_DIR (default ~/.shoal)/profile_NAME/connection.json (mode 0600).\n"
               "  --client-backlog: bytes of results kept for a client that does not read\n"
               "  (default 1 GiB); --max-frame, --max-payload: the largest frame, and payload,\n"
               "  a message may have (defaults 1 GiB and 256 MiB; see docs/protocol.md);\n"
               "  --max-client-parts: task parts (one per target engine) one client may have\n"
               "  in flight (default 1048576). --node-timeout-ms: how long a node may be silent\n"
               "  before it is declared lost, its tasks failed (default 30000; a node whose\n"
               "  connection closes is lost at the next heartbeat).\n"
               "  --curve, --no-curve: CurveZMQ on both ports (encrypted, only holders of the\n"
               "  connection file admitted); on by default when ADDR is not loopback.\n"
               "  --max-skew-ms: how far from this host's clock a message's stamp may be\n"
               "  (default 300000, and at least what an agent waits for a silent controller;\n"
               "  0: unchecked).\n");
}

/*
 * Sends never wait (SNDTIMEO 0): a message for a peer whose queue is full
 * waits in the controller's queue for it (peer_send), so that one slow
 * peer never stops the others. max_frame also goes to ZeroMQ, which drops
 * a connection that sends a larger frame before holding the frame.
 */
static int bind_router(struct controller *c, int from, void **sock, const char *ip, char *ep, size_t eplen,
                       uint64_t max_frame)
{
    *sock = zmq_socket(c->ctx, ZMQ_ROUTER);
    if (!*sock)
        return -zmq_errno();
    int rc;
    /* Before the bind: no connection is accepted before it is encrypted,
     * asked about (the ZAP handler is bound already) and watched. */
    if (c->curve && (rc = shoal_curve_server(*sock, c->server_secret, from == FROM_AGENTS ?
                                             SHOAL_CURVE_DOMAIN_AGENTS : SHOAL_CURVE_DOMAIN_CLIENTS)) < 0)
        return rc;
    if ((rc = shoal_curve_monitor(c->ctx, *sock, &c->monitors[from])) < 0)
        return rc;
    int zero = 0, one = 1, sndtimeo_ms = 0;
    /* Curve's own bytes are not the sender's: a frame of max_frame bytes
     * passes, encrypted or not. */
    int64_t maxmsg = (int64_t)max_frame + (c->curve ? SHOAL_CURVE_FRAME_OVERHEAD : 0);
    zmq_setsockopt(*sock, ZMQ_LINGER, &zero, sizeof zero);
    zmq_setsockopt(*sock, ZMQ_MAXMSGSIZE, &maxmsg, sizeof maxmsg);
    /* Replies to a peer that has gone fail instead of vanishing silently. */
    zmq_setsockopt(*sock, ZMQ_ROUTER_MANDATORY, &one, sizeof one);
    zmq_setsockopt(*sock, ZMQ_SNDTIMEO, &sndtimeo_ms, sizeof sndtimeo_ms);
    char addr[300];
    snprintf(addr, sizeof addr, "tcp://%s:*", ip);
    if (zmq_bind(*sock, addr) < 0)
        return -zmq_errno();
    size_t len = eplen;
    if (zmq_getsockopt(*sock, ZMQ_LAST_ENDPOINT, ep, &len) < 0)
        return -zmq_errno();
    return 0;
}

int main(int argc, char **argv)
{
    const char *profile = "default", *ip = "127.0.0.1";
    long hb_ms = 1000, node_timeout_ms = 30000;
    int curve = -1; /* -1: by the address */
    uint64_t max_skew_ms = UINT64_MAX; /* UINT64_MAX: the default */
    uint64_t backlog = 1ull << 30, max_frame = 1ull << 30, max_payload = 256ull << 20, parts = MAX_CLIENT_PARTS;
    static const struct option opts[] = {
        {"profile", required_argument, NULL, 'p'}, {"ip", required_argument, NULL, 'i'},
        {"heartbeat-ms", required_argument, NULL, 'b'}, {"client-backlog", required_argument, NULL, 'B'},
        {"max-frame", required_argument, NULL, 'F'}, {"max-payload", required_argument, NULL, 'P'},
        {"max-client-parts", required_argument, NULL, 'T'}, {"node-timeout-ms", required_argument, NULL, 'N'},
        {"curve", no_argument, NULL, 'C'}, {"no-curve", no_argument, NULL, 'c'},
        {"max-skew-ms", required_argument, NULL, 'S'},
        {"help", no_argument, NULL, 'h'}, {NULL, 0, NULL, 0}};
    for (int o; (o = getopt_long(argc, argv, "p:i:b:h", opts, NULL)) != -1;) {
        switch (o) {
        case 'C':
        case 'c':
            if (curve >= 0 && curve != (o == 'C')) {
                fprintf(stderr, "shoal-controller: --curve and --no-curve contradict each other\n");
                return 2;
            }
            curve = o == 'C';
            break;
        case 'S':
            if (shoal_parse_u64(optarg, 86400000, &max_skew_ms) < 0 || (max_skew_ms && max_skew_ms < 1000)) {
                fprintf(stderr, "shoal-controller: --max-skew-ms wants a number of milliseconds (1000 to 86400000, "
                                "or 0 for no check), not '%s'\n", optarg);
                return 2;
            }
            break;
        case 'N': {
            uint64_t v;
            if (shoal_parse_u64(optarg, 3600000, &v) < 0 || v < 100) {
                fprintf(stderr, "shoal-controller: --node-timeout-ms wants a number of milliseconds (100 to "
                                "3600000), not '%s'\n", optarg);
                return 2;
            }
            node_timeout_ms = (long)v;
            break;
        }
        case 'T':
            if (shoal_parse_u64(optarg, 1u << 30, &parts) < 0 || parts < 1) {
                fprintf(stderr, "shoal-controller: --max-client-parts wants a number of task parts (1 to %u), "
                                "not '%s'\n", 1u << 30, optarg);
                return 2;
            }
            break;
        case 'B':
        case 'F':
        case 'P': {
            uint64_t v;
            const char *name = o == 'B' ? "--client-backlog" : o == 'F' ? "--max-frame" : "--max-payload";
            if (shoal_parse_u64(optarg, shoal_wire_default_limits.max_frame, &v) < 0 || v < 4096) {
                fprintf(stderr, "shoal-controller: %s wants a number of bytes (4096 to %" PRIu64 "), not '%s'\n",
                        name, shoal_wire_default_limits.max_frame, optarg);
                return 2;
            }
            *(o == 'B' ? &backlog : o == 'F' ? &max_frame : &max_payload) = v;
            break;
        }
        case 'p':
            profile = optarg;
            break;
        case 'i':
            ip = optarg;
            break;
        case 'b': {
            uint64_t v;
            if (shoal_parse_u64(optarg, 600000, &v) < 0) {
                fprintf(stderr, "shoal-controller: --heartbeat-ms wants a number of milliseconds (10 to 600000), "
                                "not '%s'\n", optarg);
                return 2;
            }
            hb_ms = (long)v;
            break;
        }
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (node_timeout_ms < 2 * hb_ms) {
        fprintf(stderr, "shoal-controller: --node-timeout-ms (%ld) must be at least two heartbeats (%ld ms)\n",
                node_timeout_ms, 2 * hb_ms);
        return 2;
    }
    if (hb_ms < 10 || hb_ms > 600000 || strchr(profile, '/') || !*profile) {
        usage(stderr);
        return 2;
    }
    /* A message an agent signed may reach us this late without anything
     * being wrong: it waits that long for a controller that is paused
     * before it gives up (docs/agent.md). A window shorter than that would
     * refuse its results after a pause the node survives. */
    uint64_t agent_patience_ms = (uint64_t)node_timeout_ms + 2 * (uint64_t)hb_ms + 2000;
    if (max_skew_ms == UINT64_MAX) {
        max_skew_ms = agent_patience_ms > 300000 ? agent_patience_ms : 300000;
    } else if (max_skew_ms && max_skew_ms < agent_patience_ms) {
        fprintf(stderr, "shoal-controller: --max-skew-ms (%" PRIu64 ") must be at least %" PRIu64 " ms, what an "
                "agent waits for a silent controller (--node-timeout-ms + two heartbeats + 2 s): its messages "
                "may be that old when they arrive\n", max_skew_ms, agent_patience_ms);
        return 2;
    }
    int local = loopback_only(ip);
    if (curve < 0)
        curve = !local;
    if (curve && !shoal_curve_available()) {
        fprintf(stderr, "shoal-controller: this libzmq was built without CURVE: %s\n",
                local ? "--curve cannot be had" : "run with --no-curve on a network you trust, or build libzmq "
                                                   "with libsodium");
        return 2;
    }

    static struct controller c;
    c.heartbeat_ns = hb_ms * 1000000;
    c.node_timeout_ns = node_timeout_ms * 1000000;
    c.client_backlog_max = backlog;
    c.max_client_parts = parts;
    c.client_limits = (shoal_wire_limits){.max_frame = max_frame, .max_body = shoal_wire_default_limits.max_body,
                                          .max_payload = max_payload};
    c.client_limits.max_skew_ns = max_skew_ms * 1000000;
    c.agent_limits = c.client_limits;
    c.max_skew_ms = max_skew_ms;
    c.curve = curve;
    if (!curve && !local)
        logf_("warning: --no-curve: listening on %s, beyond loopback, in plaintext: anyone on the network can read "
              "every message and buffer, and replay what it recorded within --max-skew-ms; use it only on a "
              "network you trust", ip);
    if (!max_skew_ms)
        logf_("warning: --max-skew-ms 0: stamps are not checked: a recorded message replayed%s runs again",
              curve ? " on a plaintext connection (refused here: Curve is on)" : "");
    c.engines = calloc(MAX_ENGINES, sizeof *c.engines);
    if (!c.engines || shoal_wire_keygen(c.key) < 0) {
        logf_("cannot initialise");
        return 1;
    }

    char dir[PATH_MAX];
    if (shoal_root_dir(dir, sizeof dir) < 0 || mkdir_private(dir) < 0) {
        logf_("cannot create %s: %s", dir, strerror(errno));
        return 1;
    }
    if (shoal_profile_dir(profile, dir, sizeof dir) < 0) {
        logf_("the profile directory's path is too long");
        return 1;
    }
    if (mkdir_private(dir) < 0) {
        logf_("cannot create %s: %s", dir, strerror(errno));
        return 1;
    }
    int len = snprintf(c.conn_path, sizeof c.conn_path, "%s/connection.json", dir);
    if (len < 0 || (size_t)len >= sizeof c.conn_path) {
        logf_("the profile directory's path is too long: %s", dir);
        return 1;
    }
    int other = running_pid(c.conn_path);
    if (other) {
        logf_("a controller for profile '%s' is already running (pid %d); stop it first", profile, other);
        return 1;
    }

    /* Signals arrive through a signalfd in the poll loop, not in a handler. */
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGTERM);
    sigprocmask(SIG_BLOCK, &sigs, NULL);
    int sfd = signalfd(-1, &sigs, SFD_CLOEXEC | SFD_NONBLOCK);

    c.ctx = zmq_ctx_new();
    int rc = 0;
    /* Fresh keys at each start: the server's secret half stays here; the
     * connection file carries the rest. The ZAP handler comes before the
     * sockets: a connection accepted while none is bound is not asked about. */
    if (curve && ((rc = shoal_curve_keypair(c.server_public, c.server_secret)) < 0 ||
                  (rc = shoal_curve_keypair(c.member_public, c.member_secret)) < 0 ||
                  (rc = shoal_curve_zap_bind(c.ctx, &c.zap)) < 0)) {
        logf_("cannot set up Curve: %s", strerror(-rc));
        return 1;
    }
    rc = bind_router(&c, FROM_CLIENTS, &c.clients, ip, c.client_ep, sizeof c.client_ep, max_frame);
    if (rc == 0)
        rc = bind_router(&c, FROM_AGENTS, &c.agents, ip, c.agent_ep, sizeof c.agent_ep, max_frame);
    if (rc < 0) {
        logf_("cannot bind on %s: %s", ip, zmq_strerror(-rc));
        return 1;
    }
    if ((rc = write_connection_file(&c, ip)) < 0) {
        logf_("cannot write %s: %s", c.conn_path, strerror(-rc));
        return 1;
    }
    logf_("listening: clients %s, agents %s (%s); connection file %s", c.client_ep, c.agent_ep,
          curve ? "CurveZMQ" : "plaintext", c.conn_path);

    c.next_beat_ns = now_ns() + c.heartbeat_ns;
    while (!c.stopping) {
        /* The ZAP handler last: without Curve, none (poll is given 5 items). */
        zmq_pollitem_t items[6] = {{c.clients, 0, ZMQ_POLLIN, 0},     {c.agents, 0, ZMQ_POLLIN, 0},
                                   {NULL, sfd, ZMQ_POLLIN, 0},        {c.monitors[0], 0, ZMQ_POLLIN, 0},
                                   {c.monitors[1], 0, ZMQ_POLLIN, 0}, {c.zap, 0, ZMQ_POLLIN, 0}};
        int64_t next = c.nqueued && c.next_flush_ns < c.next_beat_ns ? c.next_flush_ns : c.next_beat_ns;
        int64_t wait = (next - now_ns() + 999999) / 1000000;
        if (wait < 0)
            wait = 0;
        int n = zmq_poll(items, c.zap ? 6 : 5, (long)wait);
        if (n < 0 && zmq_errno() != EINTR) {
            logf_("poll failed: %s", zmq_strerror(zmq_errno()));
            break;
        }
        if (n > 0 && (items[2].revents & ZMQ_POLLIN)) {
            struct signalfd_siginfo si;
            if (read(sfd, &si, sizeof si) == (ssize_t)sizeof si)
                logf_("stopping on signal %u", si.ssi_signo);
            break;
        }
        /* Handshakes first: a peer's connection waits for them. */
        if (c.zap && n > 0 && (items[5].revents & ZMQ_POLLIN))
            serve_zap(&c);
        for (int i = 0; i < 2; i++)
            if (n > 0 && (items[3 + i].revents & ZMQ_POLLIN))
                read_handshakes(&c, i);
        if (n > 0 && (items[0].revents & ZMQ_POLLIN))
            drain_socket(&c, c.clients, 0);
        if (n > 0 && (items[1].revents & ZMQ_POLLIN))
            drain_socket(&c, c.agents, 1);
        if (c.nqueued && now_ns() >= c.next_flush_ns)
            flush_queues(&c);
        if (now_ns() >= c.next_beat_ns)
            heartbeat(&c);
    }
    /* Give the SHUTDOWN messages a second to leave before closing. */
    int linger = 1000;
    zmq_setsockopt(c.agents, ZMQ_LINGER, &linger, sizeof linger);
    shutdown_agents(&c);
    unlink(c.conn_path);
    for (uint32_t b = 0; b < CLIENT_BUCKETS; b++)
        while (c.clients_by_route[b]) {
            struct client *cl = c.clients_by_route[b];
            c.clients_by_route[b] = cl->next;
            outq_clear(&cl->q);
            free(cl->lost);
            free(cl);
        }
    for (uint32_t i = 0; i < c.nnodes; i++)
        outq_clear(&c.nodes[i].q);
    for (uint32_t b = 0; b < TASK_BUCKETS; b++)
        while (c.tasks[b])
            task_free(&c, &c.tasks[b]);
    for (int i = 0; i < 2; i++)
        if (c.monitors[i]) {
            zmq_socket_monitor(i == FROM_AGENTS ? c.agents : c.clients, NULL, 0); /* before its reader goes: see bridge/curve.c */
            zmq_close(c.monitors[i]);
        }
    zmq_close(c.clients);
    zmq_close(c.agents);
    if (c.zap)
        zmq_close(c.zap);
    zmq_ctx_term(c.ctx);
    explicit_bzero(c.server_secret, sizeof c.server_secret);
    explicit_bzero(c.member_secret, sizeof c.member_secret);
    free(c.engines);
    logf_("stopped");
    return 0;
}
