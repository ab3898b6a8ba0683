/*
 * node_agent/agent.c - shoal-agent: the one process per node.
 *
 * It creates the node's arena, registers the node with the controller named
 * by the profile's connection file, answers its heartbeats (and exits when
 * they stop: a cluster whose controller died leaves nothing behind), and
 * serves its Unix socket, where processes of the same user get the arena's
 * fd after an SO_PEERCRED check. It spawns the node's engines and watches
 * them through pidfds; each engine gets a submission and a completion ring
 * in the arena. A task for several engines here is written into the arena
 * once, and each target's ring gets a 64-byte descriptor of it. When a
 * process dies, what it held in the arena is released; when an engine dies,
 * its unfinished tasks fail with an EngineError naming it. Everything waits
 * in one event loop (loop.c). Its connection to the controller speaks
 * CurveZMQ when the connection file carries Curve keys.
 */
#define _GNU_SOURCE
#include <shoal/arena.h>
#include <shoal/curve.h>
#include <shoal/util.h>
#include <shoal/zwire.h>

#include "bulk.h"
#include "loop.h"
#include "parse.h"

#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <poll.h>
#include <pwd.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <shoal/ring.h>
#include <spawn.h>
#include <sys/eventfd.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

/* Connections to our socket open at once, and processes behind them. */
#define MAX_PEERS 4096
#define MAX_PROCS 4096
#define MAX_LOCAL_ENGINES 1024
#define NSLOTS 1024

/* Ring slot kinds and layout: docs/engine.md (and shoal/_engine.py). */
enum { KIND_TASK = 1, KIND_SHUTDOWN = 2, KIND_RESULT = 3, KIND_RELEASE = 4, KIND_OUTPUT = 5, KIND_LANE = 6 };
/* The flags word of a message block (its bytes 12-15): the sender aborted the task. */
#define MSG_ABORTED 1u
struct slot {
    uint64_t task_id;
    uint32_t kind;
    uint32_t flags;
    uint64_t offset, length, generation;
    uint32_t sender;
    uint8_t pad[20];
};
_Static_assert(sizeof(struct slot) == SHOAL_RING_SLOT, "a slot is 64 bytes");

/*
 * A connection to our socket. It lives as long as the connection: its slot,
 * its lanes and its doorbell go when it closes.
 */
struct peer {
    int fd;
    pid_t pid;          /* its process (a struct proc) */
    uint64_t serial;    /* names the connection in its lanes */
    shoal_handle bell;  /* the doorbell its lanes ring (generation 0: none yet) */
    char line[512]; /* what it said so far */
    size_t linelen;
};

/*
 * A process that connected: one per process, however many connections it
 * opened. Its pidfd tells us when it dies, and then we release what it
 * still held in the arena (references are per process, not per
 * connection). We keep it while the process has a connection open or a
 * holder record in the arena; a process with neither holds nothing that
 * its death could leak.
 */
struct proc {
    pid_t pid;
    int pidfd;
    int conns; /* its connections open */
};

/* A message block shared by the engines that run one task. */
struct msgblk {
    shoal_handle h;
    int users; /* engines that have yet to answer */
};

/*
 * Who sent a task, and so where its replies go: the controller (task 0;
 * token: the client's bulk token from the TASK's info frame, where a large
 * reply may go, 0: none), or a client straight on its bulk connection
 * (docs/machines.md, "Direct tasks"; task: the client's id for it, token:
 * that connection's).
 */
struct origin {
    uint64_t token, task;
};
/* The task ids we give direct tasks: apart from the controller's. */
#define DIRECT_TASK (1ull << 63)

struct outstanding {
    uint64_t task_id;
    int blk;
    struct origin o;
};

/*
 * A lane: a client's direct path to one engine (docs/engine.md, "Lanes"):
 * one arena block with a header and two rings, tasks in and completions
 * out, which the client and the engine use without us. We keep views of the
 * rings to close them when either side goes.
 */
#define LANE_MAGIC 0x454E414Cu /* "LANE" */
#define LANE_HDR 128u
#define LANE_NSLOTS 1024u
struct lane_header {
    uint32_t magic, version;
    int32_t engine_id;
    uint32_t nslots;
    uint64_t client_bell[3]; /* block of the client's doorbell (at its start) */
    uint64_t engine_bell[3]; /* block of the engine's rings (its doorbell at SHOAL_RING_BELL_OFFSET) */
    int32_t engine_pid;
    uint32_t closed; /* why we closed it: LANE_OPEN until then */
    uint8_t pad[LANE_HDR - 72];
};
enum { LANE_OPEN = 0, LANE_ENGINE_DIED = 1, LANE_ENGINE_STOPPED = 2, LANE_CLIENT_GONE = 3 };
_Static_assert(sizeof(struct lane_header) == LANE_HDR, "docs/engine.md");

struct lane {
    shoal_handle h;
    uint64_t peer; /* the client connection's serial */
    int engine;    /* local index */
    shoal_ring sq, cq;
};

/*
 * A dead engine's lane, kept while its client has yet to take the replies
 * the engine left in it: the agent holds a reference to each such reply's
 * block (the engine's went with it), and lets go of one when the client's
 * RELEASE for it comes on the lane, or of all when the client goes. Before,
 * the replies' blocks were freed with the engine's references, and a reply
 * finished just before a SIGKILL failed as "could not be read" (found by
 * `shoal bench soak`).
 */
struct kept_reply {
    shoal_handle reply;  /* the reply's message block */
    shoal_handle *bufs;  /* the arena blocks of its large buffers (meta "buffers") */
    size_t nbufs;
};

struct kept_lane {
    shoal_handle h; /* the lane's block: our reference */
    uint64_t peer;
    shoal_ring sq;
    struct kept_reply *held;
    size_t nheld;
};

/*
 * The bulk path (docs/machines.md, "The bulk path"): a transfer that
 * arrived (or failed) before its TASK waits in arrivals; a TASK whose
 * transfer has not arrived waits in parked. Either is given up after
 * bulk_wait_ms: an arrival's block is released, a parked task's targets
 * fail with an error that says why. Tasks run in the order they came: a
 * TASK for an engine that a parked task is for waits in parked behind it
 * (ready, its block with it), even one that needs no transfer.
 */
struct arrival {
    shoal_bulk_arrival a;
    int64_t at_ns;
};

struct parked {
    uint64_t task_id, xfer_id; /* xfer_id 0: its block came with its TASK */
    struct origin o;
    uint32_t *targets;
    uint32_t nt;
    int64_t at_ns;
    int ready;      /* its block is here (h, or status says why there is none) */
    int status;     /* 0, or there is no block: its transfer failed (why), or no arena room for one that came whole */
    int aborted;    /* its sender (the controller, or a direct task's client) aborted it while it waited */
    shoal_handle h; /* its message block, our reference, once ready and status == 0 */
    char why[sizeof(((shoal_bulk_arrival *)0)->why)];
};

struct agent;

struct engine {
    struct agent *agent; /* the one this engine belongs to */
    int index;
    pid_t pid;
    int pidfd;
    int alive, ready;
    int32_t id;           /* global engine id, once the controller gave it */
    uint64_t reg_msg;     /* our ENGINE_EVENT that asked for it */
    int conn;             /* its connection to our socket */
    shoal_handle rings;   /* SQ then CQ, in one arena block */
    shoal_ring sq, cq;
    int doorbell;         /* eventfd: the engine wakes us through it */
    struct outstanding *out;
    size_t nout, capout;
    struct slot *backlog; /* slots waiting for room in the task ring, in order */
    size_t nbacklog, capbacklog;
    int64_t started_ns;  /* when it was spawned */
    int quick_deaths;    /* deaths soon after a start, in a row */
};

struct agent {
    shoal_loop *loop;
    shoal_arena *arena;
    void *ctx, *ctl;
    void *ctl_monitor; /* the handshakes of ctl: a refused key ends the agent */
    int ctl_fd;
    struct ctlmsg *ctlq, **ctlq_tail; /* messages waiting for room (ctl_send) */
    uint64_t ctlq_bytes, ctlq_max;
    uint8_t key[SHOAL_WIRE_KEY];
    char sock_path[sizeof(((struct sockaddr_un *)0)->sun_path)];
    /* Who this agent is, for the controller and for the processes that
     * reach its socket: 32 random hex digits made at start. The hostname
     * does not tell hosts apart (two containers may share one, and a
     * client must not take another host's agent for its own at the same
     * socket path); neither do the machine and boot ids, which namespaces
     * and containers on one kernel share. */
    char agent_id[33];
    int listen_fd, sig_fd;
    int node;
    int64_t heartbeat_ms;
    int64_t node_timeout_ms; /* the controller's: silence after which either side gives the other up */
    int64_t last_ctl_ns;
    int64_t last_probe_ns;   /* when we last asked a silent controller (HEARTBEAT) */
    int64_t last_register_ns;
    uint64_t register_msg; /* our latest REGISTER */
    struct peer peers[MAX_PEERS];
    int npeers;
    struct proc procs[MAX_PROCS];
    int nprocs;
    int spare_fd; /* /dev/null, given up to accept and refuse a connection when out of fds */
    uint64_t next_msg_id;
    int exit_code;
    char engine_bin[PATH_MAX];
    struct engine engines[MAX_LOCAL_ENGINES];
    int nengines;
    struct msgblk *blks;
    int nblks, capblks;
    struct lane *lanes;
    int nlanes, caplanes;
    struct kept_lane *kept;
    int nkept, capkept;
    uint64_t next_serial;
    uint64_t backlog_timer; /* armed while any engine has a backlog */
    shoal_bulk *bulk; /* the bulk server (NULL: none; tasks then come whole through the controller) */
    struct arrival *arrivals;
    size_t narrivals, caparrivals;
    struct parked *parked;
    size_t nparked, capparked;
    int64_t bulk_wait_ms;
    uint64_t bulk_threshold; /* reply bytes from which a result goes on the client's bulk connection */
    uint64_t next_xfer;      /* the last result transfer's id (made unique per agent start) */
    uint64_t next_direct;    /* the last direct task's id (with DIRECT_TASK) */
    int restart;  /* start a new engine in place of one that dies */
    int stopping;
    int running;  /* the main loop goes on while set */
};

static void engine_registered(struct agent *a, uint64_t reply_to, int32_t id);
static void route_task(struct agent *a, shoal_wire_msg *m);
static void abort_task(struct agent *a, uint64_t task_id);
static void signal_engines(struct agent *a, shoal_wire_msg *m);

static char log_name[32] = "shoal-agent"; /* then "shoal-agent <pid>" */
#define now_ns shoal_now_ns
#define logf_(...) shoal_log(log_name, __VA_ARGS__)

/* ---- the connection file ----------------------------------------------------- */

/*
 * Reads the controller's address, the cluster key and, if the file has
 * them ("curve": {"server_key", "public_key", "secret_key"}; null or absent
 * for a plaintext cluster), the Curve keys from the connection file.
 * Returns 0 with *curve set to 1 (keys in *member) or 0, -errno if the file
 * cannot be read, -EPROTO for a file without a usable address or key, or
 * -EINVAL for bad Curve keys; why[len] says what is wrong (naming the field).
 */
static int read_connection(const char *path, char *endpoint, size_t eplen, uint8_t key[SHOAL_WIRE_KEY],
                           int *curve, shoal_curve_member *member, char *why, size_t len)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        int e = errno;
        snprintf(why, len, "%s", strerror(e));
        return -e;
    }
    char buf[8192];
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    cJSON *j = cJSON_Parse(buf);
    cJSON *ep = cJSON_GetObjectItemCaseSensitive(j, "agent");
    cJSON *k = cJSON_GetObjectItemCaseSensitive(j, "key");
    cJSON *cv = cJSON_GetObjectItemCaseSensitive(j, "curve");
    int rc = -EPROTO;
    snprintf(why, len, "no \"agent\" address and \"key\" of 64 hex digits in it");
    if (cJSON_IsString(ep) && cJSON_IsString(k) && strlen(k->valuestring) == 2 * SHOAL_WIRE_KEY &&
        strlen(ep->valuestring) < eplen) {
        rc = 0;
        for (unsigned i = 0; i < SHOAL_WIRE_KEY && rc == 0; i++) {
            unsigned v;
            if (sscanf(k->valuestring + 2 * i, "%2x", &v) != 1)
                rc = -EPROTO;
            key[i] = (uint8_t)v;
        }
        strcpy(endpoint, ep->valuestring);
    }
    *curve = 0;
    if (rc == 0 && cv && !cJSON_IsNull(cv)) {
        if (!cJSON_IsObject(cv)) {
            rc = -EINVAL;
            snprintf(why, len, "\"curve\" is neither null nor an object of three keys");
        } else {
            const char *names[3] = {"server_key", "public_key", "secret_key"}, *text[3], *field = "";
            for (int i = 0; i < 3; i++) {
                cJSON *v = cJSON_GetObjectItemCaseSensitive(cv, names[i]);
                text[i] = cJSON_IsString(v) ? v->valuestring : NULL;
            }
            rc = shoal_curve_member_parse(text[0], text[1], text[2], member, &field);
            if (rc < 0) {
                snprintf(why, len, "curve.%s %s", field, shoal_curve_strerror(rc));
                rc = -EINVAL;
            }
            *curve = rc == 0;
        }
    }
    cJSON_Delete(j);
    explicit_bzero(buf, sizeof buf);
    return rc;
}

/* ---- the controller connection --------------------------------------------------- */

/*
 * Messages for the controller wait here while its ZeroMQ queue is full (a
 * paused or busy controller): sends never block the agent, whose loop also
 * serves the lanes, and a result is never dropped because the controller
 * was slow to read. The frames are copied (a result's live in an arena
 * block that is released at once). Past ctlq_max bytes (CTL_BACKLOG_BYTES;
 * $SHOAL_AGENT_CTL_BACKLOG for tests) a result is replaced by an error that
 * says so (ctl_send), anything else dropped with a log line.
 */
