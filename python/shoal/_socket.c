/*
 * python/shoal/_socket.c - shoal._core.Socket: the wire protocol from Python.
 *
 * A Socket is one ZeroMQ DEALER or ROUTER socket plus the cluster key.
 * Sending signs through bridge/wire.c and receiving checks through
 * bridge/zwire.c, so Python never re-implements the protocol. Received
 * frames are Frame objects that export ZeroMQ's own memory through the
 * buffer protocol: a large buffer frame is never copied on its way into
 * numpy. The GIL is released while a call blocks. Given the Curve keys of a
 * connection file (curve=), a DEALER connects with CurveZMQ and watches its
 * handshakes, so that a controller that refuses its key is an error, not
 * a silence.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <shoal/curve.h>
#include <shoal/util.h>
#include <shoal/zwire.h>

#include <errno.h>
#include <string.h>

#include "_common.h"
#include "_socket.h"

static void *zctx;
static PyObject *WireError;

/* ---- Frame: one received frame, exported without copying ------------------ */

typedef struct {
    PyObject_HEAD
    zmq_msg_t msg;
} FrameObject;

static void frame_dealloc(FrameObject *self)
{
    zmq_msg_close(&self->msg);
    PyObject_Free(self);
}

static int frame_getbuffer(FrameObject *self, Py_buffer *view, int flags)
{
    return PyBuffer_FillInfo(view, (PyObject *)self, zmq_msg_data(&self->msg), (Py_ssize_t)zmq_msg_size(&self->msg),
                             1, flags);
}

static Py_ssize_t frame_len(FrameObject *self)
{
    return (Py_ssize_t)zmq_msg_size(&self->msg);
}

static PyObject *frame_bytes(FrameObject *self, PyObject *unused)
{
    (void)unused;
    return PyBytes_FromStringAndSize(zmq_msg_data(&self->msg), (Py_ssize_t)zmq_msg_size(&self->msg));
}

static PyBufferProcs frame_as_buffer = {.bf_getbuffer = (getbufferproc)frame_getbuffer};
static PySequenceMethods frame_as_sequence = {.sq_length = (lenfunc)frame_len};
static PyMethodDef frame_methods[] = {
    {"__bytes__", (PyCFunction)frame_bytes, METH_NOARGS, "a copy of the frame as bytes"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject FrameType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shoal._core.Frame",
    .tp_basicsize = sizeof(FrameObject),
    .tp_dealloc = (destructor)frame_dealloc,
    .tp_as_buffer = &frame_as_buffer,
    .tp_as_sequence = &frame_as_sequence,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A received message frame: read-only bytes in ZeroMQ's memory (buffer protocol).",
    .tp_methods = frame_methods,
};

/* Takes over msg (leaves it empty). */
static PyObject *frame_new(zmq_msg_t *msg)
{
    FrameObject *f = PyObject_New(FrameObject, &FrameType);
    if (!f)
        return NULL;
    zmq_msg_init(&f->msg);
    zmq_msg_move(&f->msg, msg);
    return (PyObject *)f;
}

/* ---- Socket ----------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    void *sock;
    int router;
    uint8_t key[SHOAL_WIRE_KEY];
    shoal_wire_limits limits;
    shoal_wire_counters counters;
    uint64_t next_id;
    void *monitor;           /* handshake events (curve= sockets) */
    uint64_t handshakes_ok, handshakes_failed;
    char refused[512];       /* why the peer refused us for good ("" if it has not) */
} SocketObject;

static int sock_open(SocketObject *self)
{
    if (!self->sock) {
        PyErr_SetString(PyExc_ValueError, "this shoal Socket is closed");
        return -1;
    }
    return 0;
}

static PyObject *zmq_error(const char *what)
{
    int e = zmq_errno();
    return shoal__raise_oserror(e, what, zmq_strerror(e));
}

/*
 * Reads curve=: None, or a dict with the connection file's "server_key",
 * "public_key" and "secret_key" (Z85 strings). Returns 1 with *k set, 0 for
 * None, -1 with ValueError naming the field.
 */
