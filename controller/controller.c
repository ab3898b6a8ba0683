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
 */
#define _GNU_SOURCE
#include <shoal/util.h>
#include <shoal/zwire.h>

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

struct node {
    struct route route;
    int alive;
    int32_t pid;
    char host[64];
    char socket[108]; /* the agent's Unix socket, for local clients */
    char loop[16];    /* the agent's event-loop backend */
    int64_t last_seen_ns;
};

struct engine {
    uint32_t node;
    uint32_t local;
    int32_t pid;
    int alive;
};

/* A task in flight: who asked, and which engines have yet to answer. */
struct task {
    struct task *next; /* hash chain */
    uint64_t id;
    struct route client;
    uint64_t client_msg; /* the client's msg_id: results reply to it */
    uint32_t n, remaining;
    uint32_t *engines;
    uint8_t *done;
};

#define TASK_BUCKETS 4096

struct controller {
    void *ctx, *clients, *agents;
    uint8_t key[SHOAL_WIRE_KEY];
    char client_ep[256], agent_ep[256];
    char conn_path[PATH_MAX + 32];
    int64_t heartbeat_ns;
    int64_t next_beat_ns;
    struct node nodes[MAX_NODES];
    uint32_t nnodes;
    struct engine *engines;
    uint32_t nengines;
    shoal_wire_counters client_counters, agent_counters;
    uint64_t next_msg_id;
    uint64_t next_task_id;
    struct task *tasks[TASK_BUCKETS];
    uint64_t ntasks;
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

static int write_connection_file(struct controller *c, const char *ip)
{
    char hex[2 * SHOAL_WIRE_KEY + 1];
    for (unsigned i = 0; i < SHOAL_WIRE_KEY; i++)
        snprintf(hex + 2 * i, 3, "%02x", c->key[i]);
    cJSON *j = cJSON_CreateObject();
    cJSON_AddNumberToObject(j, "version", 1);
    cJSON_AddNumberToObject(j, "pid", getpid());
    cJSON_AddStringToObject(j, "ip", ip);
    cJSON_AddStringToObject(j, "client", c->client_ep);
    cJSON_AddStringToObject(j, "agent", c->agent_ep);
    cJSON_AddStringToObject(j, "key", hex);
    cJSON_AddStringToObject(j, "signature_scheme", "hmac-sha256");
    char *text = cJSON_Print(j);
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

static int reply_json(struct controller *c, void *sock, const struct route *to, uint16_t type, uint64_t reply_to,
                      cJSON *body)
{
    char *text = cJSON_PrintUnformatted(body);
    if (!text)
        return -ENOMEM;
    shoal_msg_header h = {.type = type, .n_payload = 1, .msg_id = ++c->next_msg_id, .reply_to = reply_to,
                          .target = SHOAL_WIRE_TARGET_ALL};
    shoal_frame route = {to->id, to->len}, body_f = {text, strlen(text)};
    int rc = shoal_wire_send(sock, c->key, &route, &h, &body_f, 1);
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
        cJSON_AddStringToObject(n, "socket", c->nodes[i].socket);
        cJSON_AddStringToObject(n, "loop", c->nodes[i].loop);
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
    const char *names[2] = {"from_clients", "from_agents"};
    for (int i = 0; i < 2; i++) {
        cJSON *o = cJSON_AddObjectToObject(in, names[i]);
        cJSON_AddNumberToObject(o, "malformed", (double)k[i]->malformed);
        cJSON_AddNumberToObject(o, "oversized", (double)k[i]->oversized);
        cJSON_AddNumberToObject(o, "bad_signature", (double)k[i]->bad_signature);
    }
    return j;
}

static void route_of(shoal_wire_msg *m, struct route *r)
{
    r->len = m->has_route ? zmq_msg_size(&m->route) : 0;
    if (r->len > ROUTE_MAX)
        r->len = ROUTE_MAX;
    memcpy(r->id, m->has_route ? zmq_msg_data(&m->route) : "", r->len);
}

static int find_node(struct controller *c, const struct route *r)
{
    for (uint32_t i = 0; i < c->nnodes; i++)
        if (c->nodes[i].alive && c->nodes[i].route.len == r->len && !memcmp(c->nodes[i].route.id, r->id, r->len))
            return (int)i;
    return -1;
}

static void fail_engine_tasks(struct controller *c, uint32_t e, uint32_t n, const char *why);

static void node_lost(struct controller *c, uint32_t n, const char *why)
{
    c->nodes[n].alive = 0;
    for (uint32_t i = 0; i < c->nengines; i++)
        if (c->engines[i].node == n)
            c->engines[i].alive = 0;
    logf_("node %u (%s, pid %d) lost: %s", n, c->nodes[n].host, c->nodes[n].pid, why);
    fail_engine_tasks(c, UINT32_MAX, n, "was lost with its node");
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

/* Tells the client that engine `engine` could not run task `t`. */
static void fail_target(struct controller *c, const struct route *client, uint64_t client_msg, uint64_t task_id,
                        uint32_t engine, const char *why)
{
    char evalue[256];
    snprintf(evalue, sizeof evalue, "engine %u %s (task %" PRIu64 ")", engine, why, task_id);
    shoal_msg_header h = {.msg_id = ++c->next_msg_id, .task_id = task_id, .reply_to = client_msg};
    shoal_frame route = {client->id, client->len};
    shoal_wire_send_engine_error(c->clients, c->key, &route, &h, engine, evalue);
}

/* Marks engine e's part of task t done; frees t when nothing is left. */
static void task_target_done(struct controller *c, struct task **slot, uint32_t e)
{
    struct task *t = *slot;
    for (uint32_t i = 0; i < t->n; i++)
        if (t->engines[i] == e && !t->done[i]) {
            t->done[i] = 1;
            t->remaining--;
            break;
        }
    if (t->remaining == 0)
        task_free(c, slot);
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
                fail_target(c, &t->client, t->client_msg, t->id, te, why);
                t->done[i] = 1;
                t->remaining--;
            }
            if (t->remaining == 0)
                task_free(c, p);
            else
                p = &t->next;
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
    uint32_t n = (uint32_t)(tf.len / 4);
    uint32_t *targets = malloc((n ? n : c->nengines + 1) * sizeof *targets);
    if (!targets)
        return;
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
    if (!t || !done) {
        free(targets);
        free(t);
        free(done);
        return;
    }
    *t = (struct task){.id = task_id, .client = *from, .client_msg = m->hdr.msg_id, .n = n, .engines = targets,
                       .done = done};
    uint32_t *mine = malloc((n ? n : 1) * sizeof *mine);
    for (uint32_t i = 0; i < n; i++) {
        uint32_t e = targets[i];
        if (!mine) {
            fail_target(c, from, m->hdr.msg_id, task_id, e, "could not be reached (out of memory)");
            done[i] = 1;
        } else if (e >= c->nengines || !c->engines[e].alive) {
            fail_target(c, from, m->hdr.msg_id, task_id, e, e >= c->nengines ? "does not exist" : "is not running");
            done[i] = 1;
        } else {
            t->remaining++;
        }
    }
    /* One message per node, carrying that node's live targets. */
    for (uint32_t node = 0; node < c->nnodes && mine; node++) {
        uint32_t k = 0;
        for (uint32_t i = 0; i < n; i++)
            if (!done[i] && c->engines[targets[i]].node == node)
                mine[k++] = targets[i];
        if (!k)
            continue;
        shoal_msg_header h = {.type = SHOAL_MSG_TASK, .flags = m->hdr.flags, .n_payload = m->hdr.n_payload,
                              .n_buffers = m->hdr.n_buffers, .msg_id = ++c->next_msg_id, .task_id = task_id,
                              .target = k == 1 ? mine[0] : SHOAL_WIRE_TARGET_ALL};
        shoal_frame route = {c->nodes[node].route.id, c->nodes[node].route.len};
        shoal_frame first = {mine, (size_t)k * 4};
        int rc = shoal_wire_forward(c->agents, c->key, &route, &h, &first, 1, m->frames + 1, m->nframes - 1);
        if (rc < 0) {
            for (uint32_t i = 0; i < n; i++)
                if (!done[i] && c->engines[targets[i]].node == node) {
                    fail_target(c, from, m->hdr.msg_id, task_id, targets[i], "could not be reached");
                    done[i] = 1;
                    t->remaining--;
                }
        }
    }
    free(mine);
    if (t->remaining == 0) {
        free(t->engines);
        free(t->done);
        free(t);
        return;
    }
    struct task **slot = task_slot(c, task_id);
    *slot = t;
    c->ntasks++;
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
    shoal_msg_header h = m->hdr;
    h.msg_id = ++c->next_msg_id;
    h.reply_to = t->client_msg;
    shoal_frame route = {t->client.id, t->client.len};
    if (shoal_wire_forward(c->clients, c->key, &route, &h, NULL, 0, m->frames, m->nframes) < 0)
        logf_("a result of task %" PRIu64 " could not be delivered: its client is gone or not reading",
              m->hdr.task_id);
    if (m->hdr.type == SHOAL_MSG_RESULT)
        task_target_done(c, slot, m->hdr.sender);
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
            if (t->client.len != from->len || memcmp(t->client.id, from->id, from->len))
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
                shoal_frame route = {c->nodes[n].route.id, c->nodes[n].route.len};
                if (shoal_wire_send(c->agents, c->key, &route, &h, NULL, 0) < 0)
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
            shoal_frame route = {c->nodes[n].route.id, c->nodes[n].route.len}, f = {text, strlen(text)};
            if (shoal_wire_send(c->agents, c->key, &route, &h, &f, 1) < 0)
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
        if (n < 0) {
            if (c->nnodes == MAX_NODES) {
                reply_error(c, c->agents, from, m->hdr.msg_id, "too many nodes (%d)", MAX_NODES);
                break;
            }
            n = (int)c->nnodes++;
            struct node *nd = &c->nodes[n];
            nd->route = *from;
            nd->alive = 1;
            nd->pid = pid->valueint;
            snprintf(nd->host, sizeof nd->host, "%s", host->valuestring);
            cJSON *sock = cJSON_GetObjectItemCaseSensitive(body, "socket");
            if (cJSON_IsString(sock))
                snprintf(nd->socket, sizeof nd->socket, "%s", sock->valuestring);
            cJSON *loop = cJSON_GetObjectItemCaseSensitive(body, "loop");
            if (cJSON_IsString(loop))
                snprintf(nd->loop, sizeof nd->loop, "%s", loop->valuestring);
            nd->last_seen_ns = now_ns();
            logf_("node %d registered: %s, agent pid %d", n, nd->host, nd->pid);
        }
        reply = cJSON_CreateObject();
        cJSON_AddNumberToObject(reply, "node", n);
        cJSON_AddNumberToObject(reply, "heartbeat_ms", (double)(c->heartbeat_ns / 1000000));
        reply_json(c, c->agents, from, SHOAL_MSG_REGISTER_REPLY, m->hdr.msg_id, reply);
        break;
    }
    case SHOAL_MSG_ENGINE_EVENT: {
        cJSON *ev = cJSON_GetObjectItemCaseSensitive(body, "event");
        cJSON *local = cJSON_GetObjectItemCaseSensitive(body, "local");
        cJSON *pid = cJSON_GetObjectItemCaseSensitive(body, "pid");
        if (n < 0) {
            reply_error(c, c->agents, from, m->hdr.msg_id, "register the node before its engines");
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
        break;
    case SHOAL_MSG_RESULT:
    case SHOAL_MSG_OUTPUT:
        if (n < 0 || m->hdr.sender >= c->nengines || c->engines[m->hdr.sender].node != (uint32_t)n) {
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

/* Receives what is waiting on sock and handles it. */
static void drain_socket(struct controller *c, void *sock, int from_agents)
{
    for (int budget = 0; budget < 1024; budget++) {
        shoal_wire_msg m;
        shoal_wire_counters *k = from_agents ? &c->agent_counters : &c->client_counters;
        int rc = shoal_wire_recv(sock, c->key, true, NULL, ZMQ_DONTWAIT, &m, k);
        if (rc == -EAGAIN) {
            shoal_wire_msg_close(&m);
            return;
        }
        struct route from;
        route_of(&m, &from);
        if (rc < 0) {
            logf_("refused a message from %s: %s", from_agents ? "an agent" : "a client", shoal_wire_strerror(rc));
            if (m.has_route)
                reply_error(c, sock, &from, 0, "message refused: %s", shoal_wire_strerror(rc));
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

static void heartbeat(struct controller *c)
{
    int64_t now = now_ns();
    for (uint32_t i = 0; i < c->nnodes; i++) {
        struct node *nd = &c->nodes[i];
        if (!nd->alive)
            continue;
        if (now - nd->last_seen_ns > 3 * c->heartbeat_ns) {
            node_lost(c, i, "no heartbeat");
            continue;
        }
        shoal_msg_header h = {.type = SHOAL_MSG_HEARTBEAT, .msg_id = ++c->next_msg_id,
                              .target = SHOAL_WIRE_TARGET_ALL};
        shoal_frame route = {nd->route.id, nd->route.len};
        shoal_wire_send(c->agents, c->key, &route, &h, NULL, 0);
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

static void usage(FILE *f)
{
    fprintf(f, "usage: shoal-controller [--profile NAME] [--ip ADDR] [--heartbeat-ms N]\n"
               "  Binds on ADDR (default 127.0.0.1) and writes the connection file under\n"
               "  $SHOAL_DIR (default ~/.shoal)/profile_NAME/connection.json (mode 0600).\n");
}

/*
 * sndtimeo_ms bounds how long a send may wait for a peer whose queue is
 * full: 0 for clients (a client that stops reading loses its messages, not
 * the controller its progress), a little for agents (a task that cannot be
 * handed over fails as unreachable).
 */
static int bind_router(struct controller *c, void **sock, const char *ip, char *ep, size_t eplen, int sndtimeo_ms)
{
    *sock = zmq_socket(c->ctx, ZMQ_ROUTER);
    if (!*sock)
        return -zmq_errno();
    int zero = 0, one = 1;
    int64_t maxmsg = (int64_t)shoal_wire_default_limits.max_frame;
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
    long hb_ms = 1000;
    static const struct option opts[] = {
        {"profile", required_argument, NULL, 'p'}, {"ip", required_argument, NULL, 'i'},
        {"heartbeat-ms", required_argument, NULL, 'b'}, {"help", no_argument, NULL, 'h'}, {NULL, 0, NULL, 0}};
    for (int o; (o = getopt_long(argc, argv, "p:i:b:h", opts, NULL)) != -1;) {
        switch (o) {
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
    if (hb_ms < 10 || hb_ms > 600000 || strchr(profile, '/') || !*profile) {
        usage(stderr);
        return 2;
    }

    static struct controller c;
    c.heartbeat_ns = hb_ms * 1000000;
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
    int rc = bind_router(&c, &c.clients, ip, c.client_ep, sizeof c.client_ep, 0);
    if (rc == 0)
        rc = bind_router(&c, &c.agents, ip, c.agent_ep, sizeof c.agent_ep, 1000);
    if (rc < 0) {
        logf_("cannot bind on %s: %s", ip, zmq_strerror(-rc));
        return 1;
    }
    if ((rc = write_connection_file(&c, ip)) < 0) {
        logf_("cannot write %s: %s", c.conn_path, strerror(-rc));
        return 1;
    }
    logf_("listening: clients %s, agents %s; connection file %s", c.client_ep, c.agent_ep, c.conn_path);

    c.next_beat_ns = now_ns() + c.heartbeat_ns;
    while (!c.stopping) {
        zmq_pollitem_t items[3] = {
            {c.clients, 0, ZMQ_POLLIN, 0}, {c.agents, 0, ZMQ_POLLIN, 0}, {NULL, sfd, ZMQ_POLLIN, 0}};
        int64_t wait = (c.next_beat_ns - now_ns()) / 1000000;
        if (wait < 0)
            wait = 0;
        int n = zmq_poll(items, 3, (long)wait);
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
        if (n > 0 && (items[0].revents & ZMQ_POLLIN))
            drain_socket(&c, c.clients, 0);
        if (n > 0 && (items[1].revents & ZMQ_POLLIN))
            drain_socket(&c, c.agents, 1);
        if (now_ns() >= c.next_beat_ns)
            heartbeat(&c);
    }
    /* Give the SHUTDOWN messages a second to leave before closing. */
    int linger = 1000;
    zmq_setsockopt(c.agents, ZMQ_LINGER, &linger, sizeof linger);
    shutdown_agents(&c);
    unlink(c.conn_path);
    zmq_close(c.clients);
    zmq_close(c.agents);
    zmq_ctx_term(c.ctx);
    free(c.engines);
    logf_("stopped");
    return 0;
}