struct ctlmsg {
    struct ctlmsg *next;
    shoal_msg_header h;
    uint8_t hdr[SHOAL_WIRE_HDR]; /* signed once, when queued: a retry does not hash it again */
    uint64_t bytes;
    size_t n;
    zmq_msg_t frames[];
};

#define CTL_BACKLOG_BYTES (1ull << 30)

static void ctlmsg_free(struct ctlmsg *m)
{
    for (size_t i = 0; i < m->n; i++)
        zmq_msg_close(&m->frames[i]);
    free(m);
}

/* Sends what waits, in order, while the controller's queue has room. */
static void ctl_flush(struct agent *a)
{
    while (a->ctlq) {
        struct ctlmsg *m = a->ctlq;
        int rc = shoal_wire_send_signed(a->ctl, NULL, m->hdr, NULL, 0, m->frames, m->n);
        if (rc == -EAGAIN)
            return;
        if (rc < 0)
            logf_("a message of type %u for the controller is lost: %s", (unsigned)m->h.type, zmq_strerror(-rc));
        a->ctlq = m->next;
        if (!a->ctlq)
            a->ctlq_tail = &a->ctlq;
        a->ctlq_bytes -= m->bytes;
        ctlmsg_free(m);
    }
}

/* Queues a message for the controller behind what waits (its frames copied). */
static int ctl_queue(struct agent *a, const shoal_msg_header *h, const shoal_frame *f, size_t n, uint64_t bytes)
{
    struct ctlmsg *m = malloc(sizeof *m + n * sizeof m->frames[0]);
    if (!m)
        return -ENOMEM;
    m->next = NULL;
    m->h = *h;
    m->bytes = bytes;
    for (m->n = 0; m->n < n; m->n++) {
        if (zmq_msg_init_size(&m->frames[m->n], f[m->n].len) < 0) {
            ctlmsg_free(m);
            return -ENOMEM;
        }
        if (f[m->n].len)
            memcpy(zmq_msg_data(&m->frames[m->n]), f[m->n].data, f[m->n].len);
    }
    int rc = shoal_wire_sign(a->key, h, NULL, 0, m->frames, m->n, m->hdr);
    if (rc < 0) {
        ctlmsg_free(m);
        return rc;
    }
    *a->ctlq_tail = m;
    a->ctlq_tail = &m->next;
    a->ctlq_bytes += bytes;
    return 0;
}

/* Sends a message to the controller, or queues it behind what waits.
 * Past ctlq_max bytes waiting, a result is replaced by an EngineError
 * of a few hundred bytes that says why (its client must not wait for it
 * for ever), and anything else is dropped with a log line. Returns 0 (sent
 * or queued) or a negative errno (-ENOBUFS: dropped; -ENOMEM). */
static int ctl_send(struct agent *a, const shoal_msg_header *h, const shoal_frame *f, size_t n)
{
    if (!a->ctlq) {
        int rc = shoal_wire_send(a->ctl, a->key, NULL, h, f, n);
        if (rc != -EAGAIN)
            return rc;
    }
    uint64_t bytes = 0;
    for (size_t i = 0; i < n; i++)
        bytes += f[i].len;
    if (a->ctlq_bytes + bytes <= a->ctlq_max)
        return ctl_queue(a, h, f, n, bytes);
    logf_("a message of type %u (task %llu, %llu bytes) for the controller is dropped: %llu MiB wait for it "
          "already%s",
          (unsigned)h->type, (unsigned long long)h->task_id, (unsigned long long)bytes,
          (unsigned long long)(a->ctlq_bytes >> 20), h->type == SHOAL_MSG_RESULT ? "; its task fails" : "");
    if (h->type != SHOAL_MSG_RESULT)
        return -ENOBUFS;
    char evalue[256], meta[SHOAL_WIRE_ENGINE_ERROR_MAX];
    snprintf(evalue, sizeof evalue,
             "engine %u's result (%llu bytes) was dropped by its node's agent: %llu MiB were already waiting for "
             "the controller (task %llu)",
             h->sender, (unsigned long long)bytes, (unsigned long long)(a->ctlq_bytes >> 20),
             (unsigned long long)h->task_id);
    int k = shoal_wire_engine_error_meta(h->sender, evalue, meta, sizeof meta);
    if (k < 0)
        return -ENOBUFS;
    shoal_frame ef[2] = {{meta, (size_t)k}, {"", 0}};
    shoal_msg_header eh = *h;
    eh.n_payload = 2;
    eh.n_buffers = 0;
    return ctl_queue(a, &eh, ef, 2, (uint64_t)k);
}

static int send_json(struct agent *a, uint16_t type, uint64_t reply_to, cJSON *body)
{
    char *text = body ? cJSON_PrintUnformatted(body) : NULL;
    shoal_frame f = {text, text ? strlen(text) : 0};
    shoal_msg_header h = {.type = type, .n_payload = text ? 1 : 0, .msg_id = ++a->next_msg_id,
                          .reply_to = reply_to, .sender = a->node < 0 ? 0 : (uint32_t)a->node,
                          .target = SHOAL_WIRE_TARGET_ALL};
    int rc = ctl_send(a, &h, text ? &f : NULL, text ? 1 : 0);
    free(text);
    return rc;
}

/*
 * Registers the node with the controller: at the start, and again when the
 * controller has declared it lost (a pause longer than its node timeout, or
 * a new connection) - then with the engines it runs, which keep their ids
 * and namespaces.
 */
static void send_register(struct agent *a)
{
    char host[64] = "";
    gethostname(host, sizeof host - 1);
    cJSON *reg = cJSON_CreateObject();
    cJSON_AddStringToObject(reg, "host", host);
    cJSON_AddStringToObject(reg, "agent_id", a->agent_id);
    cJSON_AddNumberToObject(reg, "pid", getpid());
    cJSON_AddStringToObject(reg, "socket", a->sock_path);
    cJSON_AddStringToObject(reg, "loop", shoal_loop_backend(a->loop));
    if (a->bulk)
        cJSON_AddStringToObject(reg, "bulk", shoal__bulk_endpoint(a->bulk));
    cJSON *engines = cJSON_AddArrayToObject(reg, "engines");
    for (int i = 0; i < a->nengines; i++) {
        const struct engine *e = &a->engines[i];
        if (!e->alive || e->id < 0)
            continue;
        cJSON *j = cJSON_CreateObject();
        cJSON_AddNumberToObject(j, "id", e->id);
        cJSON_AddNumberToObject(j, "local", i);
        cJSON_AddNumberToObject(j, "pid", e->pid);
        cJSON_AddItemToArray(engines, j);
    }
    send_json(a, SHOAL_MSG_REGISTER, 0, reg);
    a->register_msg = a->next_msg_id;
    cJSON_Delete(reg);
}

static void send_started(struct agent *a, int i);

static void on_controller_msg(struct agent *a, shoal_wire_msg *m)
{
    a->last_ctl_ns = now_ns();
    switch (m->hdr.type) {
    case SHOAL_MSG_HEARTBEAT:
        send_json(a, SHOAL_MSG_HEARTBEAT_ACK, m->hdr.msg_id, NULL);
        break;
    case SHOAL_MSG_SHUTDOWN:
        logf_("shutdown asked by the controller");
        a->running = 0;
        break;
    case SHOAL_MSG_REGISTER_REPLY:
        if (m->hdr.n_payload >= 1) {
            shoal_frame f = shoal_wire_frame(m, 0);
            cJSON *j = cJSON_ParseWithLength(f.data, f.len);
            cJSON *node = cJSON_GetObjectItemCaseSensitive(j, "node");
            cJSON *hb = cJSON_GetObjectItemCaseSensitive(j, "heartbeat_ms");
            cJSON *nt = cJSON_GetObjectItemCaseSensitive(j, "node_timeout_ms");
            if (cJSON_IsNumber(nt) && nt->valueint > 0)
                a->node_timeout_ms = nt->valueint;
            cJSON *eng = cJSON_GetObjectItemCaseSensitive(j, "engine");
            if (cJSON_IsNumber(node)) {
                a->node = node->valueint;
                logf_("registered as node %d", a->node);
            }
            if (cJSON_IsNumber(hb) && hb->valueint > 0)
                a->heartbeat_ms = hb->valueint;
            if (cJSON_IsNumber(eng))
                engine_registered(a, m->hdr.reply_to, eng->valueint);
            /* Engines that became ready while the node was lost asked for
             * their ids before this REGISTER, and were refused: again now. */
            if (m->hdr.reply_to == a->register_msg && !cJSON_IsNumber(eng))
                for (int i = 0; i < a->nengines; i++) {
                    const struct engine *e = &a->engines[i];
                    if (e->alive && e->ready && e->id < 0 && e->reg_msg && e->reg_msg < a->register_msg)
                        send_started(a, i);
                }
            cJSON_Delete(j);
        }
        break;
    case SHOAL_MSG_TASK:
        route_task(a, m);
        break;
    case SHOAL_MSG_ABORT:
        abort_task(a, m->hdr.task_id);
        break;
    case SHOAL_MSG_SIGNAL:
        signal_engines(a, m);
        break;
    case SHOAL_MSG_ERROR:
        if (m->hdr.n_payload >= 1) {
            shoal_frame f = shoal_wire_frame(m, 0);
            cJSON *j = cJSON_ParseWithLength(f.data, f.len);
            if (cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(j, "register_again"))) {
                /* Once per round of them: it answers each late message so. */
                if (now_ns() - a->last_register_ns > 1000000000ll) {
                    logf_("the controller declared this node lost: registering again, with its engines");
                    a->last_register_ns = now_ns();
                    send_register(a);
                }
            } else if (m->hdr.reply_to && m->hdr.reply_to == a->register_msg && a->node < 0) {
                /* Refused, not lost (a stamp outside the controller's window,
                 * too many nodes): waiting would leave the engines of a node
                 * that never serves. */
                logf_("the controller refused to register this node: %.*s", (int)f.len, (const char *)f.data);
                a->exit_code = 1;
                a->running = 0;
            } else {
                logf_("the controller says: %.*s", (int)f.len, (const char *)f.data);
            }
            cJSON_Delete(j);
        }
        break;
    case SHOAL_MSG_HEARTBEAT_ACK:
        break; /* the answer to a HEARTBEAT we asked while it was silent: it lives (last heard above) */
    default:
        logf_("ignoring a message of type %u from the controller", (unsigned)m->hdr.type);
    }
}

/* The ZeroMQ fd is edge-triggered: drain until ZMQ_EVENTS shows no input. */
static void on_ctl_fd(shoal_loop *l, int fd, uint32_t events, void *arg)
{
    (void)l;
    (void)fd;
    (void)events;
    struct agent *a = arg;
    for (;;) {
        int zev = 0;
        size_t len = sizeof zev;
        if (zmq_getsockopt(a->ctl, ZMQ_EVENTS, &zev, &len) < 0 || !(zev & ZMQ_POLLIN))
            return;
        shoal_wire_msg m;
        int rc = shoal_wire_recv(a->ctl, a->key, false, NULL, ZMQ_DONTWAIT, &m, NULL);
        if (rc == 0)
            on_controller_msg(a, &m);
        else if (rc != -EAGAIN)
            logf_("refused a message from the controller: %s", shoal_wire_strerror(rc));
        shoal_wire_msg_close(&m);
    }
}

static void poll_kept_lanes(struct agent *a);
static void expire_bulk(struct agent *a, int all);

static void on_heartbeat_check(shoal_loop *l, uint64_t id, void *arg)
{
    (void)l;
    (void)id;
    struct agent *a = arg;
    /* What waits first: after a pause (SIGSTOP, a swap storm) the
     * controller's heartbeats are there to be read, and the silence is ours. */
    on_ctl_fd(l, a->ctl_fd, POLLIN, a);
    if (a->nkept)
        poll_kept_lanes(a);
    if (a->nparked || a->narrivals)
        expire_bulk(a, 0);
    /* A controller that refuses our keys (or speaks Curve when we do not)
     * would otherwise look like one that is silent: say why, and stop,
     * rather than retrying for ever. */
    shoal_curve_event ev;
    char why[512];
    while (shoal_curve_monitor_read(a->ctl_monitor, &ev) == 1)
        if (shoal_curve_event_fatal(&ev, why, sizeof why)) {
            logf_("cannot connect to the controller: %s; stopping", why);
            a->exit_code = 1;
            a->running = 0;
            return;
        }
    int64_t now = now_ns(), silent_ms = (now - a->last_ctl_ns) / 1000000;
    if (silent_ms > a->node_timeout_ms + 2 * a->heartbeat_ms + 2000) {
        logf_("no word from the controller for %lld ms, asked or not (its node timeout is %lld ms): it is gone; "
              "stopping", (long long)silent_ms, (long long)a->node_timeout_ms);
        a->exit_code = 3;
        a->running = 0;
    } else if (silent_ms > 2 * a->heartbeat_ms && now - a->last_probe_ns > 1000000000ll) {
        /* Silent for two heartbeats: ask. A controller that declared us
         * lost answers that we should register again. */
        a->last_probe_ns = now;
        send_json(a, SHOAL_MSG_HEARTBEAT, 0, NULL);
    }
}

/* ---- the Unix socket: local processes get the arena ------------------------------ */

/* Sends one line of text on a Unix connection with file descriptor
 * `passfd` attached (SCM_RIGHTS). Returns 0, -EPIPE or -ECONNRESET (the
 * peer closed first), or -EIO. */
static int send_line_with_fd(int fd, const char *text, size_t len, int passfd)
{
    struct iovec iov = {(void *)text, len};
    union {
        struct cmsghdr h;
        char buf[CMSG_SPACE(sizeof(int))];
    } u;
    memset(&u, 0, sizeof u);
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf, .msg_controllen = sizeof u.buf};
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &passfd, sizeof passfd);
    ssize_t sent;
    do {
        sent = sendmsg(fd, &msg, MSG_NOSIGNAL);
    } while (sent < 0 && errno == EINTR);
    if (sent < 0 && (errno == EPIPE || errno == ECONNRESET))
        return -errno;
    return sent == (ssize_t)len ? 0 : -EIO;
}

