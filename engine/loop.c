/*
 * engine/loop.c - the engine's task loop (module _shoal_engine, built into
 * shoal-engine).
 *
 * shoal._engine joins the agent (socket, arena, rings, doorbell) and then
 * hands its Engine to serve(), which runs here until the engine stops:
 *
 *   wait on the doorbell that every ring of this engine rings (the agent's
 *   task ring, each local client's lane, each client's pool), pop slots,
 *   keep or free reply blocks (RELEASE), open lanes and pools, and for each
 *   task call Engine.task(), which unpickles and runs the user's code and
 *   pickles what it returns; then pack the reply into an arena block, push
 *   its RESULT slot and keep the block until its RELEASE comes back.
 *
 * Output a task prints goes out while it runs through output(), which
 * shoal._engine's streams call. docs/engine.md has the formats; the loop's
 * order (the agent's ring, then each lane, then one pool task) is the
 * Python loop's it replaced.
 *
 * Every Python object the loop holds is referenced; the rings are views
 * (shoal_ring) into Blocks it holds. One thread (the interpreter's main
 * one) runs the loop and holds the GIL but while it waits (and while it
 * sleeps for room on a full lane).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <shoal/ring.h>

#include <errno.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#include "loop.h"

enum { KIND_TASK = 1, KIND_SHUTDOWN, KIND_RESULT, KIND_RELEASE, KIND_OUTPUT, KIND_LANE, KIND_POOL };

/* A ring slot (_msgblock.SLOT, "<QIIQQQI20x"). */
typedef struct {
    uint64_t task_id;
    uint32_t kind, flags;
    uint64_t off, len, gen;
    uint32_t sender;
    uint8_t zero[20];
} slot_t;
_Static_assert(sizeof(slot_t) == SHOAL_RING_SLOT, "a slot is 64 bytes");

#define LANE_HDR_SIZE 128u
#define POP_MAX 64u
#define OUTPUT_MAX_PIECES 256 /* a task's output blocks in flight; the reply carries the rest */
#define FINISH_NS 5000000000LL
#define SPIN_WINDOW 4 /* spin after a wait shorter than this many spins (next_spin) */

typedef struct {
    shoal_ring r;
    PyObject *block;
} pool_t;

/* Where tasks come from and replies go: the agent's rings, or one lane. */
typedef struct {
    shoal_ring sq, cq;  /* tasks in, replies out */
    PyObject *lane;     /* the Lane (it holds the lane's blocks); NULL for the agent */
    PyObject *replies;  /* reply block offset -> (Block, output Blocks, kept objects) */
    pool_t *pools;      /* the client's pools this engine takes from too */
    size_t npools, cap;
    int in_arena;       /* large result buffers go in arena blocks: the client is on this node */
    int gone;           /* closed: dropped at the end of the round */
} sink_t;

typedef struct {
    PyObject *py, *arena, *task, *lane_type, *unpack;
    uint32_t id;
    void *bell;         /* the doorbell every ring of ours rings */
    int64_t spin_ns;
    sink_t agent;
    sink_t **lanes;
    size_t nlanes, cap;
    shoal_ring **waited; /* rebuilt when lanes or pools come or go */
    size_t nwaited;
    int stale, stopping, abort_queued;
    /* the running task: where its output goes */
    sink_t *cur;
    uint64_t task_id;
    PyObject *outputs;  /* its output Blocks */
    int pushing;        /* sink_push waits for room, without the GIL */
} engine_t;

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Prints what went wrong to the engine's real stderr (the agent's log), as
 * the Python loop did, and clears the error. */
static void complain(engine_t *e, const char *what)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyObject *s = value ? PyObject_Str(value) : NULL;
    const char *msg = s ? PyUnicode_AsUTF8(s) : NULL;
    PyErr_Clear();
    fprintf(stderr, "shoal-engine %u: %s: %s\n", e->id, what, msg ? msg : "unknown error");
    fflush(stderr);
    Py_XDECREF(s);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
}

