/*
 * python/shoal/_xfer.c - the Bulk part of shoal._core: a client's
 * connection to one agent's bulk server (docs/machines.md, "The bulk
 * path"). send() streams a task's message block (docs/engine.md, "Message
 * blocks") as one transfer, its header made here and each frame sent from
 * the caller's memory record by record: nothing is packed or copied first
 * (encrypted, each record is sealed through the connection's one-chunk
 * staging buffer). recv_transfer() takes a result's block the agent sends
 * back on the same connection, into memory the caller gives. The GIL is
 * released while bytes move.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <shoal/xfer.h>

#include "_common.h"
#include "_xfer.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define MSGBLOCK_MAGIC 0x464D4853u /* "SHMF" */
#define SMALL_BLOCK (64u << 10)   /* a block sent in one record, copied together first */

typedef struct {
    PyObject_HEAD
    shoal_xfer *x;
    int fd;
    int busy;  /* a send runs (without the GIL): another thread must not start one */
    int rbusy; /* a receive runs (without the GIL): likewise */
    char endpoint[128];
} BulkObject;

static PyObject *raise_on(BulkObject *self, int neg, const char *what)
{
    char reason[256];
    snprintf(reason, sizeof reason, "%s (bulk server %s)", shoal_xfer_strerror(neg), self->endpoint);
    return shoal__raise_oserror(-neg, what, reason);
}

static int bulk_init(BulkObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"endpoint", "key", "encrypt", "timeout_ms", "idle_ms", NULL};
    const char *ep;
    Py_buffer key;
    int encrypt = 1, timeout_ms = 5000, idle_ms = SHOAL_XFER_IDLE_MS;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "sy*|pii:Bulk", kwlist, &ep, &key, &encrypt, &timeout_ms, &idle_ms))
        return -1;
    snprintf(self->endpoint, sizeof self->endpoint, "%s", ep);
    if (key.len != SHOAL_XFER_KEY) {
        PyBuffer_Release(&key);
        PyErr_Format(PyExc_ValueError, "a cluster key is %u bytes, not %zd", SHOAL_XFER_KEY, key.len);
        return -1;
    }
    int fd, rc;
    shoal_xfer *x = NULL;
    Py_BEGIN_ALLOW_THREADS
    fd = shoal_xfer_connect(ep, timeout_ms);
    rc = fd < 0 ? fd : shoal_xfer_open(fd, SHOAL_XFER_CLIENT, key.buf, encrypt ? SHOAL_XFER_ENCRYPT : 0,
                                       timeout_ms, &x);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&key);
    if (rc < 0) {
        if (fd >= 0)
            close(fd);
        raise_on(self, rc, fd < 0 ? "cannot connect" : "the bulk channel's handshake failed");
        return -1;
    }
    shoal_xfer_set_idle_timeout(x, idle_ms);
    self->fd = fd;
    self->x = x;
    return 0;
}

static void bulk_shut(BulkObject *self)
{
    if (self->x) {
        shoal_xfer_shutdown(self->x);
        shoal_xfer_close(self->x);
        self->x = NULL;
    }
    if (self->fd >= 0) {
        close(self->fd);
        self->fd = -1;
    }
}

static PyObject *bulk_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    (void)args;
    (void)kw;
    BulkObject *self = (BulkObject *)type->tp_alloc(type, 0);
    if (self)
        self->fd = -1;
    return (PyObject *)self;
}