/* Sends the greeting and the arena's fd. */
static int send_arena(struct agent *a, int fd)
{
    char text[256];
    shoal_arena_stats st;
    shoal_arena_get_stats(a->arena, &st);
    int n = snprintf(text, sizeof text, "{\"node\": %d, \"agent_id\": \"%s\", \"heap_size\": %llu, \"version\": 1}\n",
                     a->node, a->agent_id, (unsigned long long)st.heap_size);
    return send_line_with_fd(fd, text, (size_t)n, shoal_arena_fd(a->arena));
}

static void close_peer_lanes(struct agent *a, struct peer *p);
static void lane_open(struct agent *a, struct peer *p, cJSON *req);
static void engine_hello(struct agent *a, int peer, cJSON *hello);

static int find_peer(struct agent *a, int fd)
{
    for (int i = 0; i < a->npeers; i++)
        if (a->peers[i].fd == fd)
            return i;
    return -1;
}

static int find_proc(struct agent *a, pid_t pid)
{
    for (int j = 0; j < a->nprocs; j++)
        if (a->procs[j].pid == pid)
            return j;
    return -1;
}

/* Closes connection i and frees its slot; its lanes close and its doorbell
 * goes back. What its process holds in the arena stays: the process may
 * live on and use it. */
static void drop_peer(struct agent *a, int i)
{
    struct peer *p = &a->peers[i];
    close_peer_lanes(a, p);
    shoal_loop_unwatch(a->loop, p->fd);
    close(p->fd);
    for (int k = 0; k < a->nengines; k++)
        if (a->engines[k].conn == p->fd)
            a->engines[k].conn = -1; /* never send to whatever reuses the fd number */
    int j = find_proc(a, p->pid);
    if (j >= 0)
        a->procs[j].conns--;
    a->peers[i] = a->peers[--a->npeers];
}

/* Forgets process j: closes its connections and its pidfd. If it died,
 * releases what it still held in the arena, unless it is one of our live
 * engines: engine_gone releases an engine's references, after it has taken
 * the replies the engine finished before dying. */
static void drop_proc(struct agent *a, int j, int dead)
{
    pid_t pid = a->procs[j].pid;
    for (int i = a->npeers - 1; i >= 0; i--)
        if (a->peers[i].pid == pid)
            drop_peer(a, i);
    shoal_loop_unwatch(a->loop, a->procs[j].pidfd);
    close(a->procs[j].pidfd);
    a->procs[j] = a->procs[--a->nprocs];
    if (!dead)
        return;
    for (int k = 0; k < a->nengines; k++)
        if (a->engines[k].pid == pid && a->engines[k].alive)
            return;
    int n = shoal_arena_reclaim(a->arena, pid);
    if (n > 0)
        logf_("released %d arena references of process %d, which is gone", n, (int)pid);
}

/* Forgets process j if it has no connection open and no holder record in
 * the arena: its death would leave nothing to release, so keeping its slot
 * and its pidfd would only use them up (a process that opens and closes a
 * client in a loop once ran us out of both). */
static void forget_idle_proc(struct agent *a, int j)
{
    if (j >= 0 && a->procs[j].conns == 0 && shoal_arena_holder_count(a->arena, a->procs[j].pid) == 0)
        drop_proc(a, j, 0);
}

/* The process behind a pidfd ended. */
static void on_peer_exit(shoal_loop *l, int fd, uint32_t events, void *arg)
{
    (void)l;
    (void)events;
    struct agent *a = arg;
    for (int j = 0; j < a->nprocs; j++)
        if (a->procs[j].pidfd == fd) {
            drop_proc(a, j, 1);
            return;
        }
}

/* Data or the end on a connection. A process may close its connection and
 * live on, keeping its arena references: only its pidfd decides when to
 * release them. */
static void on_peer(shoal_loop *l, int fd, uint32_t events, void *arg)
{
    (void)l;
    (void)events;
    struct agent *a = arg;
    char buf[256];
    ssize_t n;
    int i = find_peer(a, fd);
    if (i < 0) {
        shoal_loop_unwatch(a->loop, fd); /* not ours any more: never read what reuses the number */
        return;
    }
    while ((n = recv(fd, buf, sizeof buf, MSG_DONTWAIT)) > 0) {
        /* Engines introduce themselves with one JSON line; clients ask for lanes. */
        struct peer *p = &a->peers[i];
        for (ssize_t k = 0; k < n; k++) {
            cJSON *j;
            int kind = shoal__request_byte(p->line, sizeof p->line, &p->linelen, buf[k], &j);
            if (kind == SHOAL__REQ_MORE)
                continue;
            if (kind == SHOAL__REQ_ENGINE)
                engine_hello(a, i, j);
            else if (kind == SHOAL__REQ_LANE)
                lane_open(a, p, j);
            else {
                const char *no = "{\"error\": \"not a request this agent knows\"}\n";
                (void)send(p->fd, no, strlen(no), MSG_NOSIGNAL);
            }
            cJSON_Delete(j);
        }
    }
    if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
        pid_t pid = a->peers[i].pid;
        drop_peer(a, i); /* its client is done with its lanes */
        forget_idle_proc(a, find_proc(a, pid));
    }
}

/* Refuses connection c of process pid: logs why, tells the process in one
 * line ({"error": why}, no fd attached), and closes the connection. */
__attribute__((format(printf, 4, 5))) static void refuse(struct agent *a, int c, pid_t pid, const char *fmt, ...)
{
    (void)a;
    char why[400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, sizeof why, fmt, ap);
    va_end(ap);
    logf_("refused process %d: %s", (int)pid, why);
    cJSON *j = cJSON_CreateObject();
    cJSON_AddStringToObject(j, "error", why);
    char *text = cJSON_PrintUnformatted(j);
    cJSON_Delete(j);
    if (text) {
        size_t len = strlen(text);
        text[len] = '\n'; /* over the terminating NUL, which send does not need */
        (void)send(c, text, len + 1, MSG_NOSIGNAL | MSG_DONTWAIT);
        free(text);
    }
    close(c);
}

/* Why a call that wanted an fd failed with err (EMFILE or ENFILE). */
static const char *fd_limit_reason(int err, char *buf, size_t len)
{
    struct rlimit rl;
    if (err == ENFILE)
        snprintf(buf, len, "the system's limit of open files is reached");
    else if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY)
        snprintf(buf, len, "the agent has reached its limit of %llu open files (RLIMIT_NOFILE): close clients "
                 "of this node that are done, or start the agent with a higher `ulimit -n`",
                 (unsigned long long)rl.rlim_cur);
    else
        snprintf(buf, len, "the agent has reached its limit of open files (RLIMIT_NOFILE)");
    return buf;
}

/* The pid of the process at the other end of connection c, or -1. */
static pid_t peer_pid(int c)
{
    struct ucred cred;
    socklen_t len = sizeof cred;
    return getsockopt(c, SOL_SOCKET, SO_PEERCRED, &cred, &len) == 0 ? cred.pid : -1;
}

/* Out of fds: gives up the spare one to accept one waiting connection and
 * tell it why, rather than leave it in the backlog with no answer (the
 * process would wait for its timeout, and then not know why). Returns
 * whether a connection was taken. */