/* The writable bytes of a Block we hold (the Block keeps them mapped). */
static uint8_t *block_bytes(PyObject *block, size_t *len)
{
    Py_buffer v;
    if (PyObject_GetBuffer(block, &v, PyBUF_WRITABLE) < 0)
        return NULL;
    uint8_t *p = v.buf;
    *len = (size_t)v.len;
    PyBuffer_Release(&v);
    return p;
}

static PyObject *acquire(engine_t *e, const slot_t *s, int writable)
{
    return PyObject_CallMethod(e->arena, "acquire_bytes", "(KKK)KKi", (unsigned long long)s->off,
                               (unsigned long long)s->len, (unsigned long long)s->gen, 0ULL,
                               (unsigned long long)s->len, !writable);
}

static int sink_init(sink_t *k, int in_arena)
{
    memset(k, 0, sizeof *k);
    k->in_arena = in_arena;
    k->replies = PyDict_New();
    return k->replies ? 0 : -1;
}

static void sink_clear(sink_t *k)
{
    for (size_t i = 0; i < k->npools; i++)
        Py_XDECREF(k->pools[i].block);
    PyMem_Free(k->pools);
    k->pools = NULL;
    k->npools = k->cap = 0;
    Py_CLEAR(k->replies);
    Py_CLEAR(k->lane);
}

static void release(sink_t *k, uint64_t off)
{
    PyObject *key = PyLong_FromUnsignedLongLong(off);
    if (!key || PyDict_DelItem(k->replies, key) < 0)
        PyErr_Clear(); /* not ours, or already released */
    Py_XDECREF(key);
}

static engine_t *running_engine; /* while serve() runs: output() needs it */

/* Puts a completion on the sink's ring; 0, or -1 if the other side is gone.
 * The agent drains its ring at once: a full one is waited for with a
 * yield. A client drains its lane only when it waits or submits: a full
 * lane is waited for in sleeps of 200 us, without the GIL, so that the
 * user's threads on this engine go on meanwhile; output() sends nothing
 * while we wait (e->pushing), so that the ring keeps one producer. */
static int sink_push(engine_t *e, sink_t *k, const slot_t *s)
{
    for (;;) {
        int rc = shoal_ring_push(&k->cq, s, 1);
        if (rc == 1)
            return 0;
        if (rc < 0)
            return -1;
        if (!k->in_arena) {
            sched_yield();
            continue;
        }
        struct timespec ts = {0, 200000};
        e->pushing = 1;
        Py_BEGIN_ALLOW_THREADS
        nanosleep(&ts, NULL);
        Py_END_ALLOW_THREADS
        e->pushing = 0;
    }
}

/* frames (n bytes-like objects, the first npayload the payload) in one
 * new message block (Arena.pack); the Block, or NULL with an error. */
static PyObject *pack_frames(engine_t *e, PyObject *const *frames, Py_ssize_t n, Py_ssize_t npayload)
{
    PyObject *list = PyList_New(n);
    if (!list)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++)
        PyList_SET_ITEM(list, i, Py_NewRef(frames[i]));
    PyObject *block = PyObject_CallMethod(e->arena, "pack", "On", list, npayload);
    Py_DECREF(list);
    return block;
}

/* The (offset, length, generation) of a Block we made. */
static int block_handle(PyObject *block, slot_t *s)
{
    PyObject *h = PyObject_GetAttrString(block, "handle");
    int ok = h && PyArg_ParseTuple(h, "KKK", &s->off, &s->len, &s->gen);
    Py_XDECREF(h);
    return ok ? 0 : -1;
}

static int run_task(engine_t *e, uint64_t task_id, const slot_t *in, sink_t *k);

/* ---- lanes and pools ---- */

static int grow(void **arr, size_t *cap, size_t need, size_t size)
{
    if (need <= *cap)
        return 0;
    size_t n = *cap ? *cap * 2 : 4;
    void *p = PyMem_Realloc(*arr, n * size);
    if (!p) {
        PyErr_NoMemory();
        return -1;
    }
    *arr = p;
    *cap = n;
    return 0;
}