static void bulk_dealloc(BulkObject *self)
{
    if (!self->busy && !self->rbusy)
        bulk_shut(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *bulk_close(BulkObject *self, PyObject *unused)
{
    (void)unused;
    if (self->busy || self->rbusy) {
        PyErr_SetString(PyExc_RuntimeError, "a send or a receive runs on this bulk connection");
        return NULL;
    }
    bulk_shut(self);
    Py_RETURN_NONE;
}

/*
 * send(transfer_id, meta, parts, npayload): one transfer of the message
 * block [SHMF header, lengths, parts back to back]: BEGIN (its total,
 * meta), DATA records of at most 1 MiB each from each part's memory, END.
 */
static PyObject *bulk_send(BulkObject *self, PyObject *args)
{
    unsigned long long id;
    Py_buffer meta;
    PyObject *parts;
    unsigned int npayload;
    if (!PyArg_ParseTuple(args, "Ky*OI:send", &id, &meta, &parts, &npayload))
        return NULL;
    PyObject *seq = PySequence_Fast(parts, "parts must be a sequence of buffers");
    if (!seq) {
        PyBuffer_Release(&meta);
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq), got = 0;
    Py_buffer *views = PyMem_Calloc((size_t)n + 1, sizeof *views);
    uint8_t *head = PyMem_Malloc(16 + 8 * (size_t)n);
    PyObject *result = NULL;
    if (!views || !head) {
        PyErr_NoMemory();
        goto out;
    }
    if (!self->x) {
        PyErr_Format(PyExc_ConnectionError, "the bulk connection to %s is closed", self->endpoint);
        goto out;
    }
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "a send runs on this bulk connection");
        goto out;
    }
    uint32_t w[4] = {MSGBLOCK_MAGIC, (uint32_t)n, npayload, 0};
    memcpy(head, w, sizeof w);
    uint64_t total = 16 + 8 * (uint64_t)n;
    for (; got < n; got++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(seq, got), &views[got], PyBUF_C_CONTIGUOUS) < 0)
            goto out;
        uint64_t len = (uint64_t)views[got].len;
        memcpy(head + 16 + 8 * got, &len, 8);
        total += len;
    }
    int rc;
    size_t headlen = 16 + 8 * (size_t)n;
    /* A small block goes in one record (a task's round trip counts the
     * records); a large one from the parts' own memory, record by record. */
    uint8_t *small = total <= SMALL_BLOCK ? PyMem_Malloc((size_t)total) : NULL;
    if (small) {
        memcpy(small, head, headlen);
        size_t at = headlen;
        for (Py_ssize_t i = 0; i < n; i++) {
            memcpy(small + at, views[i].buf, (size_t)views[i].len);
            at += (size_t)views[i].len;
        }
    }
    self->busy = 1;
    Py_BEGIN_ALLOW_THREADS
    shoal_xfer_hdr h = {.type = SHOAL_XFER_BEGIN, .id = id, .offset = total};
    shoal_xfer_set_more(self->x, 1); /* one segment for a small transfer: see xfer.h */
    rc = shoal_xfer_send(self->x, &h, meta.buf, (size_t)meta.len);
    uint64_t off = 0;
    if (rc == 0 && small) {
        h = (shoal_xfer_hdr){.type = SHOAL_XFER_DATA, .id = id, .offset = 0};
        rc = shoal_xfer_send(self->x, &h, small, (size_t)total);
        n = 0; /* all sent */
    } else if (rc == 0) {
        h = (shoal_xfer_hdr){.type = SHOAL_XFER_DATA, .id = id, .offset = 0};
        rc = shoal_xfer_send(self->x, &h, head, headlen);
        off = headlen;
    }
    for (Py_ssize_t i = 0; rc == 0 && i < n; i++) {
        const uint8_t *p = views[i].buf;
        size_t left = (size_t)views[i].len;
        while (rc == 0 && left) {
            size_t k = left < SHOAL_XFER_CHUNK ? left : SHOAL_XFER_CHUNK;
            h = (shoal_xfer_hdr){.type = SHOAL_XFER_DATA, .id = id, .offset = off};
            rc = shoal_xfer_send(self->x, &h, p, k);
            p += k;
            left -= k;
            off += k;
        }
    }
    shoal_xfer_set_more(self->x, 0);
    if (rc == 0) {
        h = (shoal_xfer_hdr){.type = SHOAL_XFER_END, .id = id, .offset = total};
        rc = shoal_xfer_send(self->x, &h, NULL, 0);
    }
    Py_END_ALLOW_THREADS
    self->busy = 0;
    PyMem_Free(small);
    if (rc < 0) {
        raise_on(self, rc, "a bulk transfer failed");
        goto out;
    }
    result = PyLong_FromUnsignedLongLong(total);
out:
    for (Py_ssize_t i = 0; i < got; i++)
        PyBuffer_Release(&views[i]);
    PyMem_Free(views);
    PyMem_Free(head);
    Py_DECREF(seq);
    PyBuffer_Release(&meta);
    return result;
}

