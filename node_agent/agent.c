/*
 * node_agent/agent.c - shoal-agent: the one process per node.
 *
 * What is here today: it creates the node's arena, registers the node with
 * the controller named by the profile's connection file, answers its
 * heartbeats (and exits when they stop: a cluster whose controller died
 * leaves nothing behind), serves its Unix socket - where processes of the
 * same user get the arena's fd after an SO_PEERCRED check - and reclaims
 * what a local process held in the arena when its connection closes and the
 * process is gone. Everything waits in one event loop (loop.c). Engines and
 * tasks come next (issue 3).
 */
#define _GNU_SOURCE
#include <shoal/arena.h>
#include <shoal/zwire.h>

#include "loop.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define MAX_PEERS 4096

struct peer {
    int fd;     /* the connection; -1 once closed */
    int pidfd;  /* the process; its death releases what it held */
    pid_t pid;
};

struct agent {
    shoal_loop *loop;
    shoal_arena *arena;
    void *ctx, *ctl;
    int ctl_fd;
    uint8_t key[SHOAL_WIRE_KEY];
    char sock_path[sizeof(((struct sockaddr_un *)0)->sun_path)];
    int listen_fd, sig_fd;
    int node;
    int64_t heartbeat_ms;
    int64_t last_ctl_ns;
    struct peer peers[MAX_PEERS];
    int npeers;
    uint64_t next_msg_id;
    int exit_code;
};

static int64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static void logf_(const char *fmt, ...)
{
    char ts[32];
    time_t t = time(NULL);
    struct tm tm;
    strftime(ts, sizeof ts, "%Y-%m-%d %H:%M:%S", localtime_r(&t, &tm));
    fprintf(stderr, "%s [shoal-agent %d] ", ts, (int)getpid());
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
}

/* ---- the connection file ----------------------------------------------------- */

static int profile_dir(const char *profile, char *out, size_t len)
{
    const char *root = getenv("SHOAL_DIR"), *home = getenv("HOME");
    int n = root && *root ? snprintf(out, len, "%s/profile_%s", root, profile)
                          : snprintf(out, len, "%s/.shoal/profile_%s", home && *home ? home : ".", profile);
    return n < 0 || (size_t)n >= len ? -ENAMETOOLONG : 0;
}

/* Reads the controller's address and key from the connection file. */
static int read_connection(const char *path, char *endpoint, size_t eplen, uint8_t key[SHOAL_WIRE_KEY])
{
    FILE *f = fopen(path, "r");
    if (!f)
        return -errno;
    char buf[8192];
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    cJSON *j = cJSON_Parse(buf);
    cJSON *ep = cJSON_GetObjectItemCaseSensitive(j, "agent");
    cJSON *k = cJSON_GetObjectItemCaseSensitive(j, "key");
    int rc = -EPROTO;
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
    cJSON_Delete(j);
    return rc;
}

/* ---- the controller connection --------------------------------------------------- */

static int send_json(struct agent *a, uint16_t type, uint64_t reply_to, cJSON *body)
{
    char *text = body ? cJSON_PrintUnformatted(body) : NULL;
    shoal_frame f = {text, text ? strlen(text) : 0};
    shoal_msg_header h = {.type = type, .n_payload = text ? 1 : 0, .msg_id = ++a->next_msg_id,
                          .reply_to = reply_to, .sender = a->node < 0 ? 0 : (uint32_t)a->node,
                          .target = SHOAL_WIRE_TARGET_ALL};
    int rc = shoal_wire_send(a->ctl, a->key, NULL, &h, text ? &f : NULL, text ? 1 : 0);
    free(text);
    return rc;
}