static void open_lane(engine_t *e, const slot_t *s)
{
    PyObject *lane = PyObject_CallFunction(e->lane_type, "O(KKK)", e->arena, (unsigned long long)s->off,
                                           (unsigned long long)s->len, (unsigned long long)s->gen);
    sink_t *k = NULL;
    PyObject *block = NULL, *bell = NULL, *cbell = NULL;
    size_t len = 0, blen = 0, clen = 0;
    uint8_t *mem, *eb, *cb;
    if (!lane || !(block = PyObject_GetAttrString(lane, "block")) ||
        !(bell = PyObject_GetAttrString(lane, "engine_bell")) ||
        !(cbell = PyObject_GetAttrString(lane, "client_bell")) || !(mem = block_bytes(block, &len)) ||
        !(eb = block_bytes(bell, &blen)) || !(cb = block_bytes(cbell, &clen)))
        goto fail;
    if (!(k = PyMem_Malloc(sizeof *k)) || sink_init(k, 1) < 0 || grow((void **)&e->lanes, &e->cap, e->nlanes + 1, sizeof *e->lanes) < 0)
        goto fail;
    /* Lane() checked the header and that both rings fit in the block. */
    if (shoal_ring_open(mem + LANE_HDR_SIZE, len - LANE_HDR_SIZE, &k->sq) < 0 ||
        shoal_ring_open(mem + LANE_HDR_SIZE + shoal_ring_size(k->sq.nslots),
                        len - LANE_HDR_SIZE - shoal_ring_size(k->sq.nslots), &k->cq) < 0 ||
        blen < SHOAL_RING_BELL_OFFSET + SHOAL_DOORBELL_SIZE || clen < SHOAL_DOORBELL_SIZE) {
        PyErr_SetString(PyExc_ValueError, "not a lane");
        goto fail;
    }
    shoal_ring_set_doorbell(&k->sq, eb + SHOAL_RING_BELL_OFFSET);
    shoal_ring_set_doorbell(&k->cq, cb);
    k->lane = lane;
    e->lanes[e->nlanes++] = k;
    e->stale = 1;
    Py_DECREF(block);
    Py_DECREF(bell);
    Py_DECREF(cbell);
    return;
fail:
    complain(e, "a lane the agent gave could not be opened");
    if (k) {
        if (k->replies)
            sink_clear(k);
        PyMem_Free(k);
    }
    Py_XDECREF(lane);
    Py_XDECREF(block);
    Py_XDECREF(bell);
    Py_XDECREF(cbell);
}

static void open_pool(engine_t *e, sink_t *k, const slot_t *s)
{
    PyObject *block = acquire(e, s, 1);
    size_t len = 0;
    uint8_t *mem = block ? block_bytes(block, &len) : NULL;
    pool_t p = {.block = block};
    if (!mem)
        goto fail;
    if (shoal_ring_open(mem, len, &p.r) < 0 || !shoal_ring_is_pool(&p.r)) {
        PyErr_SetString(PyExc_ValueError, "not a pool");
        goto fail;
    }
    if (grow((void **)&k->pools, &k->cap, k->npools + 1, sizeof *k->pools) < 0)
        goto fail;
    shoal_ring_set_doorbell(&p.r, e->bell); /* its client rings ours */
    k->pools[k->npools++] = p;
    e->stale = 1;
    return;
fail:
    complain(e, "a pool its client gave could not be opened");
    Py_XDECREF(block);
}

static void drop_pool(engine_t *e, sink_t *k, size_t i)
{
    Py_XDECREF(k->pools[i].block);
    memmove(&k->pools[i], &k->pools[i + 1], (k->npools - i - 1) * sizeof *k->pools);
    k->npools--;
    e->stale = 1;
}

/* Lanes found closed are dropped here, between rounds, never while a round
 * walks them: their replies and pools go with them. */
static void sweep(engine_t *e)
{
    size_t j = 0;
    for (size_t i = 0; i < e->nlanes; i++) {
        sink_t *k = e->lanes[i];
        if (k->gone) {
            if (e->cur == k)
                e->cur = &e->agent;
            sink_clear(k);
            PyMem_Free(k);
            e->stale = 1;
        } else {
            e->lanes[j++] = k;
        }
    }
    e->nlanes = j;
}