static int curve_keys(PyObject *curve, shoal_curve_member *k)
{
    if (!curve || curve == Py_None)
        return 0;
    if (!PyDict_Check(curve)) {
        PyErr_SetString(PyExc_ValueError, "curve must be null, or an object with server_key, public_key and "
                                          "secret_key");
        return -1;
    }
    static const char *names[3] = {"server_key", "public_key", "secret_key"};
    const char *text[3] = {NULL, NULL, NULL};
    for (int i = 0; i < 3; i++) {
        PyObject *v = PyDict_GetItemString(curve, names[i]); /* borrowed; missing: said below */
        if (v && PyUnicode_Check(v) && !(text[i] = PyUnicode_AsUTF8(v)))
            return -1;
    }
    const char *field = "";
    int e = shoal_curve_member_parse(text[0], text[1], text[2], k, &field);
    if (e < 0) {
        PyErr_Format(PyExc_ValueError, "curve.%s %s", field, shoal_curve_strerror(e));
        return -1;
    }
    return 1;
}

static PyObject *socket_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"kind", "key", "bind", "connect", "identity", "max_frame", "curve", NULL};
    const char *kind, *bind = NULL, *connect = NULL;
    Py_buffer key, ident = {0};
    unsigned long long max_frame = 0;
    PyObject *curve = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "sy*|$zzy*KO:Socket", kwlist, &kind, &key, &bind, &connect, &ident,
                                     &max_frame, &curve))
        return NULL;
    SocketObject *self = NULL;
    shoal_curve_member ck;
    int use_curve = 0;
    int zkind = !strcmp(kind, "router") ? ZMQ_ROUTER : !strcmp(kind, "dealer") ? ZMQ_DEALER : -1;
    if (zkind < 0) {
        PyErr_SetString(PyExc_ValueError, "kind must be 'router' or 'dealer'");
        goto out;
    }
    if (key.len != SHOAL_WIRE_KEY) {
        PyErr_Format(PyExc_ValueError, "the cluster key must be %d bytes, not %zd", SHOAL_WIRE_KEY, key.len);
        goto out;
    }
    if (!!bind == !!connect) {
        PyErr_SetString(PyExc_ValueError, "give exactly one of bind= and connect=");
        goto out;
    }
    if ((use_curve = curve_keys(curve, &ck)) < 0)
        goto out;
    if (use_curve && (zkind != ZMQ_DEALER || !connect)) {
        PyErr_SetString(PyExc_ValueError, "curve= is for a dealer that connects (a member of a cluster)");
        goto out;
    }
    if (!zctx && !(zctx = zmq_ctx_new())) {
        zmq_error("cannot create a ZeroMQ context");
        goto out;
    }
    self = (SocketObject *)type->tp_alloc(type, 0);
    if (!self)
        goto out;
    self->router = zkind == ZMQ_ROUTER;
    memcpy(self->key, key.buf, SHOAL_WIRE_KEY);
    self->limits = shoal_wire_default_limits;
    if (max_frame)
        self->limits.max_frame = max_frame;
    self->sock = zmq_socket(zctx, zkind);
    if (!self->sock) {
        zmq_error("cannot create a ZeroMQ socket");
        Py_CLEAR(self);
        goto out;
    }
    int zero = 0;
    int64_t maxmsg = (int64_t)self->limits.max_frame + (use_curve ? SHOAL_CURVE_FRAME_OVERHEAD : 0);
    zmq_setsockopt(self->sock, ZMQ_LINGER, &zero, sizeof zero);
    /* ZeroMQ drops a peer that sends a frame over the limit before holding
     * it (Curve's own bytes on top: they are not the peer's). */
    zmq_setsockopt(self->sock, ZMQ_MAXMSGSIZE, &maxmsg, sizeof maxmsg);
    if (ident.buf && zmq_setsockopt(self->sock, ZMQ_ROUTING_ID, ident.buf, (size_t)ident.len) < 0) {
        zmq_error("bad identity");
        Py_CLEAR(self);
        goto out;
    }
    int rc;
    if (use_curve) {
        /* Before connecting: no handshake goes unseen. */
        if ((rc = shoal_curve_client(self->sock, &ck)) < 0 ||
            (rc = shoal_curve_monitor(zctx, self->sock, &self->monitor)) < 0) {
            errno = -rc;
            zmq_error("cannot set up Curve");
            Py_CLEAR(self);
            goto out;
        }
    }
    Py_BEGIN_ALLOW_THREADS
    rc = bind ? zmq_bind(self->sock, bind) : zmq_connect(self->sock, connect);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        zmq_error(bind ? "cannot bind" : "cannot connect");
        Py_CLEAR(self);
    }
out:
    explicit_bzero(&ck, sizeof ck);
    PyBuffer_Release(&key);
    if (ident.buf)
        PyBuffer_Release(&ident);
    return (PyObject *)self;
}