/* send_record(type, payload): one record of a type of the caller's
 * (SHOAL_XFER_APP and up), id 0: the client's token, say. */
static PyObject *bulk_send_record(BulkObject *self, PyObject *args)
{
    unsigned int type;
    Py_buffer payload;
    if (!PyArg_ParseTuple(args, "Iy*:send_record", &type, &payload))
        return NULL;
    int rc = -EINVAL;
    if (!self->x) {
        PyBuffer_Release(&payload);
        PyErr_Format(PyExc_ConnectionError, "the bulk connection to %s is closed", self->endpoint);
        return NULL;
    }
    if (self->busy) {
        PyBuffer_Release(&payload);
        PyErr_SetString(PyExc_RuntimeError, "a send runs on this bulk connection");
        return NULL;
    }
    if (type >= SHOAL_XFER_APP && type <= 255) {
        self->busy = 1;
        Py_BEGIN_ALLOW_THREADS
        shoal_xfer_hdr h = {.type = (uint8_t)type};
        rc = shoal_xfer_send(self->x, &h, payload.buf, (size_t)payload.len);
        Py_END_ALLOW_THREADS
        self->busy = 0;
    }
    PyBuffer_Release(&payload);
    if (rc < 0)
        return raise_on(self, rc, "a record could not be sent");
    Py_RETURN_NONE;
}

/* The destination recv_transfer got from its callback, for the accept callback. */
struct rx_dst {
    Py_buffer *view;
    uint64_t total;
    char *meta; /* a copy of the BEGIN's metadata (malloc'd; NULL: none) */
    size_t metalen;
};

static int rx_accept(void *ctx, const shoal_xfer_begin *b, shoal_xfer_sink *sink)
{
    struct rx_dst *d = ctx;
    if (b->total != d->total || (uint64_t)d->view->len < b->total)
        return -EMSGSIZE;
    if (b->metalen && (d->meta = malloc(b->metalen))) {
        memcpy(d->meta, b->meta, b->metalen);
        d->metalen = b->metalen;
    }
    sink->dst = d->view->buf;
    return 0;
}

/*
 * recv_transfer(alloc, timeout_ms) -> (id, buffer, meta): waits up to
 * timeout_ms for the next transfer's BEGIN (-1: for ever), calls
 * alloc(id, total) for a writable buffer of at least total bytes, and
 * receives the transfer straight into it (authenticated; opened in place
 * when encrypted). Returns (id, what alloc returned, the transfer's
 * metadata as bytes, b"" when it has none). Records of other types
 * before the BEGIN (the agent's keepalives) are taken and dropped. Raises builtins TimeoutError when nothing
 * began within timeout_ms (the connection stays usable), OSError naming
 * the endpoint when the connection failed, or alloc's exception (the
 * transfer was then read and dropped).
 */
static PyObject *bulk_recv_transfer(BulkObject *self, PyObject *args)
{
    PyObject *alloc;
    int timeout_ms;
    if (!PyArg_ParseTuple(args, "Oi:recv_transfer", &alloc, &timeout_ms))
        return NULL;
    if (!self->x) {
        PyErr_Format(PyExc_ConnectionError, "the bulk connection to %s is closed", self->endpoint);
        return NULL;
    }
    if (self->rbusy) {
        PyErr_SetString(PyExc_RuntimeError, "a receive runs on this bulk connection");
        return NULL;
    }
    self->rbusy = 1;
    shoal_xfer_hdr h;
    int rc;
    for (;;) {
        Py_BEGIN_ALLOW_THREADS
        rc = shoal_xfer_recv_hdr(self->x, &h, timeout_ms);
        if (rc == 0 && h.type != SHOAL_XFER_BEGIN && h.length)
            rc = shoal_xfer_skip_payload(self->x); /* records of later versions */
        Py_END_ALLOW_THREADS
        if (rc < 0 || h.type == SHOAL_XFER_BEGIN)
            break;
    }
    if (rc == -ETIMEDOUT) {
        self->rbusy = 0;
        PyErr_SetString(PyExc_TimeoutError, "no transfer began in time");
        return NULL;
    }
    if (rc < 0) {
        self->rbusy = 0;
        return raise_on(self, rc, "the bulk connection failed");
    }
    PyObject *buf = PyObject_CallFunction(alloc, "KK", (unsigned long long)h.id, (unsigned long long)h.offset);
    Py_buffer view = {0};
    int have = buf && PyObject_GetBuffer(buf, &view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) == 0;
    PyObject *et = NULL, *ev = NULL, *tb = NULL;
    if (!have)
        PyErr_Fetch(&et, &ev, &tb); /* 3.11 has no PyErr_GetRaisedException */
    struct rx_dst d = {&view, h.offset, NULL, 0};
    Py_buffer none = {0};
    if (!have)
        d.view = &none; /* refused: read and dropped */
    Py_BEGIN_ALLOW_THREADS
    rc = shoal_xfer_recv_buffer(self->x, &h, -1, rx_accept, &d, NULL);
    Py_END_ALLOW_THREADS
    self->rbusy = 0;
    if (have)
        PyBuffer_Release(&view);
    if (!have) {
        free(d.meta);
        Py_XDECREF(buf);
        PyErr_Restore(et, ev, tb);
        return NULL;
    }
    if (rc < 0) {
        free(d.meta);
        Py_DECREF(buf);
        return raise_on(self, rc, "a result's transfer failed");
    }
    PyObject *out = Py_BuildValue("(KNy#)", (unsigned long long)h.id, buf, d.meta ? d.meta : "",
                                  (Py_ssize_t)d.metalen);
    free(d.meta);
    return out;
}