/* Every ring the engine waits on: the agent's, each lane's, each pool's. */
static int waited(engine_t *e)
{
    if (!e->stale)
        return 0;
    size_t n = 1;
    for (size_t i = 0; i < e->nlanes; i++)
        n += 1 + e->lanes[i]->npools;
    shoal_ring **w = PyMem_Realloc(e->waited, n * sizeof *w);
    if (!w) {
        PyErr_NoMemory();
        return -1;
    }
    size_t j = 0;
    w[j++] = &e->agent.sq;
    for (size_t i = 0; i < e->nlanes; i++) {
        sink_t *k = e->lanes[i];
        if (k->gone)
            continue;
        w[j++] = &k->sq;
        for (size_t p = 0; p < k->npools; p++)
            w[j++] = &k->pools[p].r;
    }
    e->waited = w;
    e->nwaited = j;
    e->stale = 0;
    return 0;
}

/* ---- slots ---- */

/* Handles one batch of slots popped from sink k's ring (the agent's when
 * k is &e->agent). Returns 1 on SHUTDOWN from the agent (stop now), 0, or
 * -1 with an error set. */
static int dispatch(engine_t *e, sink_t *k, const slot_t *s, int n)
{
    int agent = k == &e->agent;
    for (int i = 0; i < n; i++) {
        switch (s[i].kind) {
        case KIND_SHUTDOWN:
            if (agent)
                return 1;
            break;
        case KIND_RELEASE:
            release(k, s[i].off);
            break;
        case KIND_TASK:
            /* Not after a shutdown; and on a lane, not when nobody would take the reply. */
            if (e->stopping || (!agent && shoal_ring_closed(&k->cq)))
                break;
            if (run_task(e, s[i].task_id, &s[i], k) < 0)
                return -1;
            break;
        case KIND_LANE:
            if (agent && !e->stopping)
                open_lane(e, &s[i]);
            break;
        case KIND_POOL:
            if (!agent)
                open_pool(e, k, &s[i]);
            break;
        default:
            break;
        }
    }
    return 0;
}

/* Answers TaskAborted to every task waiting in k's ring, as an IPython
 * kernel's stop_on_error aborts its queue after a failed cell; other slots
 * are handled as the loop handles them. */
static int abort_queued_behind(engine_t *e, sink_t *k)
{
    slot_t s[POP_MAX];
    for (;;) {
        int n = shoal_ring_pop(&k->sq, s, POP_MAX);
        if (n <= 0)
            return 0;
        for (int i = 0; i < n; i++) {
            switch (s[i].kind) {
            case KIND_TASK: /* abort_queued: TaskAborted */
                if (run_task(e, s[i].task_id, &s[i], k) < 0)
                    return -1;
                break;
            case KIND_RELEASE:
                release(k, s[i].off);
                break;
            case KIND_POOL:
                if (k != &e->agent)
                    open_pool(e, k, &s[i]);
                break;
            case KIND_LANE:
                if (k == &e->agent)
                    open_lane(e, &s[i]);
                break;
            case KIND_SHUTDOWN:
                e->stopping = 1;
                break;
            default:
                break;
            }
        }
    }
}

/* The frames of a task's message block (_core.unpack_frames): sets
 * *payload and *buffers to lists of memoryviews of msg and *flags to its
 * flags. Returns 0, or 1 if they cannot be had (msg is not a well-formed
 * message block, say): the task's Python side then says why. */
static int frames_of(engine_t *e, PyObject *msg, PyObject **payload, PyObject **buffers, uint32_t *flags)
{
    *payload = *buffers = NULL;
    PyObject *both = PyObject_CallOneArg(e->unpack, msg);
    if (!both) {
        PyErr_Clear(); /* Engine.task unpacks it again, and answers with the error */
        return 1;
    }
    Py_buffer v;
    if (PyObject_GetBuffer(msg, &v, PyBUF_SIMPLE) < 0) {
        PyErr_Clear();
        Py_DECREF(both);
        return 1;
    }
    memcpy(flags, (const uint8_t *)v.buf + 12, 4); /* unpack_frames checked the header is there */
    PyBuffer_Release(&v);
    *payload = Py_NewRef(PyTuple_GET_ITEM(both, 0));
    *buffers = Py_NewRef(PyTuple_GET_ITEM(both, 1));
    Py_DECREF(both);
    return 0;
}