static int refuse_for_fds(struct agent *a, int listen_fd, int err)
{
    if (a->spare_fd < 0)
        return 0;
    close(a->spare_fd);
    int c = accept4(listen_fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (c >= 0) {
        char why[300];
        refuse(a, c, peer_pid(c), "%s", fd_limit_reason(err, why, sizeof why));
    }
    a->spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    return c >= 0;
}

/* The process of a new connection: the one we know (if the process we
 * knew by that pid is dead, it is released first), or a new entry with its
 * pidfd watched. Returns its index, or -1 after refusing c. */
static int proc_for(struct agent *a, int c, pid_t pid)
{
    int j = find_proc(a, pid);
    if (j >= 0) {
        /* Its pidfd may already say it died (its pid now another
         * process's), with the event not yet taken: take it now. */
        struct pollfd pf = {.fd = a->procs[j].pidfd, .events = POLLIN};
        if (poll(&pf, 1, 0) == 0)
            return j;
        drop_proc(a, j, 1);
    }
    if (a->nprocs == MAX_PROCS) {
        refuse(a, c, pid, "the agent already serves %d processes, its most", MAX_PROCS);
        return -1;
    }
    int pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
    if (pidfd < 0) {
        char why[300];
        int err = errno;
        if (err == EMFILE || err == ENFILE)
            refuse(a, c, pid, "%s", fd_limit_reason(err, why, sizeof why));
        else
            refuse(a, c, pid, "the agent cannot watch the process (pidfd_open: %s)", strerror(err));
        return -1;
    }
    int rc = shoal_loop_watch(a->loop, pidfd, POLLIN, on_peer_exit, a);
    if (rc < 0) {
        close(pidfd);
        refuse(a, c, pid, "the agent cannot watch the process (%s)", strerror(-rc));
        return -1;
    }
    a->procs[a->nprocs] = (struct proc){.pid = pid, .pidfd = pidfd};
    return a->nprocs++;
}

static void on_listen(shoal_loop *l, int fd, uint32_t events, void *arg)
{
    (void)events;
    struct agent *a = arg;
    for (;;) {
        int c = accept4(fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
        if (c < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            if ((errno == EMFILE || errno == ENFILE) && refuse_for_fds(a, fd, errno))
                continue;
            return; /* EAGAIN: drained */
        }
        struct ucred cred;
        socklen_t len = sizeof cred;
        if (getsockopt(c, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0) {
            refuse(a, c, -1, "the agent cannot read the process's credentials (%s)", strerror(errno));
            continue;
        }
        if (cred.uid != geteuid()) {
            refuse(a, c, cred.pid, "the agent serves the processes of uid %d only, and this one is uid %d",
                   (int)geteuid(), (int)cred.uid);
            continue;
        }
        if (a->npeers == MAX_PEERS) {
            refuse(a, c, cred.pid, "the agent already has %d connections open, its most: close clients of "
                   "this node that are done", MAX_PEERS);
            continue;
        }
        int j = proc_for(a, c, cred.pid);
        if (j < 0)
            continue;
        int rc = send_arena(a, c);
        if (rc == 0)
            rc = shoal_loop_watch(l, c, POLLIN, on_peer, a);
        if (rc < 0) {
            /* A process that only asked who listens here (SO_PEERCRED:
             * `shoal stop` finding this machine's agents) has gone already. */
            if (rc != -EPIPE && rc != -ECONNRESET)
                logf_("could not serve process %d: %s", (int)cred.pid, strerror(-rc));
            close(c);
            forget_idle_proc(a, j);
            continue;
        }
        a->procs[j].conns++;
        a->peers[a->npeers++] = (struct peer){.fd = c, .pid = cred.pid, .serial = ++a->next_serial};
    }
}

/* What to do about a runtime directory we cannot use. */
static const char *runtime_dir_fix(void)
{
    const char *xdg = getenv("XDG_RUNTIME_DIR");
    return xdg && *xdg ? "or set XDG_RUNTIME_DIR to another directory of your own"
                       : "or set XDG_RUNTIME_DIR to a directory of your own (the agent then uses "
                         "$XDG_RUNTIME_DIR/shoal)";
}

/* "uid N (name)", or "uid N" where the name is unknown. */
static void uid_text(uid_t uid, char *out, size_t len)
{
    struct passwd *pw = getpwuid(uid);
    if (pw && pw->pw_name)
        snprintf(out, len, "uid %d (%s)", (int)uid, pw->pw_name);
    else
        snprintf(out, len, "uid %d", (int)uid);
}

/* Makes the runtime directory: ours, mode 0700, not a symlink. Logs what is
 * wrong with it, naming it and its owner and saying what to do, and returns
 * -1; or returns 0. */
static int runtime_dir(char *out, size_t len)
{
    const char *xdg = getenv("XDG_RUNTIME_DIR");
    int n = xdg && *xdg ? snprintf(out, len, "%s/shoal", xdg) : snprintf(out, len, "/tmp/shoal-%d", (int)geteuid());
    if (n < 0 || (size_t)n >= len) {
        logf_("the runtime directory's path (%s/shoal) is too long: set XDG_RUNTIME_DIR to a shorter one", xdg);
        return -1;
    }
    if (mkdir(out, 0700) < 0 && errno != EEXIST) {
        logf_("cannot make the runtime directory %s: %s (%s)", out, strerror(errno), runtime_dir_fix());
        return -1;
    }
    struct stat st;
    if (lstat(out, &st) < 0) {
        logf_("cannot look at the runtime directory %s: %s (%s)", out, strerror(errno), runtime_dir_fix());
        return -1;
    }
    char owner[300], me[300];
    uid_text(st.st_uid, owner, sizeof owner);
    uid_text(geteuid(), me, sizeof me);
    if (S_ISLNK(st.st_mode)) {
        logf_("the runtime directory %s is a symbolic link (owned by %s), which the agent does not follow: "
              "remove it, %s", out, owner, runtime_dir_fix());
        return -1;
    }
    if (!S_ISDIR(st.st_mode)) {
        logf_("the runtime directory %s is not a directory (owned by %s): remove it, %s", out, owner,
              runtime_dir_fix());
        return -1;
    }
    if (st.st_uid != geteuid()) {
        /* Someone else made it first, perhaps to catch our socket there. */
        logf_("the runtime directory %s belongs to %s, not to this user, %s: another user made it; have it "
              "removed (by its owner or root), %s", out, owner, me, runtime_dir_fix());
        return -1;
    }
    if (st.st_mode & 077) {
        logf_("the runtime directory %s is open to other users (mode %04o): `chmod 700 %s`, %s", out,
              (unsigned)(st.st_mode & 07777), out, runtime_dir_fix());
        return -1;
    }
    return 0;
}

/* FNV-1a of s: tells apart the sockets of same-named profiles of two
 * $SHOAL_DIRs in one runtime directory. */
static uint32_t name_hash(const char *s)
{
    uint32_t h = 2166136261u;
    for (; *s; s++)
        h = (h ^ (uint8_t)*s) * 16777619u;
    return h;
}

/* Whether process pid lives (a zombie does not). */
static int process_alive(pid_t pid)
{
    char path[64], buf[256];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return kill(pid, 0) == 0 || errno == EPERM;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    const char *paren = strrchr(buf, ')'); /* the state follows the command's name */
    return !(paren && paren[1] == ' ' && (paren[2] == 'Z' || paren[2] == 'X'));
}

/* Whether an agent listens on the socket at path: 1 (and its pid in *pid),
 * 0 if nobody does (a socket left by an agent that was killed) or there is
 * no such file, or a negative errno (not a socket, or it cannot tell). */
static int socket_in_use(const char *path, pid_t *pid)
{
    struct stat st;
    if (lstat(path, &st) < 0)
        return errno == ENOENT ? 0 : -errno;
    if (!S_ISSOCK(st.st_mode))
        return -ENOTSOCK;
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0)
        return -errno;
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    memcpy(sa.sun_path, path, strlen(path) + 1);
    int rc = connect(fd, (struct sockaddr *)&sa, sizeof sa);
    /* A full backlog (EAGAIN) is a listener too: one that is stopped or busy. */
    if (rc == 0 || errno == EAGAIN) {
        struct ucred cred = {.pid = -1};
        socklen_t len = sizeof cred;
        if (rc < 0 || getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0)
            cred.pid = -1;
        *pid = cred.pid;
        /* A killed agent's listening socket can outlive it briefly: its
         * io_uring, which held a pending accept, is torn down after the
         * process is gone. A listener whose process is dead is nobody. */
        rc = cred.pid > 0 && !process_alive(cred.pid) ? 0 : 1;
    } else {
        rc = errno == ECONNREFUSED ? 0 : -errno;
    }
    close(fd);
    return rc;
}

/* Listens on agent-<profile>-<hash of the profile directory>-<pid>.sock in
 * the runtime directory (several agents of a profile may run on one host:
 * each adds engines). The sockets that agents of this profile left when
 * they were killed are removed first: nobody listens on them (a socket
 * some agent listens on is never touched). Logs what is wrong and returns
 * -1, or returns 0. */
static int listen_unix(struct agent *a, const char *profile, const char *profile_dir)
{
    char dir[sizeof a->sock_path], prefix[sizeof a->sock_path];
    if (runtime_dir(dir, sizeof dir - 32) < 0)
        return -1;
    snprintf(prefix, sizeof prefix, "agent-%s-%08x-", profile, (unsigned)name_hash(profile_dir));
    int n = snprintf(a->sock_path, sizeof a->sock_path, "%s/%s%d.sock", dir, prefix, (int)getpid());
    if (n < 0 || (size_t)n >= sizeof a->sock_path) {
        /* A long profile name in a deep runtime directory: a name made of
         * hashes alone, as fixed for the profile as the long one. */
        snprintf(prefix, sizeof prefix, "agent-%08x%08x-", (unsigned)name_hash(profile),
                 (unsigned)name_hash(profile_dir));
        n = snprintf(a->sock_path, sizeof a->sock_path, "%s/%s%d.sock", dir, prefix, (int)getpid());
    }
    if (n < 0 || (size_t)n >= sizeof a->sock_path) {
        logf_("the socket's path (%s/agent-....sock) is longer than a Unix socket's %zu bytes: set "
              "XDG_RUNTIME_DIR to a shorter directory of your own", dir, sizeof a->sock_path - 1);
        return -1;
    }
    DIR *dp = opendir(dir);
    for (struct dirent *de; dp && (de = readdir(dp));) {
        size_t len = strlen(de->d_name);
        if (strncmp(de->d_name, prefix, strlen(prefix)) || len < 5 || strcmp(de->d_name + len - 5, ".sock"))
            continue;
        char old[sizeof a->sock_path + 256];
        pid_t other = -1;
        snprintf(old, sizeof old, "%s/%s", dir, de->d_name);
        if (strlen(old) < sizeof a->sock_path && socket_in_use(old, &other) == 0 && unlink(old) == 0)
            logf_("removed %s, which nobody listened on (left by an agent of this profile that was killed)", old);
    }
    if (dp)
        closedir(dp);
    if (unlink(a->sock_path) == 0) /* our pid's, from an agent long gone */
        logf_("replaced %s", a->sock_path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) {
        logf_("cannot make a Unix socket: %s", strerror(errno));
        return -1;
    }
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    memcpy(sa.sun_path, a->sock_path, sizeof sa.sun_path);
    if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0 || chmod(a->sock_path, 0600) < 0 || listen(fd, 128) < 0) {
        logf_("cannot listen on %s: %s", a->sock_path, strerror(errno));
        close(fd);
        return -1;
    }
    a->listen_fd = fd;
    return 0;
}

static void on_signal(shoal_loop *l, int fd, uint32_t events, void *arg)
{
    (void)l;
    (void)events;
    struct agent *a = arg;
    struct signalfd_siginfo si;
    while (read(fd, &si, sizeof si) == (ssize_t)sizeof si)
        logf_("stopping on signal %u", si.ssi_signo);
    a->running = 0;
}

/* ---- engines ---------------------------------------------------------------------- */

static void engine_hello(struct agent *a, int peer, cJSON *hello);

/* Releases our reference to message block b once no engine needs it. */
static void blk_unuse(struct agent *a, int b)
{
    if (b < 0 || b >= a->nblks || a->blks[b].users <= 0)
        return;
    if (--a->blks[b].users == 0) {
        shoal_arena_release(a->arena, a->blks[b].h);
        a->blks[b].h.generation = 0;
    }
}

static int blk_new(struct agent *a, shoal_handle h, int users)
{
    for (int i = 0; i < a->nblks; i++)
        if (a->blks[i].users == 0 && a->blks[i].h.generation == 0) {
            a->blks[i] = (struct msgblk){h, users};
            return i;
        }
    if (a->nblks == a->capblks) {
        int n = a->capblks ? 2 * a->capblks : 64;
        struct msgblk *b = realloc(a->blks, (size_t)n * sizeof *b);
        if (!b)
            return -ENOMEM;
        a->blks = b;
        a->capblks = n;
    }
    a->blks[a->nblks] = (struct msgblk){h, users};
    return a->nblks++;
}

/* Moves what waits in e's backlog into its task ring, as far as it fits. */
static void flush_backlog(struct engine *e)
{
    if (e->nbacklog == 0)
        return;
    size_t done = 0;
    while (done < e->nbacklog) {
        size_t left = e->nbacklog - done;
        int n = shoal_ring_push(&e->sq, e->backlog + done, (uint32_t)(left > 64 ? 64 : left));
        if (n <= 0)
            break;
        done += (size_t)n;
    }
    memmove(e->backlog, e->backlog + done, (e->nbacklog - done) * sizeof *e->backlog);
    e->nbacklog -= done;
}

/* Every 2 ms while a backlog waits: move it along. An engine takes slots
 * without telling us (a RELEASE brings no completion, so no doorbell), so
 * its ring's room is only noticed by looking. */
static void on_backlog_timer(shoal_loop *l, uint64_t id, void *arg)
{
    (void)id;
    struct agent *a = arg;
    int left = 0;
    for (int i = 0; i < a->nengines; i++) {
        if (a->engines[i].ready)
            flush_backlog(&a->engines[i]);
        left |= a->engines[i].nbacklog > 0;
    }
    a->backlog_timer = 0;
    if (left)
        shoal_loop_timer(l, 2, 0, on_backlog_timer, a, &a->backlog_timer);
}

/* Queues a slot for engine e: straight into its task ring when there is
 * room and nothing waits before it, else into the backlog, which its next
 * completions and a 2 ms timer drain. Nothing is ever dropped. Returns 0 or
 * -ENOMEM. */
static int sq_push(struct engine *e, const struct slot *sl)
{
    if (e->nbacklog == 0 && shoal_ring_push(&e->sq, sl, 1) == 1)
        return 0;
    struct agent *a = e->agent;
    if (!a->backlog_timer)
        shoal_loop_timer(a->loop, 2, 0, on_backlog_timer, a, &a->backlog_timer);
    if (e->nbacklog == e->capbacklog) {
        size_t cap = e->capbacklog ? 2 * e->capbacklog : 256;
        struct slot *b = realloc(e->backlog, cap * sizeof *b);
        if (!b)
            return -ENOMEM;
        e->backlog = b;
        e->capbacklog = cap;
    }
    e->backlog[e->nbacklog++] = *sl;
    return 0;
}

/* Sends the controller a RESULT that says engine e could not finish task_id. */
static int pack_frames(struct agent *a, const shoal_frame *f, uint32_t n, uint32_t npayload, shoal_handle *out);

/* The id its sender knows task_id by (a direct task's is the client's). */
static unsigned long long task_name(uint64_t task_id, struct origin o)
{
    return (unsigned long long)(o.task ? o.task : task_id);
}

/*
 * Ends engine id's part of task_id with an EngineError that says evalue,
 * sent to whoever sent the task: the controller, or the client of a direct
 * task on its connection (nowhere if that is gone: so is the client, or it
 * fails the task when its connection broke).
 */
static void reply_error(struct agent *a, uint32_t id, uint64_t task_id, struct origin o, const char *evalue)
{
    char meta[SHOAL_WIRE_ENGINE_ERROR_MAX];
    int n = shoal_wire_engine_error_meta(id, evalue, meta, sizeof meta);
    if (n < 0)
        return;
    shoal_frame f[2] = {{meta, (size_t)n}, {"", 0}};
    if (o.task) {
        shoal_handle h;
        if (!a->bulk || pack_frames(a, f, 2, 2, &h) < 0) {
            logf_("could not tell a client that its task %llu failed: %s", (unsigned long long)o.task, evalue);
            return;
        }
        if (shoal__bulk_send_reply(a->bulk, o.token, ++a->next_xfer, o.task, id, SHOAL_MSG_RESULT, h,
                                   16 + 16 + (uint64_t)n) < 0)
            shoal_arena_release(a->arena, h);
        return;
    }
    shoal_msg_header h = {.type = SHOAL_MSG_RESULT, .n_payload = 2, .msg_id = ++a->next_msg_id,
                          .task_id = task_id, .sender = id, .target = id};
    ctl_send(a, &h, f, 2);
}

/* Who sent engine e's task task_id (one it has: the controller if none). */
static struct origin origin_of(const struct engine *e, uint64_t task_id)
{
    for (size_t k = 0; k < e->nout; k++)
        if (e->out[k].task_id == task_id)
            return e->out[k].o;
    return (struct origin){0, 0};
}

static void engine_error(struct agent *a, struct engine *e, uint64_t task_id, struct origin o, const char *why)
{
    char evalue[300];
    snprintf(evalue, sizeof evalue, "engine %d (pid %d) %s while running task %llu", e->id, (int)e->pid, why,
             task_name(task_id, o));
    reply_error(a, (uint32_t)e->id, task_id, o, evalue);
}

static void send_engine_error(struct agent *a, struct engine *e, uint64_t task_id, const char *why)
{
    engine_error(a, e, task_id, origin_of(e, task_id), why);
}

static struct engine *engine_by_id(struct agent *a, uint32_t id)
{
    for (int i = 0; i < a->nengines; i++)
        if (a->engines[i].id == (int32_t)id)
            return &a->engines[i];
    return NULL;
}

/* ---- lanes: a local client's direct path to an engine ---------------------------- */

/* Closes lane i: the engine (woken through its doorbell) drops it, and the
 * client (woken through its own) fails whatever it still waited for there. */
static void lane_close(struct agent *a, int i, uint32_t why)
{
    struct lane *l = &a->lanes[i];
    struct lane_header *hd;
    if (shoal_arena_ptr(a->arena, l->h, (void **)&hd) == 0) /* said before the rings close */
        __atomic_store_n(&hd->closed, why, __ATOMIC_RELEASE);
    shoal_ring_close(&l->sq);
    shoal_ring_close(&l->cq);
    shoal_arena_release(a->arena, l->h);
    a->lanes[i] = a->lanes[--a->nlanes];
}

static void kept_reply_release(struct agent *a, struct kept_reply *r)
{
    for (size_t i = 0; i < r->nbufs; i++)
        shoal_arena_release(a->arena, r->bufs[i]);
    free(r->bufs);
    shoal_arena_release(a->arena, r->reply);
}

/* Takes a reference to the reply block h and to every arena block its meta
 * names as a buffer (["arena", [offset, length, generation], start, n]);
 * 0, or a negative errno with nothing taken (the block is gone). The reply
 * is input from a process that died: every length is checked (parse.c), and
 * a handle that is not a live block is skipped. */
static int kept_reply_take(struct agent *a, shoal_handle h, struct kept_reply *out)
{
    int rc = shoal_arena_acquire(a->arena, h);
    if (rc < 0)
        return rc;
    *out = (struct kept_reply){.reply = h};
    uint8_t *p;
    shoal_frame *f = NULL;
    uint32_t nf, np;
    if (shoal_arena_ptr(a->arena, h, (void **)&p) < 0 || shoal__msgblock_frames(p, h.length, &f, &nf, &np) < 0)
        return 0;
    cJSON *meta = np ? cJSON_ParseWithLength(f[0].data, f[0].len) : NULL;
    free(f);
    const cJSON *b;
    cJSON_ArrayForEach(b, cJSON_GetObjectItemCaseSensitive(meta, "buffers")) {
        const cJSON *kind = cJSON_GetArrayItem(b, 0), *hh = cJSON_GetArrayItem(b, 1);
        if (!cJSON_IsString(kind) || strcmp(kind->valuestring, "arena") || cJSON_GetArraySize(hh) != 3)
            continue;
        double v[3];
        for (int i = 0; i < 3; i++)
            v[i] = cJSON_IsNumber(cJSON_GetArrayItem(hh, i)) ? cJSON_GetArrayItem(hh, i)->valuedouble : -1;
        if (v[0] < 0 || v[1] < 0 || v[2] < 0 || v[0] > 9e15 || v[1] > 9e15 || v[2] > 9e15)
            continue;
        shoal_handle bh = {(uint64_t)v[0], (uint64_t)v[1], (uint64_t)v[2]};
        shoal_handle *more = realloc(out->bufs, (out->nbufs + 1) * sizeof *more);
        if (!more || shoal_arena_acquire(a->arena, bh) < 0) {
            if (more)
                out->bufs = more;
            continue;
        }
        out->bufs = more;
        out->bufs[out->nbufs++] = bh;
    }
    cJSON_Delete(meta);
    return 0;
}

static void kept_lane_free(struct agent *a, int k)
{
    struct kept_lane *kl = &a->kept[k];
    for (size_t i = 0; i < kl->nheld; i++)
        kept_reply_release(a, &kl->held[i]);
    free(kl->held);
    shoal_ring_close(&kl->sq);
    shoal_arena_release(a->arena, kl->h);
    a->kept[k] = a->kept[--a->nkept];
}

/* Takes the RELEASEs that clients sent on kept lanes, letting go of those
 * replies; a lane with none left is freed. Called every half second. */
static void poll_kept_lanes(struct agent *a)
{
    for (int k = a->nkept - 1; k >= 0; k--) {
        struct kept_lane *kl = &a->kept[k];
        struct slot sl[64];
        int n;
        while ((n = shoal_ring_pop(&kl->sq, sl, 64)) > 0)
            for (int i = 0; i < n; i++) {
                if (sl[i].kind != KIND_RELEASE)
                    continue; /* a task sent before the client heard: it fails that itself */
                for (size_t j = 0; j < kl->nheld; j++)
                    if (kl->held[j].reply.offset == sl[i].offset &&
                        kl->held[j].reply.generation == sl[i].generation) {
                        kept_reply_release(a, &kl->held[j]);
                        kl->held[j] = kl->held[--kl->nheld];
                        break;
                    }
            }
        if (n < 0 || kl->nheld == 0)
            kept_lane_free(a, k);
    }
}

/*
 * Engine e died: its lanes close, but a lane with replies its client has
 * yet to take is kept (struct kept_lane), the replies' blocks held for the
 * client. Call before the engine's references are reclaimed.
 */
static void close_engine_lanes(struct agent *a, const struct engine *e, uint32_t why)
{
    for (int i = a->nlanes - 1; i >= 0; i--) {
        if (a->lanes[i].engine != e->index)
            continue;
        struct lane *l = &a->lanes[i];
        struct slot *recent = malloc(LANE_NSLOTS * sizeof *recent);
        int n = recent ? shoal_ring_recent(&l->cq, recent, LANE_NSLOTS) : -ENOMEM;
        struct kept_lane kl = {.h = l->h, .peer = l->peer, .sq = l->sq};
        for (int j = 0; j < n; j++) {
            shoal_handle h = {recent[j].offset, recent[j].length, recent[j].generation};
            struct kept_reply r;
            /* A reply the engine still held (its client has not released
             * it): ours now, with its buffers. One already let go of is not
             * there to take. */
            if (recent[j].kind != KIND_RESULT || kept_reply_take(a, h, &r) < 0)
                continue;
            struct kept_reply *more = realloc(kl.held, (kl.nheld + 1) * sizeof *more);
            if (!more) {
                kept_reply_release(a, &r);
                break;
            }
            kl.held = more;
            kl.held[kl.nheld++] = r;
        }
        free(recent);
        if (kl.nheld && a->nkept == a->capkept) {
            int cap = a->capkept ? 2 * a->capkept : 8;
            struct kept_lane *more = realloc(a->kept, (size_t)cap * sizeof *more);
            if (more) {
                a->kept = more;
                a->capkept = cap;
            }
        }
        if (!kl.nheld || a->nkept == a->capkept) {
            for (size_t j = 0; j < kl.nheld; j++)
                kept_reply_release(a, &kl.held[j]);
            free(kl.held);
            lane_close(a, i, why);
            continue;
        }
        /* The client reads what is left, then hears why (the header says,
         * and the completion ring is closed); its RELEASEs still come on
         * the submission ring, which stays open for them. */
        struct lane_header *hd;
        if (shoal_arena_ptr(a->arena, l->h, (void **)&hd) == 0)
            __atomic_store_n(&hd->closed, why, __ATOMIC_RELEASE);
        shoal_ring_close(&l->cq);
        a->kept[a->nkept++] = kl; /* the lane block's reference goes with it */
        a->lanes[i] = a->lanes[--a->nlanes];
    }
}

static void close_peer_lanes(struct agent *a, struct peer *p)
{
    for (int i = a->nlanes - 1; i >= 0; i--)
        if (a->lanes[i].peer == p->serial)
            lane_close(a, i, LANE_CLIENT_GONE);
    for (int k = a->nkept - 1; k >= 0; k--)
        if (a->kept[k].peer == p->serial)
            kept_lane_free(a, k);
    if (p->bell.generation) {
        shoal_arena_release(a->arena, p->bell);
        p->bell.generation = 0;
    }
}

static void say(int fd, const char *text, int n)
{
    if (n > 0)
        (void)send(fd, text, (size_t)n, MSG_NOSIGNAL);
}

/* A client asked for a lane to an engine: {"lane": engine id}. Makes one
 * (or finds the one it has), tells the engine through its task ring, and
 * answers {"lane": id, "block": [offset, length, generation]} or
 * {"lane": id, "error": why}. */
static void lane_open(struct agent *a, struct peer *p, cJSON *req)
{
    char text[256];
    cJSON *want = cJSON_GetObjectItemCaseSensitive(req, "lane");
    int ok = cJSON_IsNumber(want) && want->valuedouble >= 0 && want->valuedouble < 1e9;
    int id = ok ? want->valueint : -1;
    struct engine *e = ok ? engine_by_id(a, (uint32_t)id) : NULL;
    if (!e || !e->alive || !e->ready || e->conn < 0) {
        say(p->fd, text, snprintf(text, sizeof text, "{\"lane\": %d, \"error\": \"engine %d is not running on "
                                  "this node\"}\n", id, id));
        return;
    }
    for (int i = 0; i < a->nlanes; i++)
        if (a->lanes[i].peer == p->serial && a->lanes[i].engine == e->index) {
            shoal_handle h = a->lanes[i].h;
            say(p->fd, text, snprintf(text, sizeof text, "{\"lane\": %d, \"block\": [%llu, %llu, %llu]}\n", id,
                                      (unsigned long long)h.offset, (unsigned long long)h.length,
                                      (unsigned long long)h.generation));
            return;
        }
    const char *why = NULL;
    uint8_t *m;
    if (!p->bell.generation) {
        if (shoal_arena_alloc(a->arena, SHOAL_DOORBELL_SIZE, &p->bell) < 0) {
            p->bell.generation = 0;
            why = "no arena memory for a doorbell";
        } else {
            shoal_arena_ptr(a->arena, p->bell, (void **)&m);
            memset(m, 0, SHOAL_DOORBELL_SIZE);
        }
    }
    size_t one = shoal_ring_size(LANE_NSLOTS);
    shoal_handle h = {0, 0, 0};
    if (!why && a->nlanes == a->caplanes) {
        int cap = a->caplanes ? 2 * a->caplanes : 16;
        struct lane *nl = realloc(a->lanes, (size_t)cap * sizeof *nl);
        if (nl) {
            a->lanes = nl;
            a->caplanes = cap;
        } else {
            why = "out of memory";
        }
    }
    if (!why && shoal_arena_alloc(a->arena, LANE_HDR + 2 * one, &h) < 0)
        why = "no arena memory for a lane";
    if (why) {
        say(p->fd, text, snprintf(text, sizeof text, "{\"lane\": %d, \"error\": \"%s\"}\n", id, why));
        return;
    }
    shoal_arena_ptr(a->arena, h, (void **)&m);
    struct lane *l = &a->lanes[a->nlanes];
    *l = (struct lane){.h = h, .peer = p->serial, .engine = e->index};
    shoal_ring_init(m + LANE_HDR, one, LANE_NSLOTS, &l->sq);
    shoal_ring_init(m + LANE_HDR + one, one, LANE_NSLOTS, &l->cq);
    uint8_t *bell;
    shoal_arena_ptr(a->arena, p->bell, (void **)&bell);
    shoal_ring_set_doorbell(&l->sq, (uint8_t *)e->sq.shared + SHOAL_RING_BELL_OFFSET);
    shoal_ring_set_doorbell(&l->cq, bell);
    struct lane_header hd = {.magic = LANE_MAGIC, .version = 1, .engine_id = e->id, .nslots = LANE_NSLOTS,
                             .client_bell = {p->bell.offset, p->bell.length, p->bell.generation},
                             .engine_bell = {e->rings.offset, e->rings.length, e->rings.generation},
                             .engine_pid = (int32_t)e->pid};
    memcpy(m, &hd, sizeof hd);
    struct slot sl = {.kind = KIND_LANE, .offset = h.offset, .length = h.length, .generation = h.generation};
    if (sq_push(e, &sl) < 0) {
        shoal_arena_release(a->arena, h);
        say(p->fd, text, snprintf(text, sizeof text, "{\"lane\": %d, \"error\": \"out of memory\"}\n", id));
        return;
    }
    a->nlanes++;
    say(p->fd, text, snprintf(text, sizeof text, "{\"lane\": %d, \"block\": [%llu, %llu, %llu]}\n", id,
                              (unsigned long long)h.offset, (unsigned long long)h.length,
                              (unsigned long long)h.generation));
}

/* Packs frames into one new arena block (docs/engine.md's message block). */
static int pack_frames(struct agent *a, const shoal_frame *f, uint32_t n, uint32_t npayload, shoal_handle *out)
{
    size_t head = 16 + 8 * (size_t)n, total = head;
    for (uint32_t i = 0; i < n; i++)
        total += f[i].len;
    int rc = shoal_arena_alloc(a->arena, total, out);
    if (rc < 0)
        return rc;
    uint8_t *p;
    shoal_arena_ptr(a->arena, *out, (void **)&p);
    uint32_t w[4] = {0x464D4853u, n, npayload, 0};
    memcpy(p, w, sizeof w);
    size_t pos = head;
    for (uint32_t i = 0; i < n; i++) {
        uint64_t len = f[i].len;
        memcpy(p + 16 + 8 * i, &len, 8);
        memcpy(p + pos, f[i].data, f[i].len);
        pos += f[i].len;
    }
    return 0;
}

/* Fails every target (nt ids of 4 bytes, little-endian, at t) of task_id:
 * its data did not come over the bulk channel, for the reason why. */
static void fail_bulk_task(struct agent *a, uint64_t task_id, const uint8_t *t, uint32_t nt, const char *why,
                           struct origin o)
{
    char evalue[320];
    snprintf(evalue, sizeof evalue, "the data of task %llu did not arrive over the bulk channel: %s",
             task_name(task_id, o), why);
    for (uint32_t i = 0; i < nt; i++) {
        uint32_t id;
        memcpy(&id, t + 4 * i, 4);
        reply_error(a, id, task_id, o, evalue);
    }
    logf_("%s", evalue);
}

/*
 * Gives task_id's message block h to its targets here (nt engine ids of 4
 * bytes at t): one slot in each one's task ring, the block shared. rc < 0
 * says that there is no block (the arena had no room): each target fails.
 * Takes over our reference to h.
 */
static void dispatch_task(struct agent *a, uint64_t task_id, const uint8_t *t, uint32_t nt, shoal_handle h, int rc,
                          struct origin o)
{
    int b = rc < 0 ? rc : blk_new(a, h, 0);
    if (rc == 0 && b < 0)
        shoal_arena_release(a->arena, h); /* no room to track it: give it back */
    for (uint32_t i = 0; i < nt; i++) {
        uint32_t id;
        memcpy(&id, t + 4 * i, 4);
        struct engine *e = engine_by_id(a, id);
        if (!e || !e->ready) {
            struct engine gone = {.id = (int32_t)id, .pid = e ? e->pid : 0};
            engine_error(a, &gone, task_id, o, "is not running");
            continue;
        }
        if (b < 0) {
            engine_error(a, e, task_id, o, "could not get arena memory for the task");
            continue;
        }
        if (e->nout == e->capout) {
            size_t cap = e->capout ? 2 * e->capout : 64;
            struct outstanding *grown = realloc(e->out, cap * sizeof *grown);
            if (!grown) {
                engine_error(a, e, task_id, o, "ran out of memory");
                continue;
            }
            e->out = grown;
            e->capout = cap;
        }
        struct slot sl = {.task_id = task_id, .kind = KIND_TASK, .offset = h.offset, .length = h.length,
                          .generation = h.generation};
        if (sq_push(e, &sl) < 0) {
            engine_error(a, e, task_id, o, "ran out of memory for its task queue");
            continue;
        }
        e->out[e->nout++] = (struct outstanding){task_id, b, o};
        a->blks[b].users++;
    }
    if (b >= 0 && a->blks[b].users == 0) {
        a->blks[b].users = 1;
        blk_unuse(a, b);
    }
}

/* The transfer xid that ended here, if it did (taken out of the table). */
static int take_arrival(struct agent *a, uint64_t xid, shoal_bulk_arrival *out)
{
    for (size_t i = 0; i < a->narrivals; i++)
        if (a->arrivals[i].a.id == xid) {
            *out = a->arrivals[i].a;
            a->arrivals[i] = a->arrivals[--a->narrivals];
            return 1;
        }
    return 0;
}

/* Whether any of the nt engines at t is one a parked task is for. */
static int behind_parked(struct agent *a, const uint8_t *t, uint32_t nt)
{
    for (size_t k = 0; k < a->nparked; k++)
        for (uint32_t i = 0; i < nt; i++) {
            uint32_t id;
            memcpy(&id, t + 4 * i, 4);
            for (uint32_t j = 0; j < a->parked[k].nt; j++)
                if (a->parked[k].targets[j] == id)
                    return 1;
        }
    return 0;
}

/* Marks the message block h aborted: docs/engine.md, "Message blocks". */
static void mark_aborted(struct agent *a, shoal_handle h)
{
    uint8_t *p;
    if (h.length >= 16 && shoal_arena_ptr(a->arena, h, (void **)&p) == 0) {
        _Atomic uint32_t *flags = (_Atomic uint32_t *)(p + 12);
        atomic_fetch_or_explicit(flags, MSG_ABORTED, memory_order_release);
    }
}

/*
 * Gives each parked task whose block is here to its engines, in the order
 * they came, unless a task before it that is still waiting shares one of
 * its engines. Takes the transfers that arrived for parked tasks.
 */
static void release_parked(struct agent *a)
{
    size_t keep = 0;
    for (size_t k = 0; k < a->nparked; k++) {
        struct parked *p = &a->parked[k];
        shoal_bulk_arrival arr;
        if (!p->ready && take_arrival(a, p->xfer_id, &arr)) {
            p->ready = 1;
            p->status = arr.status;
            p->h = arr.h;
            snprintf(p->why, sizeof p->why, "%s", arr.why);
        }
        /* The ones kept so far (a->parked[0..keep)) are waiting, or behind one that is. */
        int held = !p->ready;
        for (size_t w = 0; w < keep && !held; w++)
            for (uint32_t i = 0; i < p->nt && !held; i++)
                for (uint32_t j = 0; j < a->parked[w].nt && !held; j++)
                    held = a->parked[w].targets[j] == p->targets[i];
        if (held) {
            a->parked[keep++] = *p;
            continue;
        }
        if (p->status == 0 && p->aborted)
            mark_aborted(a, p->h);
        if (p->status == 0 || !p->xfer_id) /* a block that came with its TASK says its own errors */
            dispatch_task(a, p->task_id, (const uint8_t *)p->targets, p->nt, p->h, p->status, p->o);
        else
            fail_bulk_task(a, p->task_id, (const uint8_t *)p->targets, p->nt, p->why, p->o);
        free(p->targets);
    }
    a->nparked = keep;
}

/*
 * Parks task_id (nt engine ids at t): its block is transfer xid's, to come
 * (xid != 0), or h, here (rc < 0: none, the arena had no room), held
 * behind a parked task for one of its engines. Takes over our reference
 * to h.
 */
static void park_task(struct agent *a, uint64_t task_id, const uint8_t *t, uint32_t nt, uint64_t xid,
                      shoal_handle h, int rc, struct origin o)
{
    uint32_t *copy = malloc(nt ? (size_t)nt * 4 : 1);
    if (a->nparked == a->capparked && copy) {
        size_t cap = a->capparked ? 2 * a->capparked : 16;
        struct parked *p = realloc(a->parked, cap * sizeof *p);
        if (p) {
            a->parked = p;
            a->capparked = cap;
        }
    }
    if (!copy || a->nparked == a->capparked) {
        free(copy);
        if (!xid && rc == 0)
            shoal_arena_release(a->arena, h);
        fail_bulk_task(a, task_id, t, nt, "its agent ran out of memory to wait for it", o);
        return;
    }
    memcpy(copy, t, (size_t)nt * 4);
    struct parked *p = &a->parked[a->nparked++];
    *p = (struct parked){.task_id = task_id, .xfer_id = xid, .o = o, .targets = copy, .nt = nt,
                         .at_ns = now_ns(), .ready = !xid, .status = rc, .h = h};
    release_parked(a);
}

/* A TASK with the bulk flag: its block is transfer xid's, there or to come. */
static void route_bulk_task(struct agent *a, uint64_t task_id, const uint8_t *t, uint32_t nt, uint64_t xid,
                            uint64_t token)
{
    if (!a->bulk) {
        fail_bulk_task(a, task_id, t, nt, "this node's agent has no bulk server", (struct origin){token, 0});
        return;
    }
    park_task(a, task_id, t, nt, xid, (shoal_handle){0, 0, 0}, 0, (struct origin){token, 0});
}

/* A TASK from the controller: payload 0 lists the target engines (ours). */
static void route_task(struct agent *a, shoal_wire_msg *m)
{
    if (m->hdr.n_payload < 1 || m->nframes > SHOAL_WIRE_MAX_FRAMES)
        return;
    shoal_frame tf = shoal_wire_frame(m, 0);
    uint32_t nt = (uint32_t)(tf.len / 4);
    uint32_t first = 1; /* the first frame of the message block */
    uint64_t token = 0;
    if (m->hdr.flags & SHOAL_TASK_BULK) {
        shoal_frame inf = m->hdr.n_payload >= 2 ? shoal_wire_frame(m, 1) : (shoal_frame){NULL, 0};
        if (inf.len != SHOAL_TASK_BULK_INFO) {
            fail_bulk_task(a, m->hdr.task_id, tf.data, nt, "its TASK has no info frame of 16 bytes",
                           (struct origin){0, 0});
            return;
        }
        uint64_t xid;
        memcpy(&xid, inf.data, 8);
        memcpy(&token, (const uint8_t *)inf.data + 8, 8);
        if (xid) {
            route_bulk_task(a, m->hdr.task_id, tf.data, nt, xid, token);
            return;
        }
        first = 2; /* no bulk data: the block's frames follow the info */
    }
    uint32_t n = (uint32_t)m->nframes - first;
    shoal_frame *f = malloc((n ? n : 1) * sizeof *f);
    if (!f)
        return;
    for (uint32_t i = 0; i < n; i++)
        f[i] = shoal_wire_frame(m, i + first);
    shoal_handle h;
    int rc = pack_frames(a, f, n, (uint32_t)m->hdr.n_payload - first, &h);
    free(f);
    if (a->nparked && behind_parked(a, tf.data, nt))
        park_task(a, m->hdr.task_id, tf.data, nt, 0, h, rc, (struct origin){token, 0});
    else
        dispatch_task(a, m->hdr.task_id, tf.data, nt, h, rc, (struct origin){token, 0});
}

/* A client's direct task (docs/machines.md, "Direct tasks"), as its agent's
 * TASK from the controller would go: to its engines, or to wait behind a
 * parked task for one of them, or for its transfer. */
static void direct_task(struct agent *a, shoal_bulk_arrival *arr)
{
    uint64_t task_id = DIRECT_TASK | ++a->next_direct;
    struct origin o = {arr->token, arr->task};
    const uint8_t *t = (const uint8_t *)arr->targets;
    if (arr->status < 0)
        fail_bulk_task(a, task_id, t, arr->nt, arr->why, o);
    else if (arr->xid)
        park_task(a, task_id, t, arr->nt, arr->xid, (shoal_handle){0, 0, 0}, 0, o);
    else if (a->nparked && behind_parked(a, t, arr->nt))
        park_task(a, task_id, t, arr->nt, 0, arr->h, 0, o);
    else
        dispatch_task(a, task_id, t, arr->nt, arr->h, 0, o);
    free(arr->targets);
}

/* A client's abort of its direct task: marked as the controller's ABORT marks one. */
static void abort_direct(struct agent *a, uint64_t token, uint64_t task)
{
    for (size_t k = 0; k < a->nparked; k++)
        if (a->parked[k].o.task == task && a->parked[k].o.token == token) {
            a->parked[k].aborted = 1;
            return;
        }
    for (int i = 0; i < a->nengines; i++) {
        struct engine *e = &a->engines[i];
        for (size_t k = 0; k < e->nout; k++)
            if (e->out[k].o.task == task && e->out[k].o.token == token) {
                mark_aborted(a, a->blks[e->out[k].blk].h);
                return; /* one block for all of the node's engines */
            }
    }
}

/* The bulk server's eventfd: transfers ended. Each goes to the task that
 * waits for it, or waits for its task; a client's direct task goes on as
 * its TASK would, and its abort likewise. */
static void on_bulk(shoal_loop *l, int fd, uint32_t events, void *arg)
{
    (void)l;
    (void)events;
    struct agent *a = arg;
    uint64_t v;
    while (read(fd, &v, sizeof v) == (ssize_t)sizeof v)
        ;
    shoal_bulk_arrival got[16];
    size_t n;
    while ((n = shoal__bulk_take(a->bulk, got, 16)) > 0)
        for (size_t i = 0; i < n; i++) {
            if (got[i].kind == SHOAL_BULK_DIRECT) {
                direct_task(a, &got[i]);
                continue;
            }
            if (got[i].kind == SHOAL_BULK_ABORT) {
                abort_direct(a, got[i].token, got[i].task);
                continue;
            }
            if (a->narrivals == a->caparrivals) {
                size_t cap = a->caparrivals ? 2 * a->caparrivals : 16;
                struct arrival *ar = realloc(a->arrivals, cap * sizeof *ar);
                if (!ar) {
                    if (got[i].status == 0)
                        shoal_arena_release(a->arena, got[i].h);
                    continue; /* its task fails when it comes and waits out bulk_wait_ms */
                }
                a->arrivals = ar;
                a->caparrivals = cap;
            }
            a->arrivals[a->narrivals++] = (struct arrival){got[i], now_ns()};
        }
    if (a->nparked)
        release_parked(a);
}

/* Gives up what waited longer than bulk_wait_ms (all of it when stopping). */
static void expire_bulk(struct agent *a, int all)
{
    int64_t now = now_ns(), limit = a->bulk_wait_ms * 1000000;
    size_t keep = 0;
    for (size_t i = 0; i < a->nparked; i++) {
        struct parked *p = &a->parked[i];
        if (!all && (p->ready || now - p->at_ns <= limit)) {
            a->parked[keep++] = *p;
            continue;
        }
        char why[160];
        if (all)
            snprintf(why, sizeof why, "its node's agent stopped while it waited for it");
        else
            snprintf(why, sizeof why, "it did not come within %lld ms of the task (transfer %016llx)",
                     (long long)a->bulk_wait_ms, (unsigned long long)p->xfer_id);
        if (p->ready && p->status == 0)
            shoal_arena_release(a->arena, p->h);
        fail_bulk_task(a, p->task_id, (const uint8_t *)p->targets, p->nt, why, p->o);
        free(p->targets);
    }
    a->nparked = keep;
    if (!all && keep)
        release_parked(a); /* those behind the ones given up go now */
    for (size_t i = 0; i < a->narrivals;) {
        struct arrival *r = &a->arrivals[i];
        if (!all && now - r->at_ns <= limit) {
            i++;
            continue;
        }
        if (r->a.status == 0)
            shoal_arena_release(a->arena, r->a.h);
        *r = a->arrivals[--a->narrivals];
    }
}

/*
 * Sends the controller the reply (or output) that engine e wrote into the
 * block of slot sl, as a message of the given type. A RESULT of at least
 * bulk_threshold bytes for a client whose bulk connection (token) is here
 * goes on that connection instead (docs/machines.md, "The bulk path"): the
 * block itself, as one transfer sent by the bulk server's thread from the
 * arena, our reference to it held until it is sent (the engine's is
 * released as always); the controller gets the RESULT with the flag
 * SHOAL_RESULT_BULK and one frame (transfer id, bytes) in place of the
 * frames. Without such a connection, the old way.
 */
static int forward_result(struct agent *a, struct engine *e, const struct slot *sl, uint16_t type, struct origin o)
{
    shoal_handle h = {sl->offset, sl->length, sl->generation};
    int rc = shoal_arena_acquire(a->arena, h);
    if (rc < 0)
        return rc;
    uint8_t *p;
    shoal_arena_ptr(a->arena, h, (void **)&p);
    /* The engine's memory is input: parse.c checks every length before using it. */
    shoal_frame *f;
    uint32_t nf, np;
    rc = shoal__msgblock_frames(p, h.length, &f, &nf, &np);
    if (rc == 0) {
        shoal_msg_header hd = {.type = type, .n_payload = (uint16_t)np, .n_buffers = (uint16_t)(nf - np),
                               .msg_id = ++a->next_msg_id, .task_id = sl->task_id, .sender = (uint32_t)e->id,
                               .target = (uint32_t)e->id};
        uint64_t bytes = 16 + 8 * (uint64_t)nf;
        for (uint32_t i = 0; i < nf; i++)
            bytes += f[i].len;
        if (o.task) {
            /* A direct task's: on its client's connection, whatever its size. */
            free(f);
            if (bytes > h.length || !a->bulk ||
                shoal__bulk_send_reply(a->bulk, o.token, ++a->next_xfer, o.task, (uint32_t)e->id, type, h, bytes) < 0)
                shoal_arena_release(a->arena, h); /* its client is gone: nobody to tell */
            return 0;
        }
        uint64_t token = o.token;
        if (type == SHOAL_MSG_RESULT && token && a->bulk && bytes >= a->bulk_threshold && bytes <= h.length) {
            uint64_t xid = ++a->next_xfer;
            if (shoal__bulk_send_result(a->bulk, token, xid, h, bytes) == 0) {
                free(f);
                uint64_t info[2] = {xid, bytes};
                shoal_frame inf = {info, sizeof info};
                hd.flags = SHOAL_RESULT_BULK;
                hd.n_payload = 1;
                hd.n_buffers = 0;
                return ctl_send(a, &hd, &inf, 1); /* the bulk server owns our reference now */
            }
        }
        rc = ctl_send(a, &hd, f, nf);
        free(f);
    }
    shoal_arena_release(a->arena, h);
    return rc;
}

/* The controller's ABORT: marks task_id's message block (docs/engine.md,
 * "Message blocks"), so that an engine that has not started it answers
 * TaskAborted instead; one that has started it finishes it. */
static void abort_task(struct agent *a, uint64_t task_id)
{
    for (size_t k = 0; k < a->nparked; k++)
        if (a->parked[k].task_id == task_id) {
            a->parked[k].aborted = 1; /* its block is marked when it goes to its engines */
            return;
        }
    for (int i = 0; i < a->nengines; i++) {
        struct engine *e = &a->engines[i];
        for (size_t k = 0; k < e->nout; k++) {
            if (e->out[k].task_id != task_id)
                continue;
            mark_aborted(a, a->blks[e->out[k].blk].h);
            return; /* one block for all of the node's engines */
        }
    }
}

/* The controller's SIGNAL, {"sig": n, "engines": [ids]}: sends signal n to
 * those of our engines that are running. */
static void signal_engines(struct agent *a, shoal_wire_msg *m)
{
    if (m->hdr.n_payload < 1)
        return;
    shoal_frame f = shoal_wire_frame(m, 0);
    cJSON *j = cJSON_ParseWithLength(f.data, f.len);
    cJSON *sig = cJSON_GetObjectItemCaseSensitive(j, "sig");
    cJSON *ids = cJSON_GetObjectItemCaseSensitive(j, "engines");
    if (cJSON_IsNumber(sig) && sig->valueint >= 0 && sig->valueint <= 64 && cJSON_IsArray(ids)) {
        const cJSON *id;
        cJSON_ArrayForEach(id, ids) {
            struct engine *e = cJSON_IsNumber(id) && id->valueint >= 0 ? engine_by_id(a, (uint32_t)id->valueint)
                                                                         : NULL;
            if (e && e->alive && e->pid > 0 && kill(e->pid, sig->valueint) < 0)
                logf_("could not signal engine %d (pid %d): %s", e->id, (int)e->pid, strerror(errno));
        }
    } else {
        logf_("ignoring a malformed SIGNAL from the controller");
    }
    cJSON_Delete(j);
}

static void finish_task(struct agent *a, struct engine *e, uint64_t task_id)
{
    for (size_t i = 0; i < e->nout; i++)
        if (e->out[i].task_id == task_id) {
            blk_unuse(a, e->out[i].blk);
            e->out[i] = e->out[--e->nout];
            return;
        }
}

/*
 * Takes engine e's completions and sends them on. An OUTPUT needs no
 * answer: the engine frees it when the RELEASE of a later RESULT comes back,
 * since the ring is in order. Returns 0, or a negative errno when the
 * completion ring is closed or corrupt: the engine is then done for.
 */
static int drain_completions(struct agent *a, struct engine *e)
{
    struct slot sl[64];
    int n;
    while ((n = shoal_ring_pop(&e->cq, sl, 64)) > 0) {
        for (int i = 0; i < n; i++) {
            if (sl[i].kind == KIND_OUTPUT) {
                struct origin o = origin_of(e, sl[i].task_id);
                o.token = o.task ? o.token : 0; /* output through the controller is never bulk */
                forward_result(a, e, &sl[i], SHOAL_MSG_OUTPUT, o); /* best effort: the reply has it all */
            } else if (sl[i].kind == KIND_RESULT) {
                if (forward_result(a, e, &sl[i], SHOAL_MSG_RESULT, origin_of(e, sl[i].task_id)) < 0)
                    send_engine_error(a, e, sl[i].task_id, "sent a reply that could not be read");
                finish_task(a, e, sl[i].task_id);
                struct slot rel = {.kind = KIND_RELEASE, .offset = sl[i].offset, .length = sl[i].length,
                                   .generation = sl[i].generation};
                sq_push(e, &rel);
            }
        }
    }
    flush_backlog(e);
    return n;
}

/* The engine rang its doorbell: take its completions, then go back to sleep
 * the ring's way (docs/rings.md), so that its next push rings again. */
static void engine_gone(struct agent *a, struct engine *e, const char *why);

static void on_doorbell(shoal_loop *l, int fd, uint32_t events, void *arg)
{
    (void)l;
    (void)events;
    struct engine *e = arg;
    struct agent *a = e->agent;
    uint64_t v;
    while (read(fd, &v, sizeof v) > 0)
        ;
    shoal_ring_awake(&e->cq);
    do {
        if (drain_completions(a, e) < 0) {
            /* The engine closed or broke its completion ring: it cannot go on. */
            logf_("engine %d broke its completion ring; stopping it", e->id);
            kill(e->pid, SIGKILL);
            engine_gone(a, e, "broke its completion ring");
            return;
        }
    } while (!shoal_ring_prepare_sleep(&e->cq));
}

static void engine_gone(struct agent *a, struct engine *e, const char *why)
{
    if (!e->alive)
        return;
    e->alive = 0;
    int st = 0;
    waitpid(e->pid, &st, WNOHANG);
    logf_("engine %d (index %d, pid %d) %s", e->id, e->index, (int)e->pid, why);
    if (e->ready) {
        (void)drain_completions(a, e); /* what it finished before dying still counts */
        shoal_loop_unwatch(a->loop, e->doorbell);
        close(e->doorbell);
        e->doorbell = -1;
    }
    /* Its clients fail what they sent it, saying why. */
    close_engine_lanes(a, e, strcmp(why, "was stopped") ? LANE_ENGINE_DIED : LANE_ENGINE_STOPPED);
    e->nbacklog = 0; /* its tasks are also in e->out: they fail below */
    while (e->nout) {
        send_engine_error(a, e, e->out[e->nout - 1].task_id, why);
        blk_unuse(a, e->out[e->nout - 1].blk);
        e->nout--;
    }
    shoal_loop_unwatch(a->loop, e->pidfd);
    close(e->pidfd);
    if (e->id >= 0) {
        cJSON *j = cJSON_CreateObject();
        cJSON_AddStringToObject(j, "event", "died");
        cJSON_AddNumberToObject(j, "local", e->index);
        cJSON_AddNumberToObject(j, "pid", e->pid);
        send_json(a, SHOAL_MSG_ENGINE_EVENT, 0, j);
        cJSON_Delete(j);
    }
    shoal_arena_reclaim(a->arena, e->pid);
    if (e->ready)
        shoal_arena_release(a->arena, e->rings);
    e->ready = 0;
}

static int spawn_engine(struct agent *a, int index);

static void on_engine_exit(shoal_loop *l, int fd, uint32_t events, void *arg)
{
    (void)l;
    (void)fd;
    (void)events;
    struct engine *e = arg;
    struct agent *a = e->agent;
    /* Status 0: it stopped as asked (a client's shutdown of it), which no
     * restart undoes. */
    int st = 0;
    int asked = waitpid(e->pid, &st, WNOHANG) == e->pid && WIFEXITED(st) && WEXITSTATUS(st) == 0;
    engine_gone(a, e, asked ? "was stopped" : "died");
    if (asked)
        return;
    /* An engine that dies within seconds of starting, five times in a row,
     * is not restarted again: something is wrong with how it starts. */
    e->quick_deaths = now_ns() - e->started_ns < 5000000000ll ? e->quick_deaths + 1 : 0;
    if (a->restart && !a->stopping && e->quick_deaths >= 5)
        logf_("engine index %d died %d times right after starting; not restarting it", e->index, e->quick_deaths);
    else if (a->restart && !a->stopping) {
        int rc = spawn_engine(a, e->index);
        if (rc < 0)
            logf_("cannot restart engine index %d: %s", e->index, strerror(-rc));
        else
            logf_("restarted engine index %d as pid %d", e->index, (int)e->pid);
    }
}

static int spawn_engine(struct agent *a, int index)
{
    struct engine *e = &a->engines[index];
    int quick = e->quick_deaths;
    free(e->out);
    free(e->backlog);
    *e = (struct engine){.agent = a, .index = index, .id = -1, .conn = -1, .doorbell = -1, .pidfd = -1,
                         .quick_deaths = quick};
    e->started_ns = now_ns();
    char idx[16];
    snprintf(idx, sizeof idx, "%d", index);
    char *argv[] = {"shoal-engine", "--agent-socket", a->sock_path, "--index", idx, NULL};
    posix_spawnattr_t attr;
    posix_spawnattr_init(&attr);
    sigset_t none;
    sigemptyset(&none);
    /* We block SIGINT and SIGTERM for our signalfd; the engine must not inherit that. */
    posix_spawnattr_setsigmask(&attr, &none);
    posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK);
    extern char **environ;
    char agent_pid[32];
    snprintf(agent_pid, sizeof agent_pid, "%d", (int)getpid());
    setenv("SHOAL_AGENT_PID", agent_pid, 1); /* the engine's parent-death check */
    int rc = posix_spawn(&e->pid, a->engine_bin, NULL, &attr, argv, environ);
    posix_spawnattr_destroy(&attr);
    if (rc != 0)
        return -rc;
    e->pidfd = (int)syscall(SYS_pidfd_open, e->pid, 0);
    if (e->pidfd < 0 || shoal_loop_watch(a->loop, e->pidfd, POLLIN, on_engine_exit, e) < 0)
        return -errno;
    e->alive = 1;
    return 0;
}