static void socket_dealloc(SocketObject *self)
{
    /* The monitor stops before its reader goes: an event sent to a PAIR
     * with no reader would block ZeroMQ's I/O thread (see curve.c). */
    if (self->monitor) {
        zmq_socket_monitor(self->sock, NULL, 0);
        zmq_close(self->monitor);
    }
    if (self->sock)
        zmq_close(self->sock);
    memset(self->key, 0, sizeof self->key);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *socket_close(SocketObject *self, PyObject *unused)
{
    (void)unused;
    if (self->monitor) {
        zmq_socket_monitor(self->sock, NULL, 0); /* before its reader goes (socket_dealloc) */
        zmq_close(self->monitor);
        self->monitor = NULL;
    }
    if (self->sock) {
        zmq_close(self->sock);
        self->sock = NULL;
    }
    Py_RETURN_NONE;
}

/* Collects buffers from a sequence of bytes-like objects into frames. */
static int collect(PyObject *seq, Py_buffer *views, shoal_frame *frames, Py_ssize_t *n, Py_ssize_t cap)
{
    PyObject *fast = PySequence_Fast(seq, "frames must be a sequence of bytes-like objects");
    if (!fast)
        return -1;
    Py_ssize_t k = PySequence_Fast_GET_SIZE(fast);
    if (*n + k > cap) {
        PyErr_Format(PyExc_ValueError, "a message has at most %d frames", SHOAL_WIRE_MAX_FRAMES);
        Py_DECREF(fast);
        return -1;
    }
    for (Py_ssize_t i = 0; i < k; i++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(fast, i), &views[*n], PyBUF_SIMPLE) < 0) {
            Py_DECREF(fast);
            return -1;
        }
        frames[*n].data = views[*n].buf;
        frames[*n].len = (size_t)views[*n].len;
        (*n)++;
    }
    Py_DECREF(fast);
    return 0;
}

static PyObject *socket_send(SocketObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"type", "payload", "buffers", "route", "msg_id", "task_id", "sender", "target",
                             "reply_to", "flags", "stamp_ns", NULL};
    unsigned int type, sender = 0, target = SHOAL_WIRE_TARGET_ALL, flags = 0;
    PyObject *payload = NULL, *buffers = NULL;
    Py_buffer route = {0};
    unsigned long long msg_id = 0, task_id = 0, reply_to = 0, stamp_ns = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "I|OO$y*KKIIKIK:send", kwlist, &type, &payload, &buffers, &route,
                                     &msg_id, &task_id, &sender, &target, &reply_to, &flags, &stamp_ns))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t n = 0, np = 0;
    Py_buffer *views = PyMem_Calloc(SHOAL_WIRE_MAX_FRAMES, sizeof *views);
    shoal_frame *frames = PyMem_Calloc(SHOAL_WIRE_MAX_FRAMES, sizeof *frames);
    if (!views || !frames) {
        PyErr_NoMemory();
        goto out;
    }
    if (sock_open(self) < 0)
        goto out;
    if (self->router && !route.buf) {
        PyErr_SetString(PyExc_ValueError, "a router socket needs route= to send");
        goto out;
    }
    if (payload && payload != Py_None && collect(payload, views, frames, &n, SHOAL_WIRE_MAX_FRAMES) < 0)
        goto out;
    np = n;
    if (buffers && buffers != Py_None && collect(buffers, views, frames, &n, SHOAL_WIRE_MAX_FRAMES) < 0)
        goto out;
    if (!msg_id)
        msg_id = ++self->next_id;
    shoal_msg_header h = {.type = (uint16_t)type, .flags = (uint16_t)flags, .n_payload = (uint16_t)np,
                          .n_buffers = (uint16_t)(n - np), .msg_id = msg_id, .task_id = task_id,
                          .sender = sender, .target = target, .reply_to = reply_to, .stamp_ns = stamp_ns};
    shoal_frame rt = {route.buf, (size_t)route.len};
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = shoal_wire_send(self->sock, self->key, route.buf ? &rt : NULL, &h, frames, (size_t)n);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        errno = -rc;
        zmq_error("send failed");
        goto out;
    }
    result = PyLong_FromUnsignedLongLong(msg_id);
out:
    for (Py_ssize_t i = 0; i < n; i++)
        PyBuffer_Release(&views[i]);
    PyMem_Free(views);
    PyMem_Free(frames);
    if (route.buf)
        PyBuffer_Release(&route);
    return result;
}