/* Runs one task and answers it: Engine.task() runs it and returns (meta,
 * value payload, value frames, kept objects, stop_on_error); the reply
 * block holds [meta, payload] + frames. Returns 0, or -1 when the loop
 * cannot go on (an error set). */
static int run_task(engine_t *e, uint64_t task_id, const slot_t *in, sink_t *k)
{
    e->cur = k;
    e->task_id = task_id;
    Py_XSETREF(e->outputs, PyList_New(0));
    if (!e->outputs)
        return -1;
    /* The task's message block, decoded; one that cannot be acquired or
     * is not well formed goes to Engine.task as None, which says why. */
    PyObject *msg = acquire(e, in, 0), *payload = NULL, *buffers = NULL;
    uint32_t flags = 0;
    if (!msg)
        PyErr_Clear();
    else
        frames_of(e, msg, &payload, &buffers, &flags);
    PyObject *res = PyObject_CallFunction(e->task, "K(KKK)OOOIii", (unsigned long long)task_id,
                                          (unsigned long long)in->off, (unsigned long long)in->len,
                                          (unsigned long long)in->gen, msg ? msg : Py_None,
                                          payload ? payload : Py_None, buffers ? buffers : Py_None, flags,
                                          k->in_arena, e->abort_queued);
    Py_XDECREF(msg);
    Py_XDECREF(payload);
    Py_XDECREF(buffers);
    if (!res)
        return -1; /* Engine.task catches what the task raises: this is the engine's own failure */
    PyObject *meta, *value, *frames, *keep;
    int stop_on_error;
    if (!PyArg_ParseTuple(res, "OOO!Op", &meta, &value, &PyList_Type, &frames, &keep, &stop_on_error)) {
        Py_DECREF(res);
        return -1;
    }
    Py_ssize_t nf = PyList_GET_SIZE(frames);
    PyObject **all = PyMem_Malloc((size_t)(nf + 2) * sizeof *all);
    if (!all) {
        Py_DECREF(res);
        PyErr_NoMemory();
        return -1;
    }
    all[0] = meta;
    all[1] = value;
    for (Py_ssize_t i = 0; i < nf; i++)
        all[i + 2] = PyList_GET_ITEM(frames, i);
    PyObject *block = pack_frames(e, all, nf + 2, 2);
    PyMem_Free(all);
    if (!block) {
        /* No arena memory for it, say: a small reply says so. */
        PyObject *type, *exc, *tb;
        PyErr_Fetch(&type, &exc, &tb);
        PyErr_NormalizeException(&type, &exc, &tb);
        PyObject *small = PyObject_CallMethod(e->py, "failed_reply", "OO", meta, exc ? exc : Py_None);
        Py_XDECREF(type);
        Py_XDECREF(exc);
        Py_XDECREF(tb);
        PyObject *two[2] = {small, PyBytes_FromStringAndSize(NULL, 0)};
        block = small && two[1] ? pack_frames(e, two, 2, 2) : NULL;
        Py_XDECREF(two[0]);
        Py_XDECREF(two[1]);
        if (!block) {
            complain(e, "cannot answer a task");
            Py_DECREF(res);
            return 0;
        }
        keep = Py_None;
    }
    slot_t out = {.task_id = task_id, .kind = KIND_RESULT, .sender = e->id};
    PyObject *key = NULL, *kept = NULL;
    if (block_handle(block, &out) < 0 || !(key = PyLong_FromUnsignedLongLong(out.off)) ||
        !(kept = PyTuple_Pack(3, block, e->outputs, keep)) || PyDict_SetItem(k->replies, key, kept) < 0) {
        Py_XDECREF(key);
        Py_XDECREF(kept);
        Py_DECREF(block);
        Py_DECREF(res);
        return -1;
    }
    Py_DECREF(kept);
    Py_DECREF(block);
    Py_DECREF(res);
    Py_CLEAR(e->outputs);
    if (stop_on_error) {
        /* What is queued behind the failed cell is aborted before its reply
         * goes: nothing queued yet was sent in answer to it. */
        e->abort_queued = 1;
        if (abort_queued_behind(e, k) < 0) {
            Py_DECREF(key);
            return -1;
        }
    }
    if (sink_push(e, k, &out) < 0 && PyDict_DelItem(k->replies, key) < 0) /* its client is gone */
        PyErr_Clear();
    Py_DECREF(key);
    return 0;
}