/* An engine introduced itself on connection `peer`: give it rings, then ask
 * the controller for its id; the engine hears back once the id is known. */
static void engine_hello(struct agent *a, int peer, cJSON *hello)
{
    struct peer *p = &a->peers[peer];
    cJSON *idx = cJSON_GetObjectItemCaseSensitive(hello, "index");
    int i = cJSON_IsNumber(idx) ? idx->valueint : -1;
    if (i < 0 || i >= a->nengines || a->engines[i].pid != p->pid || !a->engines[i].alive || a->engines[i].conn >= 0) {
        const char *no = "{\"error\": \"not an engine of this agent\"}\n";
        (void)send(p->fd, no, strlen(no), MSG_NOSIGNAL);
        logf_("process %d claimed to be engine %d; refused", (int)p->pid, i);
        return;
    }
    struct engine *e = &a->engines[i];
    size_t one = shoal_ring_size(NSLOTS);
    int rc = shoal_arena_alloc(a->arena, 2 * one, &e->rings);
    uint8_t *m = NULL;
    if (rc == 0)
        shoal_arena_ptr(a->arena, e->rings, (void **)&m);
    e->doorbell = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (rc < 0 || e->doorbell < 0 || shoal_ring_init(m, one, NSLOTS, &e->sq) < 0 ||
        shoal_ring_init(m + one, one, NSLOTS, &e->cq) < 0 ||
        shoal_loop_watch(a->loop, e->doorbell, POLLIN, on_doorbell, e) < 0) {
        logf_("cannot set up engine %d's rings", i);
        if (e->doorbell >= 0)
            close(e->doorbell);
        e->doorbell = -1;
        if (rc == 0)
            shoal_arena_release(a->arena, e->rings);
        kill(e->pid, SIGKILL);
        return;
    }
    shoal_ring_prepare_sleep(&e->cq); /* asleep until its first completion */
    e->conn = p->fd;
    e->ready = 1;
    send_started(a, i);
}

