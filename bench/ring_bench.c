/*
 * bench/ring_bench.c - hand-off between two processes through a ring in the
 * arena, against a ZeroMQ round trip over ipc in the same run.
 *
 * Prints one line per case: p50 and p99 of a 64-byte ping-pong between two
 * processes, through a pair of rings with spinning, through the rings with
 * the futex doorbell only, and through ZeroMQ REQ/REP over ipc.
 */
#define _GNU_SOURCE
#include <shoal/arena.h>
#include <shoal/ring.h>

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

enum { NSLOTS = 256 };

static int64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static int cmp_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return x < y ? -1 : x > y;
}

static void report(const char *variant, int64_t *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, cmp_i64);
    printf("bench=ring case=round_trip variant=%s n=%d p50_us=%.2f p99_us=%.2f\n", variant, n, (double)v[n / 2] / 1e3,
           (double)v[n * 99 / 100] / 1e3);
    fflush(stdout);
}

struct rings {
    shoal_arena *arena;
    shoal_handle block;
    shoal_ring a, b; /* a: parent -> child, b: child -> parent */
};

static void make(struct rings *r)
{
    shoal_arena_opts o = {.heap_size = 8u << 20};
    if (shoal_arena_create(&o, &r->arena) < 0 ||
        shoal_arena_alloc(r->arena, 2 * shoal_ring_size(NSLOTS), &r->block) < 0) {
        fprintf(stderr, "ring_bench: cannot make the arena\n");
        exit(1);
    }
    uint8_t *m = (uint8_t *)shoal_arena_base(r->arena) + r->block.offset;
    shoal_ring_init(m, shoal_ring_size(NSLOTS), NSLOTS, &r->a);
    shoal_ring_init(m + shoal_ring_size(NSLOTS), shoal_ring_size(NSLOTS), NSLOTS, &r->b);
}

/* Child side: echo n slots from a to b. */
static void echo(struct rings *r, int n, int64_t spin)
{
    uint8_t s[SHOAL_RING_SLOT];
    for (int i = 0; i < n; i++) {
        while (shoal_ring_pop(&r->a, s, 1) == 0)
            shoal_ring_wait(&r->a, spin, -1);
        while (shoal_ring_push(&r->b, s, 1) == 0)
            ;
    }
}

static void ring_round_trip(const char *variant, int64_t spin, int n)
{
    struct rings r;
    make(&r);
    pid_t pid = fork();
    if (pid == 0) {
        echo(&r, n + 100, spin);
        _exit(0);
    }
    int64_t *v = malloc((size_t)n * sizeof *v);
    uint8_t s[SHOAL_RING_SLOT] = {0};
    for (int i = 0; i < n + 100; i++) {
        int64_t t = now_ns();
        shoal_ring_push(&r.a, s, 1);
        while (shoal_ring_pop(&r.b, s, 1) == 0)
            shoal_ring_wait(&r.b, spin, -1);
        if (i >= 100)
            v[i - 100] = now_ns() - t;
    }
    waitpid(pid, NULL, 0);
    report(variant, v, n);
    free(v);
    shoal_arena_close(r.arena);
}

/* The peer mechanism: a ZeroMQ REQ/REP round trip over ipc, 64 bytes. */
static void zmq_round_trip(int n)
{
    char ep[96];
    snprintf(ep, sizeof ep, "ipc:///tmp/shoal-ring-bench-%d", (int)getpid());
    void *ctx = zmq_ctx_new(), *req = zmq_socket(ctx, ZMQ_REQ);
    if (zmq_bind(req, ep) < 0) {
        fprintf(stderr, "ring_bench: bind %s: %s\n", ep, zmq_strerror(zmq_errno()));
        exit(1);
    }
    pid_t pid = fork();
    if (pid == 0) {
        void *c2 = zmq_ctx_new(), *rep = zmq_socket(c2, ZMQ_REP);
        zmq_connect(rep, ep);
        char buf[SHOAL_RING_SLOT];
        for (int i = 0; i < n + 100; i++) {
            zmq_recv(rep, buf, sizeof buf, 0);
            zmq_send(rep, buf, sizeof buf, 0);
        }
        zmq_close(rep);
        zmq_ctx_term(c2);
        _exit(0);
    }
    int64_t *v = malloc((size_t)n * sizeof *v);
    char buf[SHOAL_RING_SLOT] = {0};
    for (int i = 0; i < n + 100; i++) {
        int64_t t = now_ns();
        zmq_send(req, buf, sizeof buf, 0);
        zmq_recv(req, buf, sizeof buf, 0);
        if (i >= 100)
            v[i - 100] = now_ns() - t;
    }
    waitpid(pid, NULL, 0);
    report("zmq_ipc_req_rep", v, n);
    free(v);
    zmq_close(req);
    zmq_ctx_term(ctx);
    unlink(ep + strlen("ipc://"));
}

int main(void)
{
    ring_round_trip("ring_spin", 200 * 1000, 200000);
    ring_round_trip("ring_futex", 0, 20000);
    zmq_round_trip(20000);
    return 0;
}