/* One round of a lane: its slots. A closed (its client is gone) or broken
 * lane is marked gone: its replies and pools go with it. */
static int serve_lane(engine_t *e, sink_t *k)
{
    slot_t s[POP_MAX];
    int n = shoal_ring_pop(&k->sq, s, POP_MAX);
    if (n < 0) {
        k->gone = 1;
        e->stale = 1;
        return 0;
    }
    int rc = dispatch(e, k, s, n);
    e->abort_queued = 0; /* the batch that held a failed cell is answered */
    return rc < 0 ? -1 : 0;
}

/* Runs one task from the first of our pools that has one (the lanes take
 * turns going first). */
static int take_from_pools(engine_t *e)
{
    if (e->nlanes > 1) {
        sink_t *first = e->lanes[0];
        memmove(&e->lanes[0], &e->lanes[1], (e->nlanes - 1) * sizeof *e->lanes);
        e->lanes[e->nlanes - 1] = first;
    }
    for (size_t i = 0; i < e->nlanes; i++) {
        sink_t *k = e->lanes[i];
        for (size_t p = 0; !k->gone && p < k->npools;) {
            slot_t s;
            uint64_t pos;
            int rc = shoal_pool_take(&k->pools[p].r, e->id, &s, &pos);
            if (rc < 0) { /* closed by its client (or broken): drop it */
                drop_pool(e, k, p);
                continue;
            }
            if (rc == 0) {
                p++;
                continue;
            }
            if (s.kind == KIND_TASK && !shoal_ring_closed(&k->cq)) {
                if (run_task(e, s.task_id, &s, k) < 0)
                    return -1;
                e->abort_queued = 0; /* a task of its own: no batch behind it */
            }
            return 1;
        }
    }
    return 0;
}

/* After a shutdown task: waits (a while) for the replies it sent to be
 * taken, which would go with it otherwise; tasks sent after the shutdown
 * are not run (their senders hear that it stopped). */
static int finish(engine_t *e)
{
    int64_t deadline = now_ns() + FINISH_NS;
    sink_t **open = PyMem_Malloc((1 + e->nlanes) * sizeof *open);
    shoal_ring **rings = PyMem_Malloc((1 + e->nlanes) * sizeof *rings);
    if (!open || !rings) {
        PyMem_Free(open);
        PyMem_Free(rings);
        return 0; /* nothing to wait with: go */
    }
    size_t n = 0;
    open[n++] = &e->agent;
    for (size_t i = 0; i < e->nlanes; i++)
        if (!e->lanes[i]->gone)
            open[n++] = e->lanes[i];
    for (;;) {
        int waiting = 0;
        for (size_t i = 0; i < n; i++)
            waiting |= PyDict_GET_SIZE(open[i]->replies) > 0;
        if (!waiting || now_ns() >= deadline)
            break;
        for (size_t i = 0; i < n; i++)
            rings[i] = &open[i]->sq;
        Py_BEGIN_ALLOW_THREADS
        shoal_doorbell_wait(e->bell, rings, n, 0, 50000000);
        Py_END_ALLOW_THREADS
        for (size_t i = 0; i < n;) {
            slot_t s[POP_MAX];
            int got = shoal_ring_pop(&open[i]->sq, s, POP_MAX);
            if (got < 0) {
                PyDict_Clear(open[i]->replies); /* closed: nobody will take them */
                open[i] = open[--n];            /* and a closed ring would wake us for ever */
                continue;
            }
            for (int j = 0; j < got; j++)
                if (s[j].kind == KIND_RELEASE)
                    release(open[i], s[j].off);
            i++;
        }
    }
    PyMem_Free(open);
    PyMem_Free(rings);
    return 0;
}

/* ---- the module ---- */