static void on_controller_msg(struct agent *a, shoal_wire_msg *m)
{
    a->last_ctl_ns = now_ns();
    switch (m->hdr.type) {
    case SHOAL_MSG_HEARTBEAT:
        send_json(a, SHOAL_MSG_HEARTBEAT_ACK, m->hdr.msg_id, NULL);
        break;
    case SHOAL_MSG_SHUTDOWN:
        logf_("shutdown asked by the controller");
        shoal_loop_stop(a->loop);
        break;
    case SHOAL_MSG_REGISTER_REPLY:
        if (m->hdr.n_payload >= 1) {
            shoal_frame f = shoal_wire_frame(m, 0);
            cJSON *j = cJSON_ParseWithLength(f.data, f.len);
            cJSON *node = cJSON_GetObjectItemCaseSensitive(j, "node");
            cJSON *hb = cJSON_GetObjectItemCaseSensitive(j, "heartbeat_ms");
            if (cJSON_IsNumber(node)) {
                a->node = node->valueint;
                logf_("registered as node %d", a->node);
            }
            if (cJSON_IsNumber(hb) && hb->valueint > 0)
                a->heartbeat_ms = hb->valueint;
            cJSON_Delete(j);
        }
        break;
    case SHOAL_MSG_ERROR:
        if (m->hdr.n_payload >= 1) {
            shoal_frame f = shoal_wire_frame(m, 0);
            logf_("the controller says: %.*s", (int)f.len, (const char *)f.data);
        }
        break;
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

static void on_heartbeat_check(shoal_loop *l, uint64_t id, void *arg)
{
    (void)id;
    struct agent *a = arg;
    int64_t silent_ms = (now_ns() - a->last_ctl_ns) / 1000000;
    if (silent_ms > 3 * a->heartbeat_ms + 2000) {
        logf_("no word from the controller for %lld ms: it is gone; stopping", (long long)silent_ms);
        a->exit_code = 3;
        shoal_loop_stop(l);
    }
}

/* ---- the Unix socket: local processes get the arena ------------------------------ */

/* Sends the greeting and the arena's fd (SCM_RIGHTS). */
static int send_arena(struct agent *a, int fd)
{
    char text[256];
    shoal_arena_stats st;
    shoal_arena_get_stats(a->arena, &st);
    int n = snprintf(text, sizeof text, "{\"node\": %d, \"heap_size\": %llu, \"version\": 1}\n", a->node,
                     (unsigned long long)st.heap_size);
    struct iovec iov = {text, (size_t)n};
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
    int afd = shoal_arena_fd(a->arena);
    memcpy(CMSG_DATA(c), &afd, sizeof afd);
    ssize_t sent;
    do {
        sent = sendmsg(fd, &msg, MSG_NOSIGNAL);
    } while (sent < 0 && errno == EINTR);
    return sent == n ? 0 : -EIO;
}

/* Forgets peer i; if its process is gone, releases what it held in the
 * arena. */
static void drop_peer(struct agent *a, int i)
{
    struct peer p = a->peers[i];
    if (p.fd >= 0) {
        shoal_loop_unwatch(a->loop, p.fd);
        close(p.fd);
    }
    shoal_loop_unwatch(a->loop, p.pidfd);
    close(p.pidfd);
    a->peers[i] = a->peers[--a->npeers];
    int n = shoal_arena_reclaim(a->arena, p.pid);
    if (n > 0)
        logf_("released %d arena references of process %d, which is gone", n, (int)p.pid);
}

static int find_peer(struct agent *a, int fd)
{
    for (int i = 0; i < a->npeers; i++)
        if (a->peers[i].fd == fd || a->peers[i].pidfd == fd)
            return i;
    return -1;
}

/* The peer's process ended (its pidfd is readable). */
static void on_peer_exit(shoal_loop *l, int fd, uint32_t events, void *arg)
{
    (void)l;
    (void)events;
    struct agent *a = arg;
    int i = find_peer(a, fd);
    if (i >= 0)
        drop_peer(a, i);
}

/* The connection closed: a process may close it and live on, keeping its
 * arena references, so only its pidfd decides when to release them. */
static void on_peer(shoal_loop *l, int fd, uint32_t events, void *arg)
{
    (void)events;
    struct agent *a = arg;
    char buf[256];
    ssize_t n;
    while ((n = recv(fd, buf, sizeof buf, MSG_DONTWAIT)) > 0)
        ; /* nothing to say yet: peers only listen */
    if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
        int i = find_peer(a, fd);
        shoal_loop_unwatch(l, fd);
        close(fd);
        if (i >= 0)
            a->peers[i].fd = -1;
    }
}

static void on_listen(shoal_loop *l, int fd, uint32_t events, void *arg)
{
    (void)events;
    struct agent *a = arg;
    for (;;) {
        int c = accept4(fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
        if (c < 0)
            return; /* EAGAIN: drained */
        struct ucred cred;
        socklen_t len = sizeof cred;
        if (getsockopt(c, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0 || cred.uid != geteuid()) {
            logf_("refused a connection from uid %d: the arena is only for uid %d", len ? (int)cred.uid : -1,
                  (int)geteuid());
            close(c);
            continue;
        }
        int pidfd = (int)syscall(SYS_pidfd_open, cred.pid, 0);
        if (a->npeers == MAX_PEERS || pidfd < 0 || send_arena(a, c) < 0 ||
            shoal_loop_watch(l, c, POLLIN, on_peer, a) < 0) {
            logf_("could not serve process %d", (int)cred.pid);
            if (pidfd >= 0)
                close(pidfd);
            shoal_loop_unwatch(l, c);
            close(c);
            continue;
        }
        if (shoal_loop_watch(l, pidfd, POLLIN, on_peer_exit, a) < 0) {
            logf_("cannot watch process %d", (int)cred.pid);
            close(pidfd);
            shoal_loop_unwatch(l, c);
            close(c);
            continue;
        }
        a->peers[a->npeers++] = (struct peer){c, pidfd, cred.pid};
    }
}

/* Makes the runtime directory: ours, mode 0700, not a symlink. */
static int runtime_dir(char *out, size_t len)
{
    const char *xdg = getenv("XDG_RUNTIME_DIR");
    int n = xdg && *xdg ? snprintf(out, len, "%s/shoal", xdg) : snprintf(out, len, "/tmp/shoal-%d", (int)geteuid());
    if (n < 0 || (size_t)n >= len)
        return -ENAMETOOLONG;
    if (mkdir(out, 0700) < 0 && errno != EEXIST)
        return -errno;
    struct stat st;
    if (lstat(out, &st) < 0)
        return -errno;
    if (!S_ISDIR(st.st_mode) || st.st_uid != geteuid() || (st.st_mode & 077))
        return -EPERM;
    return 0;
}

static int listen_unix(struct agent *a)
{
    char dir[sizeof a->sock_path];
    int rc = runtime_dir(dir, sizeof dir - 32);
    if (rc < 0)
        return rc;
    int n = snprintf(a->sock_path, sizeof a->sock_path, "%s/agent-%d.sock", dir, (int)getpid());
    if (n < 0 || (size_t)n >= sizeof a->sock_path)
        return -ENAMETOOLONG;
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0)
        return -errno;
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    memcpy(sa.sun_path, a->sock_path, sizeof sa.sun_path);
    unlink(a->sock_path);
    if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0 || chmod(a->sock_path, 0600) < 0 || listen(fd, 128) < 0) {
        rc = -errno;
        close(fd);
        return rc;
    }
    a->listen_fd = fd;
    return 0;
}

static void on_signal(shoal_loop *l, int fd, uint32_t events, void *arg)
{
    (void)events;
    (void)arg;
    struct signalfd_siginfo si;
    while (read(fd, &si, sizeof si) == (ssize_t)sizeof si)
        logf_("stopping on signal %u", si.ssi_signo);
    shoal_loop_stop(l);
}

/* ---- main ------------------------------------------------------------------------- */

static void usage(FILE *f)
{
    fprintf(f, "usage: shoal-agent [--profile NAME] [--arena-size BYTES]\n"
               "  Joins the cluster whose connection file is $SHOAL_DIR (default ~/.shoal)/profile_NAME/\n"
               "  connection.json, with a shared-memory arena of BYTES (default half of RAM).\n");
}

int main(int argc, char **argv)
{
    const char *profile = "default";
    unsigned long long arena_size = 0;
    static const struct option opts[] = {{"profile", required_argument, NULL, 'p'},
                                         {"arena-size", required_argument, NULL, 's'},
                                         {"help", no_argument, NULL, 'h'},
                                         {NULL, 0, NULL, 0}};
    for (int o; (o = getopt_long(argc, argv, "p:s:h", opts, NULL)) != -1;) {
        switch (o) {
        case 'p':
            profile = optarg;
            break;
        case 's':
            arena_size = strtoull(optarg, NULL, 10);
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

    static struct agent a;
    a.node = -1;
    a.heartbeat_ms = 1000;
    a.listen_fd = a.sig_fd = -1;
    char dir[PATH_MAX - 32], conn[PATH_MAX], endpoint[512];
    if (profile_dir(profile, dir, sizeof dir) < 0) {
        logf_("the profile directory's path is too long");
        return 1;
    }
    snprintf(conn, sizeof conn, "%s/connection.json", dir);
    int rc = read_connection(conn, endpoint, sizeof endpoint, a.key);
    if (rc < 0) {
        logf_("cannot read %s (%s): is a controller running for profile '%s'?", conn, strerror(-rc), profile);
        return 1;
    }

    shoal_arena_opts ao = {.heap_size = arena_size, .flags = SHOAL_ARENA_PREFAULT_THREAD};
    if ((rc = shoal_arena_create(&ao, &a.arena)) < 0) {
        logf_("cannot create the arena: %s", strerror(-rc));
        return 1;
    }
    if ((rc = shoal_loop_create(&a.loop)) < 0) {
        logf_("cannot create the event loop: %s", strerror(-rc));
        return 1;
    }
    if ((rc = listen_unix(&a)) < 0) {
        logf_("cannot listen on a Unix socket: %s", strerror(-rc));
        return 1;
    }

    a.sig_fd = signalfd(-1, &sigs, SFD_CLOEXEC | SFD_NONBLOCK);

    a.ctx = zmq_ctx_new();
    a.ctl = zmq_socket(a.ctx, ZMQ_DEALER);
    int zero = 0;
    zmq_setsockopt(a.ctl, ZMQ_LINGER, &zero, sizeof zero);
    if (zmq_connect(a.ctl, endpoint) < 0) {
        logf_("cannot connect to %s: %s", endpoint, zmq_strerror(zmq_errno()));
        return 1;
    }
    size_t fdlen = sizeof a.ctl_fd;
    zmq_getsockopt(a.ctl, ZMQ_FD, &a.ctl_fd, &fdlen);

    char host[64] = "";
    gethostname(host, sizeof host - 1);
    cJSON *reg = cJSON_CreateObject();
    cJSON_AddStringToObject(reg, "host", host);
    cJSON_AddNumberToObject(reg, "pid", getpid());
    cJSON_AddStringToObject(reg, "socket", a.sock_path);
    cJSON_AddStringToObject(reg, "loop", shoal_loop_backend(a.loop));
    send_json(&a, SHOAL_MSG_REGISTER, 0, reg);
    cJSON_Delete(reg);
    a.last_ctl_ns = now_ns();

    uint64_t tid;
    if (shoal_loop_watch(a.loop, a.ctl_fd, POLLIN, on_ctl_fd, &a) < 0 ||
        shoal_loop_watch(a.loop, a.listen_fd, POLLIN, on_listen, &a) < 0 ||
        shoal_loop_watch(a.loop, a.sig_fd, POLLIN, on_signal, &a) < 0 ||
        shoal_loop_timer(a.loop, 500, 500, on_heartbeat_check, &a, &tid) < 0) {
        logf_("cannot set up the event loop");
        return 1;
    }
    /* The ZeroMQ fd only signals changes: look once, in case the reply came
     * in before we watched it. */
    on_ctl_fd(a.loop, a.ctl_fd, POLLIN, &a);
    logf_("serving: arena fd on %s, event loop on %s", a.sock_path, shoal_loop_backend(a.loop));

    rc = shoal_loop_run(a.loop);
    if (rc < 0)
        logf_("event loop failed: %s", strerror(-rc));

    while (a.npeers)
        drop_peer(&a, a.npeers - 1);
    unlink(a.sock_path);
    close(a.listen_fd);
    zmq_close(a.ctl);
    zmq_ctx_term(a.ctx);
    shoal_loop_destroy(a.loop);
    shoal_arena_close(a.arena);
    logf_("stopped");
    return a.exit_code;
}