/* Asks the controller for engine i's id (ENGINE_EVENT "started"). */
static void send_started(struct agent *a, int i)
{
    struct engine *e = &a->engines[i];
    cJSON *j = cJSON_CreateObject();
    cJSON_AddStringToObject(j, "event", "started");
    cJSON_AddNumberToObject(j, "local", i);
    cJSON_AddNumberToObject(j, "pid", e->pid);
    send_json(a, SHOAL_MSG_ENGINE_EVENT, 0, j);
    e->reg_msg = a->next_msg_id;
    cJSON_Delete(j);
}

/* The controller gave engine (asked for by our message reply_to) its id:
 * hand the engine its rings, its doorbell and its id. */
static void engine_registered(struct agent *a, uint64_t reply_to, int32_t id)
{
    for (int i = 0; i < a->nengines; i++) {
        struct engine *e = &a->engines[i];
        if (e->reg_msg != reply_to || e->id >= 0)
            continue;
        e->id = id;
        if (!e->alive || !e->ready || e->conn < 0) {
            /* It died while its id was on the way: the controller must not
             * keep a live engine that is not there. */
            cJSON *j = cJSON_CreateObject();
            cJSON_AddStringToObject(j, "event", "died");
            cJSON_AddNumberToObject(j, "local", i);
            cJSON_AddNumberToObject(j, "pid", e->pid);
            send_json(a, SHOAL_MSG_ENGINE_EVENT, 0, j);
            cJSON_Delete(j);
            return;
        }
        char text[256];
        int n = snprintf(text, sizeof text, "{\"engine\": %d, \"rings\": [%llu, %llu, %llu], \"nslots\": %d}\n", id,
                         (unsigned long long)e->rings.offset, (unsigned long long)e->rings.length,
                         (unsigned long long)e->rings.generation, NSLOTS);
        if (send_line_with_fd(e->conn, text, (size_t)n, e->doorbell) < 0) {
            logf_("cannot reach engine %d", id);
            kill(e->pid, SIGKILL);
        } else {
            logf_("engine %d is ready (index %d, pid %d)", id, i, (int)e->pid);
        }
        return;
    }
}