static void engine_clear(engine_t *e)
{
    for (size_t i = 0; i < e->nlanes; i++) {
        sink_clear(e->lanes[i]);
        PyMem_Free(e->lanes[i]);
    }
    PyMem_Free(e->lanes);
    PyMem_Free(e->waited);
    sink_clear(&e->agent);
    Py_CLEAR(e->outputs);
    Py_CLEAR(e->task);
    Py_CLEAR(e->lane_type);
    Py_CLEAR(e->unpack);
    Py_CLEAR(e->arena);
}

static int engine_init(engine_t *e, PyObject *py)
{
    memset(e, 0, sizeof *e);
    e->py = py;
    PyObject *rings = NULL, *msgblock = NULL;
    unsigned long id;
    long nslots, fd;
    double spin;
    PyObject *v;
#define ATTR(name, conv, dst)                                          \
    if (!(v = PyObject_GetAttrString(py, name)))                       \
        goto fail;                                                     \
    dst = conv(v);                                                     \
    Py_DECREF(v);                                                      \
    if (PyErr_Occurred())                                              \
        goto fail;
    ATTR("id", PyLong_AsUnsignedLong, id)
    ATTR("nslots", PyLong_AsLong, nslots)
    ATTR("doorbell", PyLong_AsLong, fd)
    ATTR("spin", PyFloat_AsDouble, spin)
#undef ATTR
    e->id = (uint32_t)id;
    e->spin_ns = (int64_t)(spin * 1e9);
    if (!(e->arena = PyObject_GetAttrString(py, "arena")) || !(e->task = PyObject_GetAttrString(py, "task")) ||
        !(rings = PyObject_GetAttrString(py, "rings")) || !(msgblock = PyImport_ImportModule("shoal._msgblock")) ||
        !(e->lane_type = PyObject_GetAttrString(msgblock, "Lane")) ||
        !(e->unpack = PyObject_GetAttrString(msgblock, "unpack_frames")) || sink_init(&e->agent, 0) < 0)
        goto fail;
    size_t len = 0;
    uint8_t *mem = block_bytes(rings, &len);
    size_t size = shoal_ring_size((uint32_t)nslots);
    if (!mem)
        goto fail;
    if (len < 2 * size || shoal_ring_open(mem, len, &e->agent.sq) < 0 ||
        shoal_ring_open(mem + size, len - size, &e->agent.cq) < 0) {
        PyErr_SetString(PyExc_ValueError, "the agent's rings are not rings");
        goto fail;
    }
    /* Our doorbell is the task ring's own: the agent rings it, and so do
     * local clients, through their lanes' task rings. */
    e->bell = mem + SHOAL_RING_BELL_OFFSET;
    shoal_ring_set_notify_fd(&e->agent.cq, (int)fd);
    e->cur = &e->agent;
    e->stale = 1;
    Py_DECREF(rings); /* the Engine holds it, and outlives the loop */
    Py_DECREF(msgblock);
    return 0;
fail:
    Py_XDECREF(rings);
    Py_XDECREF(msgblock);
    engine_clear(e);
    return -1;
}

/* How long to spin before the next sleep, after a wait of waited ns.
 * Waking a sleeping engine costs ~20-50 us on these VMs, more when the
 * host is busy, and the client pays part of it (its FUTEX_WAKE) on its
 * submission. The engine spins only if its last wait was short (under
 * SPIN_WINDOW spins): tasks that come one after another (a client's
 * round trips) keep it spinning, tasks that come far apart (a push to
 * every engine now and then) do not, and the engines that still work keep
 * the cores. It spins twice as long as that wait (at least the spin, at
 * most SPIN_WINDOW of them): a fixed spin shorter than the client's time
 * between tasks made the engine sleep before each of them, for good
 * (each wake-up made the client slower, and the next wait longer).
 * SHOAL_ENGINE_SPIN (seconds) sets the spin. */
static int64_t next_spin(const engine_t *e, int64_t waited_ns)
{
    int64_t window = SPIN_WINDOW * e->spin_ns;
    if (waited_ns >= window)
        return 0;
    int64_t spin = 2 * waited_ns;
    return spin < e->spin_ns ? e->spin_ns : spin > window ? window : spin;
}