/* Sends frames exactly as given, unsigned: for probing peers with bad input. */
static PyObject *socket_send_raw(SocketObject *self, PyObject *seq)
{
    if (sock_open(self) < 0)
        return NULL;
    PyObject *fast = PySequence_Fast(seq, "send_raw takes a sequence of bytes-like objects");
    if (!fast)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_buffer v;
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(fast, i), &v, PyBUF_SIMPLE) < 0) {
            /* Finish the multipart message so the socket stays usable. */
            if (i > 0)
                zmq_send(self->sock, "", 0, 0);
            Py_DECREF(fast);
            return NULL;
        }
        int rc;
        Py_BEGIN_ALLOW_THREADS
        rc = zmq_send(self->sock, v.buf, (size_t)v.len, i + 1 < n ? ZMQ_SNDMORE : 0);
        Py_END_ALLOW_THREADS
        PyBuffer_Release(&v);
        if (rc < 0) {
            Py_DECREF(fast);
            return zmq_error("send failed");
        }
    }
    Py_DECREF(fast);
    Py_RETURN_NONE;
}

static PyObject *socket_recv(SocketObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"timeout", NULL};
    double timeout = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|d:recv", kwlist, &timeout) || sock_open(self) < 0)
        return NULL;
    long ms = timeout < 0 ? -1 : (long)(timeout * 1000);
    int rc;
    for (;;) {
        if (self->refused[0])
            return PyErr_Format(PyExc_ConnectionRefusedError, "%s", self->refused);
        zmq_pollitem_t items[2] = {{self->sock, 0, ZMQ_POLLIN, 0}, {self->monitor, 0, ZMQ_POLLIN, 0}};
        int64_t start = shoal_now_ns();
        Py_BEGIN_ALLOW_THREADS
        do {
            rc = zmq_poll(items, self->monitor ? 2 : 1, ms);
        } while (rc < 0 && zmq_errno() == EINTR);
        Py_END_ALLOW_THREADS
        if (rc < 0)
            return zmq_error("poll failed");
        if (rc == 0) {
            PyErr_SetString(PyExc_TimeoutError, "no message arrived in time");
            return NULL;
        }
        if (items[0].revents & ZMQ_POLLIN)
            break;
        /* Only handshake events: read them, and wait for what is left. */
        shoal_curve_event ev;
        while (shoal_curve_monitor_read(self->monitor, &ev) == 1) {
            if (ev.event == ZMQ_EVENT_HANDSHAKE_SUCCEEDED)
                self->handshakes_ok++;
            else if (ev.event != ZMQ_EVENT_HANDSHAKE_FAILED_AUTH && ev.event != ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL &&
                     ev.event != ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL)
                continue;
            else
                self->handshakes_failed++;
            shoal_curve_event_fatal(&ev, self->refused, sizeof self->refused);
        }
        if (ms > 0 && (ms -= (long)((shoal_now_ns() - start) / 1000000)) < 0)
            ms = 0;
    }
    shoal_wire_msg m;
    Py_BEGIN_ALLOW_THREADS
    rc = shoal_wire_recv(self->sock, self->key, self->router, &self->limits, ZMQ_DONTWAIT, &m, &self->counters);
    Py_END_ALLOW_THREADS
    PyObject *route = m.has_route ? PyBytes_FromStringAndSize(zmq_msg_data(&m.route), (Py_ssize_t)zmq_msg_size(&m.route))
                                  : (Py_INCREF(Py_None), Py_None);
    if (rc < 0) {
        shoal_wire_msg_close(&m);
        if (!route)
            return NULL;
        PyObject *exc = PyObject_CallFunction(WireError, "siO", shoal_wire_strerror(rc), -rc, route);
        Py_DECREF(route);
        if (exc) {
            PyErr_SetObject(WireError, exc);
            Py_DECREF(exc);
        }
        return NULL;
    }
    PyObject *payload = PyList_New(m.hdr.n_payload), *buffers = PyList_New(m.hdr.n_buffers);
    PyObject *header = Py_BuildValue(
        "{sIsIsKsKsIsIsKsKsK}", "type", (unsigned)m.hdr.type, "flags", (unsigned)m.hdr.flags, "msg_id",
        (unsigned long long)m.hdr.msg_id, "task_id", (unsigned long long)m.hdr.task_id, "sender",
        (unsigned)m.hdr.sender, "target", (unsigned)m.hdr.target, "reply_to", (unsigned long long)m.hdr.reply_to,
        "body_len", (unsigned long long)m.hdr.body_len, "stamp_ns", (unsigned long long)m.hdr.stamp_ns);
    PyObject *result = NULL;
    if (!payload || !buffers || !header || !route)
        goto out;
    for (size_t i = 0; i < m.nframes; i++) {
        PyObject *f = frame_new(&m.frames[i]);
        if (!f)
            goto out;
        if (i < m.hdr.n_payload)
            PyList_SET_ITEM(payload, (Py_ssize_t)i, f);
        else
            PyList_SET_ITEM(buffers, (Py_ssize_t)(i - m.hdr.n_payload), f);
    }
    result = PyTuple_Pack(4, header, payload, buffers, route);