/* Finds the engine binary: $SHOAL_BIN_DIR, then next to us, then PATH. */
static int find_engine(struct agent *a)
{
    char self[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    self[n > 0 ? n : 0] = '\0';
    char *slash = strrchr(self, '/');
    if (slash)
        *slash = '\0';
    const char *bin = getenv("SHOAL_BIN_DIR"), *path = getenv("PATH");
    char dirs[8192];
    snprintf(dirs, sizeof dirs, "%s:%s:%s", bin ? bin : "", self, path ? path : "");
    for (char *save = NULL, *d = strtok_r(dirs, ":", &save); d; d = strtok_r(NULL, ":", &save)) {
        int k = snprintf(a->engine_bin, sizeof a->engine_bin, "%s/shoal-engine", d);
        if (k > 0 && (size_t)k < sizeof a->engine_bin && access(a->engine_bin, X_OK) == 0)
            return 0;
    }
    return -ENOENT;
}

/* Stops the engines: closing their task rings tells them to exit; those that
 * do not within two seconds are killed. */
static void stop_engines(struct agent *a)
{
    a->stopping = 1;
    for (int i = 0; i < a->nengines; i++)
        if (a->engines[i].alive && a->engines[i].ready)
            shoal_ring_close(&a->engines[i].sq);
        else if (a->engines[i].alive)
            kill(a->engines[i].pid, SIGTERM);
    int64_t deadline = now_ns() + 2000000000ll;
    for (int i = 0; i < a->nengines; i++) {
        struct engine *e = &a->engines[i];
        if (!e->alive)
            continue;
        while (waitpid(e->pid, NULL, WNOHANG) == 0 && now_ns() < deadline)
            usleep(5000);
        if (waitpid(e->pid, NULL, WNOHANG) == 0) {
            kill(e->pid, SIGKILL);
            waitpid(e->pid, NULL, 0);
        }
        engine_gone(a, e, "was stopped");
    }
}

/* ---- main ------------------------------------------------------------------------- */

static void usage(FILE *f)
{
    fprintf(f, "usage: shoal-agent [--profile NAME] [--join FILE] [--engines N] [--restart-engines]\n"
               "                   [--arena-size BYTES] [--prefault BYTES] [--retain BYTES]\n"
               "  Joins the cluster whose connection file is FILE (default $SHOAL_DIR, itself by default\n"
               "  ~/.shoal, /profile_NAME/connection.json; a copy of it, on another machine)\n"
               "  with N engines (default 0) and a shared-memory arena of BYTES\n"
               "  (default half of RAM, or of the memory cgroup's limit where that is lower).\n"
               "  --restart-engines starts a new engine (with a new id) in place of one that\n"
               "  dies. --prefault: how much fresh arena memory a background\n"
               "  thread keeps faulted in ahead of use (default an eighth of the arena, at most\n"
               "  1 GiB; 0 for none). --retain: how much freed arena memory is kept for reuse\n"
               "  before larger frees go back to the system (default half of the arena; 0 for none).\n");
}

/* The number an option was given, or a message and exit status 2. */
static int option_number(const char *name, const char *arg, uint64_t max, uint64_t *out)
{
    int rc = shoal_parse_u64(arg, max, out);
    if (rc < 0)
        fprintf(stderr, "shoal-agent: --%s wants %s, not '%s'\n", name,
                rc == -ERANGE ? "a smaller number" : "a number (decimal digits)", arg);
    return rc;
}

int main(int argc, char **argv)
{
    const char *profile = "default", *join = NULL;
    uint64_t arena_size = 0, prefault = ~0ull, retain = ~0ull, n;
    int nengines = 0;
    int restart = 0;
    static const struct option opts[] = {{"profile", required_argument, NULL, 'p'},
                                         {"join", required_argument, NULL, 'j'},
                                         {"restart-engines", no_argument, NULL, 'r'},
                                         {"arena-size", required_argument, NULL, 's'},
                                         {"engines", required_argument, NULL, 'n'},
                                         {"prefault", required_argument, NULL, 'f'},
                                         {"retain", required_argument, NULL, 'k'},
                                         {"help", no_argument, NULL, 'h'},
                                         {NULL, 0, NULL, 0}};
    for (int o; (o = getopt_long(argc, argv, "p:s:n:h", opts, NULL)) != -1;) {
        switch (o) {
        case 'n':
            if (option_number("engines", optarg, MAX_LOCAL_ENGINES, &n) < 0)
                return 2;
            nengines = (int)n;
            break;
        case 'r':
            restart = 1;
            break;
        case 'p':
            profile = optarg;
            break;
        case 'j':
            join = optarg;
            break;
        case 's':
            if (option_number("arena-size", optarg, UINT64_MAX, &arena_size) < 0)
                return 2;
            break;
        case 'f':
            if (option_number("prefault", optarg, UINT64_MAX, &prefault) < 0)
                return 2;
            break;
        case 'k':
            if (option_number("retain", optarg, UINT64_MAX, &retain) < 0)
                return 2;
            break;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (strchr(profile, '/') || !*profile) {
        usage(stderr);
        return 2;
    }

    /* Block the signals we read through a signalfd before any thread exists
     * (the arena's prefault thread, ZeroMQ's I/O threads): a thread that
     * leaves them unblocked would take SIGTERM's default action. */
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGTERM);
    sigprocmask(SIG_BLOCK, &sigs, NULL);

    snprintf(log_name, sizeof log_name, "shoal-agent %d", (int)getpid());
    static struct agent a;
    a.node = -1;
    a.restart = restart;
    a.heartbeat_ms = 1000;
    a.node_timeout_ms = 30000; /* until the controller says */
    a.listen_fd = a.sig_fd = -1;
    /* Kept to be given up when we run out of fds: we then still accept a
     * connection, to tell it why we refuse it (on_listen). */
    a.spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    char dir[PATH_MAX - 32], conn[PATH_MAX], endpoint[512], why[256];
    shoal_curve_member member;
    int curve = 0;
    if (shoal_profile_dir(profile, dir, sizeof dir) < 0) {
        logf_("the profile directory's path is too long");
        return 1;
    }
    if (join)
        snprintf(conn, sizeof conn, "%s", join);
    else
        snprintf(conn, sizeof conn, "%s/connection.json", dir);
    int rc = read_connection(conn, endpoint, sizeof endpoint, a.key, &curve, &member, why, sizeof why);
    if (rc < 0) {
        if (rc == -EINVAL)
            logf_("the connection file %s is not usable: %s", conn, why);
        else if (join)
            logf_("cannot read the connection file %s (%s): give --join a copy of the cluster's own "
                  "(profile_NAME/connection.json where the controller runs)", conn, why);
        else
            logf_("cannot read %s (%s): is a controller running for profile '%s'?", conn, why, profile);
        return 1;
    }
    uint8_t id[16];
    if (getrandom(id, sizeof id, 0) != (ssize_t)sizeof id) {
        logf_("getrandom: %s", strerror(errno));
        return 1;
    }
    for (size_t i = 0; i < sizeof id; i++)
        snprintf(a.agent_id + 2 * i, 3, "%02x", id[i]);

    /* Fresh shared pages cost ~5 us each to fault in here (0.6 s per GiB):
     * a thread keeps some ahead of use, so that a first large push finds
     * them ready (docs/arena.md). */
    /* By default half of the memory we may use: the host's, or our memory
     * cgroup's limit where that is lower (a container). */
    unsigned long long heap = arena_size ? arena_size : shoal_arena_default_heap_size();
    if (prefault == ~0ull)
        prefault = heap / 8 < (1ull << 30) ? heap / 8 : 1ull << 30;
    /* Freed memory is kept for reuse up to half of the arena: a workload that
     * pushes a new large array each round (4 GiB, say) then finds the last
     * round's pages, instead of faulting in fresh ones each time. */
    if (retain == ~0ull)
        retain = heap / 2;
    else if (retain == 0)
        retain = 1; /* none: the arena reads 0 as "its default" */
    shoal_arena_opts ao = {.heap_size = heap, .flags = prefault ? SHOAL_ARENA_PREFAULT_THREAD : 0,
                           .prefault_ahead = prefault, .retain_bytes = retain};
    if ((rc = shoal_arena_create(&ao, &a.arena)) < 0) {
        logf_("cannot create the arena: %s", strerror(-rc));
        return 1;
    }
    if ((rc = shoal_loop_create(&a.loop)) < 0) {
        logf_("cannot create the event loop: %s", strerror(-rc));
        return 1;
    }
    a.ctlq_max = CTL_BACKLOG_BYTES;
    const char *backlog = getenv("SHOAL_AGENT_CTL_BACKLOG");
    if (backlog && shoal_parse_u64(backlog, CTL_BACKLOG_BYTES, &a.ctlq_max) < 0) {
        logf_("SHOAL_AGENT_CTL_BACKLOG wants a size of at most %llu bytes, not '%s'",
              (unsigned long long)CTL_BACKLOG_BYTES, backlog);
        return 2;
    }
    if (listen_unix(&a, profile, dir) < 0)
        return 1;
    a.bulk_wait_ms = 60000;
    /* Result transfer ids: the high bits random per start, so that a
     * client never takes an old start's transfer for a new one's. */
    a.next_xfer = ((uint64_t)getpid() << 40) ^ ((uint64_t)now_ns() << 20);
    a.bulk_threshold = 1u << 20;
    const char *thr = getenv("SHOAL_BULK_THRESHOLD");
    if (thr && shoal_parse_u64(thr, UINT64_MAX, &n) == 0)
        a.bulk_threshold = n ? n : 1;
    const char *bulk_wait = getenv("SHOAL_AGENT_BULK_WAIT_MS");
    if (bulk_wait && (shoal_parse_u64(bulk_wait, 3600000, &n) < 0 || n == 0)) {
        logf_("SHOAL_AGENT_BULK_WAIT_MS wants a number of milliseconds (1 to 3600000), not '%s'", bulk_wait);
        return 2;
    }
    if (bulk_wait)
        a.bulk_wait_ms = (int64_t)n;
    /* Without a bulk server the node still works: its tasks come whole
     * through the controller (clients use the bulk path only for nodes
     * that registered one). */
    if ((rc = shoal__bulk_start(a.arena, a.key, curve, endpoint, &a.bulk, why, sizeof why)) < 0)
        logf_("no bulk server (large data comes through the controller): %s", why);

    a.sig_fd = signalfd(-1, &sigs, SFD_CLOEXEC | SFD_NONBLOCK);

    a.ctx = zmq_ctx_new();
    a.ctl = zmq_socket(a.ctx, ZMQ_DEALER);
    int zero = 0;
    zmq_setsockopt(a.ctl, ZMQ_LINGER, &zero, sizeof zero);
    /* A stalled controller must not freeze the agent: sends never wait,
     * and what the controller cannot take yet waits in ctlq (ctl_send). */
    zmq_setsockopt(a.ctl, ZMQ_SNDTIMEO, &zero, sizeof zero);
    a.ctlq_tail = &a.ctlq;
    if (curve && (rc = shoal_curve_client(a.ctl, &member)) < 0) {
        logf_("cannot set up Curve with the keys of %s: %s", conn, zmq_strerror(-rc));
        return 1;
    }
    explicit_bzero(&member, sizeof member);
    if ((rc = shoal_curve_monitor(a.ctx, a.ctl, &a.ctl_monitor)) < 0) {
        logf_("cannot watch the connection to the controller: %s", zmq_strerror(-rc));
        return 1;
    }
    if (zmq_connect(a.ctl, endpoint) < 0) {
        logf_("cannot connect to %s: %s", endpoint, zmq_strerror(zmq_errno()));
        return 1;
    }
    size_t fdlen = sizeof a.ctl_fd;
    zmq_getsockopt(a.ctl, ZMQ_FD, &a.ctl_fd, &fdlen);

    send_register(&a);
    a.last_ctl_ns = now_ns();

    uint64_t tid;
    if (shoal_loop_watch(a.loop, a.ctl_fd, POLLIN, on_ctl_fd, &a) < 0 ||
        shoal_loop_watch(a.loop, a.listen_fd, POLLIN, on_listen, &a) < 0 ||
        shoal_loop_watch(a.loop, a.sig_fd, POLLIN, on_signal, &a) < 0 ||
        shoal_loop_timer(a.loop, 500, 500, on_heartbeat_check, &a, &tid) < 0 ||
        (a.bulk && shoal_loop_watch(a.loop, shoal__bulk_eventfd(a.bulk), POLLIN, on_bulk, &a) < 0)) {
        logf_("cannot set up the event loop");
        return 1;
    }
    if (nengines > 0 && find_engine(&a) < 0) {
        logf_("cannot find the shoal-engine program (looked in $SHOAL_BIN_DIR, next to this agent, on PATH)");
        return 1;
    }
    for (int i = 0; i < nengines; i++) {
        a.nengines = i + 1;
        if ((rc = spawn_engine(&a, i)) < 0) {
            logf_("cannot start engine %d: %s", i, strerror(-rc));
            a.nengines = i;
            break;
        }
    }
    /* The ZeroMQ fd only signals changes: look once, in case the reply came
     * in before we watched it. */
    on_ctl_fd(a.loop, a.ctl_fd, POLLIN, &a);
    logf_("serving: arena fd on %s, event loop on %s; controller %s (%s); bulk server %s", a.sock_path,
          shoal_loop_backend(a.loop), endpoint, curve ? "CurveZMQ" : "plaintext",
          a.bulk ? shoal__bulk_endpoint(a.bulk) : "none");

    /* ZeroMQ's fd is edge-triggered, and sending on the socket (results,
     * engine events) can consume the edge of a message that arrived
     * meanwhile: after every round of callbacks, look at ZMQ_EVENTS again,
     * or a heartbeat or a task could wait unseen until the next timer. */
    a.running = 1;
    /* While messages wait for the controller, look again every 5 ms. */
    while (a.running && (rc = shoal_loop_run_once(a.loop, a.ctlq ? 5 : -1)) >= 0) {
        on_ctl_fd(a.loop, a.ctl_fd, POLLIN, &a);
        if (a.ctlq)
            ctl_flush(&a);
    }
    if (rc < 0)
        logf_("event loop failed: %s", strerror(-rc));

    /* No task goes unanswered: those that waited for their data fail (the
     * controller gets the errors if it is still there to read them). */
    expire_bulk(&a, 1);
    ctl_flush(&a);
    if (a.bulk)
        shoal_loop_unwatch(a.loop, shoal__bulk_eventfd(a.bulk));
    shoal__bulk_stop(a.bulk);
    free(a.parked);
    free(a.arrivals);
    stop_engines(&a);
    while (a.nprocs)
        drop_proc(&a, a.nprocs - 1, 1); /* releases only what the dead held: the arena refuses the living */
    while (a.npeers)
        drop_peer(&a, a.npeers - 1);
    while (a.nkept)
        kept_lane_free(&a, a.nkept - 1);
    free(a.kept);
    if (a.spare_fd >= 0)
        close(a.spare_fd);
    unlink(a.sock_path);
    close(a.listen_fd);
    while (a.ctlq) {
        struct ctlmsg *m = a.ctlq;
        a.ctlq = m->next;
        ctlmsg_free(m);
    }
    if (a.ctl_monitor) {
        zmq_socket_monitor(a.ctl, NULL, 0); /* before its reader goes: see bridge/curve.c */
        zmq_close(a.ctl_monitor);
    }
    zmq_close(a.ctl);
    zmq_ctx_term(a.ctx);
    shoal_loop_destroy(a.loop);
    shoal_arena_close(a.arena);
    logf_("stopped");
    return a.exit_code;
}