/* The loop; returns the engine's exit code, or -1 with an error set. */
static int loop(engine_t *e)
{
    int64_t spin = e->spin_ns;
    for (;;) {
        if (waited(e) < 0)
            return -1;
        int64_t started = now_ns();
        int rc;
        Py_BEGIN_ALLOW_THREADS
        rc = shoal_doorbell_wait(e->bell, e->waited, e->nwaited, spin, -1);
        Py_END_ALLOW_THREADS
        spin = next_spin(e, now_ns() - started);
        if (rc < 0 && rc != -ETIMEDOUT) {
            errno = -rc;
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        /* A signal's Python handler runs here, between tasks (SIGINT then
         * interrupts nothing). */
        if (PyErr_CheckSignals() < 0)
            return -1;
        slot_t s[POP_MAX];
        int n = shoal_ring_pop(&e->agent.sq, s, POP_MAX);
        if (n == -EPIPE)
            return 0; /* the agent closed our ring: it is stopping */
        if (n < 0) {
            errno = -n;
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        rc = dispatch(e, &e->agent, s, n);
        if (rc != 0)
            return rc < 0 ? -1 : 0;
        e->abort_queued = 0; /* the batch that held a failed cell is answered */
        if (e->stopping)
            return finish(e);
        for (size_t i = 0; i < e->nlanes; i++) {
            if (e->lanes[i]->gone)
                continue;
            if (serve_lane(e, e->lanes[i]) < 0)
                return -1;
            if (e->stopping)
                return finish(e);
        }
        /* One task from a pool at a time, and only once the rings above are
         * served: the rest of the pool is for whichever engine is idle. */
        if (take_from_pools(e) < 0)
            return -1;
        if (e->stopping)
            return finish(e);
        sweep(e);
    }
}

static PyObject *serve(PyObject *mod, PyObject *py)
{
    (void)mod;
    if (running_engine) {
        PyErr_SetString(PyExc_RuntimeError, "the engine's loop is running already");
        return NULL;
    }
    engine_t e;
    if (engine_init(&e, py) < 0)
        return NULL;
    running_engine = &e;
    int rc = loop(&e);
    running_engine = NULL;
    engine_clear(&e);
    if (rc < 0)
        return NULL;
    return PyLong_FromLong(rc);
}

/* output(piece): a piece of the running task's output (the JSON of an
 * OUTPUT block) goes to its client now, best effort: True if it went. */
static PyObject *output(PyObject *mod, PyObject *piece)
{
    (void)mod;
    engine_t *e = running_engine;
    if (!e || !e->outputs || e->pushing || PyList_GET_SIZE(e->outputs) >= OUTPUT_MAX_PIECES)
        Py_RETURN_FALSE; /* the reply carries the whole text anyway */
    PyObject *block = pack_frames(e, &piece, 1, 1);
    if (!block) {
        PyErr_Clear(); /* no arena memory, say: the reply has it all */
        Py_RETURN_FALSE;
    }
    slot_t s = {.task_id = e->task_id, .kind = KIND_OUTPUT, .sender = e->id};
    int ok = block_handle(block, &s) == 0 && shoal_ring_push(&e->cur->cq, &s, 1) == 1 &&
             PyList_Append(e->outputs, block) == 0;
    PyErr_Clear();
    Py_DECREF(block);
    return PyBool_FromLong(ok);
}

/* stop(): a shutdown task asks the engine to stop once its reply is sent. */
static PyObject *stop(PyObject *mod, PyObject *unused)
{
    (void)mod;
    (void)unused;
    if (running_engine)
        running_engine->stopping = 1;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"stop", stop, METH_NOARGS, "stop(): stop once the running task's reply is sent"},
    {"serve", serve, METH_O, "serve(engine) -> exit code: runs the engine's loop until it stops"},
    {"output", output, METH_O, "output(piece) -> True if a piece of the running task's output went out"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_shoal_engine", "The engine's task loop, in C (engine/loop.c).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyObject *shoal_engine_loop_init(void)
{
    return PyModule_Create(&module);
}