out:
    shoal_wire_msg_close(&m);
    Py_XDECREF(payload);
    Py_XDECREF(buffers);
    Py_XDECREF(header);
    Py_XDECREF(route);
    return result;
}

static PyObject *socket_get_counters(SocketObject *self, void *closure)
{
    (void)closure;
    return Py_BuildValue("{sKsKsKsKsK}", "received", (unsigned long long)self->counters.received, "malformed",
                         (unsigned long long)self->counters.malformed, "oversized",
                         (unsigned long long)self->counters.oversized, "bad_signature",
                         (unsigned long long)self->counters.bad_signature, "stale",
                         (unsigned long long)self->counters.stale);
}

static PyObject *socket_get_handshakes(SocketObject *self, void *closure)
{
    (void)closure;
    if (!self->monitor)
        Py_RETURN_NONE;
    return Py_BuildValue("{sKsKsz}", "succeeded", (unsigned long long)self->handshakes_ok, "failed",
                         (unsigned long long)self->handshakes_failed, "refused",
                         self->refused[0] ? self->refused : NULL);
}

static PyObject *socket_get_endpoint(SocketObject *self, void *closure)
{
    (void)closure;
    if (sock_open(self) < 0)
        return NULL;
    char buf[256];
    size_t len = sizeof buf;
    if (zmq_getsockopt(self->sock, ZMQ_LAST_ENDPOINT, buf, &len) < 0)
        return zmq_error("no endpoint");
    return PyUnicode_FromString(buf);
}