static PyObject *bulk_fileno(BulkObject *self, PyObject *unused)
{
    (void)unused;
    return PyLong_FromLong(self->x ? self->fd : -1);
}

static PyObject *bulk_get_endpoint(BulkObject *self, void *closure)
{
    (void)closure;
    return PyUnicode_FromString(self->endpoint);
}

static PyObject *bulk_get_cipher(BulkObject *self, void *closure)
{
    (void)closure;
    static const char *names[] = {"none", "aes256gcm", "chacha20poly1305"};
    int c = self->x ? shoal_xfer_cipher(self->x) : 0;
    return PyUnicode_FromString(c >= 0 && c <= 2 ? names[c] : "?");
}

static PyMethodDef bulk_methods[] = {
    {"send", (PyCFunction)bulk_send, METH_VARARGS,
     "send(transfer_id, meta, parts, npayload) -> total bytes: one transfer of the message block of parts "
     "(npayload of them payload frames), sent from their memory; raises OSError (naming the endpoint) when the "
     "connection fails."},
    {"send_record", (PyCFunction)bulk_send_record, METH_VARARGS,
     "send_record(type, payload): one record of a caller's type (128 and up), e.g. the client's token."},
    {"recv_transfer", (PyCFunction)bulk_recv_transfer, METH_VARARGS,
     "recv_transfer(alloc, timeout_ms) -> (id, buffer, meta): the next transfer, received into "
     "alloc(id, total) (a writable buffer), the GIL released, with its metadata (bytes); builtins TimeoutError "
     "if none began in timeout_ms, OSError when the connection failed."},
    {"fileno", (PyCFunction)bulk_fileno, METH_NOARGS,
     "fileno() -> the connection's socket (to poll for readable; -1 once closed)."},
    {"close", (PyCFunction)bulk_close, METH_NOARGS, "close(): says CLOSE to the server and closes."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef bulk_getset[] = {
    {"endpoint", (getter)bulk_get_endpoint, NULL, "the bulk server's tcp:// address", NULL},
    {"cipher", (getter)bulk_get_cipher, NULL, "the cipher the handshake chose (\"none\" when plain)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject BulkType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shoal._core.Bulk",
    .tp_basicsize = sizeof(BulkObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Bulk(endpoint, key, encrypt=True, timeout_ms=5000): a connection to an agent's bulk server "
              "(docs/machines.md, \"The bulk path\"), its handshake made with the cluster key.",
    .tp_new = bulk_new,
    .tp_init = (initproc)bulk_init,
    .tp_dealloc = (destructor)bulk_dealloc,
    .tp_methods = bulk_methods,
    .tp_getset = bulk_getset,
};

int shoal__xfer_init(PyObject *m)
{
    if (PyType_Ready(&BulkType) < 0)
        return -1;
    return PyModule_AddObjectRef(m, "Bulk", (PyObject *)&BulkType);
}