static PyMethodDef socket_methods[] = {
    {"send", (PyCFunction)(void (*)(void))socket_send, METH_VARARGS | METH_KEYWORDS,
     "send(type, payload=(), buffers=(), *, route=None, msg_id=0, task_id=0, sender=0, target=ALL, reply_to=0, "
     "flags=0, stamp_ns=0) -> msg_id: sign and send one message, stamped now (or stamp_ns, to test a receiver's "
     "window)."},
    {"recv", (PyCFunction)(void (*)(void))socket_recv, METH_VARARGS | METH_KEYWORDS,
     "recv(timeout=-1) -> (header, payload, buffers, route): the next message that passes every check. Raises "
     "TimeoutError, WireError for a refused message (its route says who sent it), or ConnectionRefusedError "
     "when a curve= socket's peer refused its keys for good."},
    {"send_raw", (PyCFunction)socket_send_raw, METH_O,
     "send_raw(frames): send these frames as one multipart message, unsigned and unchecked (for probing a "
     "peer with bad input)."},
    {"close", (PyCFunction)socket_close, METH_NOARGS, "close the socket"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef socket_getset[] = {
    {"counters", (getter)socket_get_counters, NULL, "what this socket received and refused", NULL},
    {"handshakes", (getter)socket_get_handshakes, NULL,
     "a curve= socket's Curve handshakes, as recv() has seen them: {succeeded, failed, refused (why the peer "
     "refused us for good, or None)}; None without curve=", NULL},
    {"endpoint", (getter)socket_get_endpoint, NULL, "the last endpoint bound or connected", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject SocketType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shoal._core.Socket",
    .tp_basicsize = sizeof(SocketObject),
    .tp_dealloc = (destructor)socket_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Socket(kind, key, *, bind=None, connect=None, identity=None, max_frame=0, curve=None)\n\n"
              "A ZeroMQ 'router' or 'dealer' socket that speaks shoal's signed wire protocol. curve: a dealer's "
              "Curve keys, the connection file's {server_key, public_key, secret_key} (Z85 strings); a bad one "
              "is a ValueError naming the field.",
    .tp_methods = socket_methods,
    .tp_getset = socket_getset,
    .tp_new = socket_new,
};

int shoal__socket_init(PyObject *m)
{
    if (shoal_wire_init() < 0) {
        PyErr_SetString(PyExc_ImportError, "libsodium failed to initialise");
        return -1;
    }
    if (PyType_Ready(&FrameType) < 0 || PyType_Ready(&SocketType) < 0)
        return -1;
    WireError = PyErr_NewExceptionWithDoc(
        "shoal._core.WireError", "A received message was refused: WireError(reason, errno, route).", NULL, NULL);
    if (!WireError || PyModule_AddObjectRef(m, "WireError", WireError) < 0)
        return -1;
    if (PyModule_AddObjectRef(m, "Socket", (PyObject *)&SocketType) < 0 ||
        PyModule_AddObjectRef(m, "Frame", (PyObject *)&FrameType) < 0)
        return -1;
    static const struct {
        const char *name;
        int value;
    } types[] = {
        {"MSG_ERROR", SHOAL_MSG_ERROR},       {"MSG_HEARTBEAT", SHOAL_MSG_HEARTBEAT},
        {"MSG_HEARTBEAT_ACK", SHOAL_MSG_HEARTBEAT_ACK}, {"MSG_REGISTER", SHOAL_MSG_REGISTER},
        {"MSG_REGISTER_REPLY", SHOAL_MSG_REGISTER_REPLY}, {"MSG_TASK", SHOAL_MSG_TASK},
        {"MSG_RESULT", SHOAL_MSG_RESULT},     {"MSG_OUTPUT", SHOAL_MSG_OUTPUT},
        {"MSG_QUERY", SHOAL_MSG_QUERY},       {"MSG_QUERY_REPLY", SHOAL_MSG_QUERY_REPLY},
        {"MSG_SHUTDOWN", SHOAL_MSG_SHUTDOWN}, {"MSG_ENGINE_EVENT", SHOAL_MSG_ENGINE_EVENT},
        {"MSG_ABORT", SHOAL_MSG_ABORT}, {"MSG_SIGNAL", SHOAL_MSG_SIGNAL},
        {"TASK_BULK", SHOAL_TASK_BULK}, {"RESULT_BULK", SHOAL_RESULT_BULK}, {"REG_CLIENT", SHOAL_REG_CLIENT},     {"REG_NODE", SHOAL_REG_NODE},
        {"TARGET_ALL", -1},
    };
    for (size_t i = 0; i < sizeof types / sizeof types[0]; i++) {
        PyObject *v = types[i].value < 0 ? PyLong_FromUnsignedLong(SHOAL_WIRE_TARGET_ALL) : PyLong_FromLong(types[i].value);
        if (!v || PyModule_AddObject(m, types[i].name, v) < 0) {
            Py_XDECREF(v);
            return -1;
        }
    }
    return 0;
}

static PyObject *core_keygen(PyObject *mod, PyObject *unused)
{
    (void)mod;
    (void)unused;
    uint8_t key[SHOAL_WIRE_KEY];
    if (shoal_wire_keygen(key) < 0) {
        PyErr_SetString(PyExc_OSError, "no randomness for a key");
        return NULL;
    }
    return PyBytes_FromStringAndSize((const char *)key, sizeof key);
}

static PyObject *core_curve_keypair(PyObject *mod, PyObject *unused)
{
    (void)mod;
    (void)unused;
    uint8_t pub[SHOAL_CURVE_KEY], sec[SHOAL_CURVE_KEY];
    int rc = shoal_curve_keypair(pub, sec);
    if (rc < 0)
        return shoal__raise_oserror(-rc, "no Curve key pair", strerror(-rc));
    char p[SHOAL_CURVE_Z85 + 1], s[SHOAL_CURVE_Z85 + 1];
    shoal_curve_z85_encode(pub, p);
    shoal_curve_z85_encode(sec, s);
    explicit_bzero(sec, sizeof sec);
    PyObject *r = Py_BuildValue("(ss)", p, s);
    explicit_bzero(s, sizeof s);
    return r;
}

PyMethodDef shoal__socket_functions[] = {
    {"keygen", core_keygen, METH_NOARGS, "keygen() -> 32 random bytes: a fresh cluster key."},
    {"curve_keypair", core_curve_keypair, METH_NOARGS,
     "curve_keypair() -> (public, secret): a fresh Curve key pair as Z85 strings (zmq_curve_keypair)."},
    {NULL, NULL, 0, NULL},
};
