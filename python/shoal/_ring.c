/*
 * python/shoal/_ring.c - shoal._core.Ring: a ring (shm/ring.c) in an arena
 * block, from Python.
 *
 * The Ring holds the Block it lives in (so the memory stays mapped and
 * referenced), and releases the GIL while it waits.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <shoal/ring.h>

#include <errno.h>
#include <string.h>

#include "_common.h"
#include "_ring.h"

typedef struct {
    PyObject_HEAD
    PyObject *block;    /* keeps the memory mapped and referenced */
    PyObject *db_block; /* the block of a doorbell set with set_doorbell, if any */
    shoal_ring ring;
} RingObject;

/* A doorbell (shoal_doorbell_wait) in a writable block: the block stays
 * referenced while the Doorbell lives. */
typedef struct {
    PyObject_HEAD
    PyObject *block;
    void *db;
} DoorbellObject;

static PyTypeObject RingType;

/* The address of SHOAL_DOORBELL_SIZE writable, 4-byte aligned bytes at
 * offset in block, or NULL with an exception set. */
static void *doorbell_at(PyObject *block, Py_ssize_t offset)
{
    Py_buffer v;
    if (PyObject_GetBuffer(block, &v, PyBUF_WRITABLE) < 0)
        return NULL;
    void *p = NULL;
    if (offset < 0 || offset % 4 || offset > v.len - (Py_ssize_t)SHOAL_DOORBELL_SIZE)
        PyErr_SetString(PyExc_ValueError, "a doorbell needs 8 bytes, 4-byte aligned, inside the block");
    else
        p = (uint8_t *)v.buf + offset;
    PyBuffer_Release(&v); /* the caller holds the block, which keeps the memory */
    return p;
}

static PyObject *ring_errno(int neg, const char *what)
{
    return shoal__raise_oserror(-neg, what, strerror(-neg));
}

/* Ring(block, nslots=0): formats a new ring in the block's bytes when nslots
 * > 0, else opens the ring already there. */
static PyObject *ring_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"block", "nslots", "offset", "pool", NULL};
    PyObject *block;
    unsigned int nslots = 0;
    Py_ssize_t offset = 0;
    int pool = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|Inp:Ring", kwlist, &block, &nslots, &offset, &pool))
        return NULL;
    Py_buffer v;
    if (PyObject_GetBuffer(block, &v, PyBUF_WRITABLE) < 0)
        return NULL;
    if (offset < 0 || offset > v.len) {
        PyBuffer_Release(&v);
        PyErr_SetString(PyExc_ValueError, "offset outside the block");
        return NULL;
    }
    RingObject *self = (RingObject *)type->tp_alloc(type, 0);
    if (!self) {
        PyBuffer_Release(&v);
        return NULL;
    }
    uint8_t *mem = (uint8_t *)v.buf + offset;
    size_t len = (size_t)(v.len - offset);
    int rc = !nslots ? shoal_ring_open(mem, len, &self->ring)
             : pool  ? shoal_pool_init(mem, len, nslots, &self->ring)
                     : shoal_ring_init(mem, len, nslots, &self->ring);
    PyBuffer_Release(&v); /* the Block itself keeps the memory: we hold it */
    if (rc < 0) {
        Py_DECREF(self);
        return ring_errno(rc, nslots ? "cannot make a ring there" : "no ring there");
    }
    Py_INCREF(block);
    self->block = block;
    return (PyObject *)self;
}

static void ring_dealloc(RingObject *self)
{
    Py_XDECREF(self->block);
    Py_XDECREF(self->db_block);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *ring_size(PyObject *cls, PyObject *arg)
{
    (void)cls;
    unsigned long n = PyLong_AsUnsignedLong(arg);
    if (PyErr_Occurred())
        return NULL;
    return PyLong_FromSize_t(shoal_ring_size((uint32_t)n));
}

/* push(slots, wake=True): slots is a bytes-like object of 64 * n bytes.
 * Returns n pushed. wake=False leaves waking the consumer to wake(). */
static PyObject *ring_push(RingObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"slots", "wake", NULL};
    Py_buffer v;
    int wake = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "y*|p:push", kwlist, &v, &wake))
        return NULL;
    if (v.len % SHOAL_RING_SLOT) {
        PyBuffer_Release(&v);
        PyErr_Format(PyExc_ValueError, "slots are %d bytes each", SHOAL_RING_SLOT);
        return NULL;
    }
    uint32_t n = (uint32_t)(v.len / SHOAL_RING_SLOT);
    int rc = wake ? shoal_ring_push(&self->ring, v.buf, n) : shoal_ring_push_nowake(&self->ring, v.buf, n);
    PyBuffer_Release(&v);
    if (rc < 0)
        return ring_errno(rc, "push failed");
    return PyLong_FromLong(rc);
}

/* Up to max slots (0 or over 4096: 64) as bytes of 64 * n bytes (b"" when
 * empty); NULL with BrokenPipeError when the ring is closed and empty. */
static PyObject *pop_slots(RingObject *self, unsigned int max)
{
    if (max == 0 || max > 4096)
        max = 64;
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)max * SHOAL_RING_SLOT);
    if (!out)
        return NULL;
    int rc = shoal_ring_pop(&self->ring, PyBytes_AS_STRING(out), max);
    if (rc < 0) {
        Py_DECREF(out);
        return ring_errno(rc, "pop failed");
    }
    if (_PyBytes_Resize(&out, (Py_ssize_t)rc * SHOAL_RING_SLOT) < 0)
        return NULL;
    return out;
}

/* pop(max=64) -> bytes of 64 * n bytes (b"" when empty). Raises BrokenPipeError
 * when the ring is closed and empty. */
static PyObject *ring_pop(RingObject *self, PyObject *args)
{
    unsigned int max = 64;
    if (!PyArg_ParseTuple(args, "|I:pop", &max))
        return NULL;
    return pop_slots(self, max);
}

/* pop_into(list, max=64) -> how many slots were popped (up to max), appended
 * to list as one bytes object (nothing appended when none). The slots are in
 * the caller's list before control returns to Python: an exception raised
 * as the call returns (a Ctrl-C) cannot lose them, as it could pop()'s. */
static PyObject *ring_pop_into(RingObject *self, PyObject *args)
{
    PyObject *dst;
    unsigned int max = 64;
    if (!PyArg_ParseTuple(args, "O!|I:pop_into", &PyList_Type, &dst, &max))
        return NULL;
    PyObject *out = pop_slots(self, max);
    if (!out)
        return NULL;
    Py_ssize_t n = PyBytes_GET_SIZE(out) / SHOAL_RING_SLOT;
    int failed = n > 0 && PyList_Append(dst, out) < 0;
    Py_DECREF(out);
    if (failed)
        return NULL;
    return PyLong_FromSsize_t(n);
}

/* wait(timeout=-1, spin=50e-6) -> True when something can be popped, False on
 * timeout. Raises BrokenPipeError when the ring is closed and empty. */
static PyObject *ring_wait(RingObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"timeout", "spin", NULL};
    double timeout = -1, spin = 50e-6;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|dd:wait", kwlist, &timeout, &spin))
        return NULL;
    int rc;
    int64_t t = timeout < 0 ? -1 : (int64_t)(timeout * 1e9), s = (int64_t)(spin * 1e9);
    Py_BEGIN_ALLOW_THREADS
    rc = shoal_ring_wait(&self->ring, s, t);
    Py_END_ALLOW_THREADS
    if (rc == -ETIMEDOUT)
        Py_RETURN_FALSE;
    if (rc < 0)
        return ring_errno(rc, "wait failed");
    Py_RETURN_TRUE;
}

static PyObject *ring_wake(RingObject *self, PyObject *unused)
{
    (void)unused;
    return PyBool_FromLong(shoal_ring_wake(&self->ring));
}

/* ---- pools (shoal_pool_*): one producer, many consumers ---- */

/* put(slot) -> the slot's position, or None if the pool is full. */
static PyObject *ring_put(RingObject *self, PyObject *arg)
{
    Py_buffer v;
    if (PyObject_GetBuffer(arg, &v, PyBUF_SIMPLE) < 0)
        return NULL;
    if (v.len != SHOAL_RING_SLOT) {
        PyBuffer_Release(&v);
        PyErr_Format(PyExc_ValueError, "a slot is %d bytes", SHOAL_RING_SLOT);
        return NULL;
    }
    uint64_t pos = 0;
    int rc = shoal_pool_push(&self->ring, v.buf, &pos);
    PyBuffer_Release(&v);
    if (rc < 0)
        return ring_errno(rc, "put failed");
    if (rc == 0)
        Py_RETURN_NONE;
    return PyLong_FromUnsignedLongLong(pos);
}

/* take(who) -> (position, slot bytes), or None if nothing waits. Raises
 * BrokenPipeError when the pool is closed and nothing waits. */
static PyObject *ring_take(RingObject *self, PyObject *arg)
{
    unsigned long who = PyLong_AsUnsignedLong(arg);
    if (PyErr_Occurred())
        return NULL;
    if (who > UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "a taker's id fits in 32 bits");
        return NULL;
    }
    char slot[SHOAL_RING_SLOT];
    uint64_t pos = 0;
    int rc = shoal_pool_take(&self->ring, (uint32_t)who, slot, &pos);
    if (rc < 0)
        return ring_errno(rc, "take failed");
    if (rc == 0)
        Py_RETURN_NONE;
    return Py_BuildValue("(Ky#)", (unsigned long long)pos, slot, (Py_ssize_t)SHOAL_RING_SLOT);
}

static int pos_arg(PyObject *arg, uint64_t *pos)
{
    *pos = PyLong_AsUnsignedLongLong(arg);
    return PyErr_Occurred() ? -1 : 0;
}

static PyObject *ring_withdraw(RingObject *self, PyObject *arg)
{
    uint64_t pos;
    if (pos_arg(arg, &pos) < 0)
        return NULL;
    return PyBool_FromLong(shoal_pool_withdraw(&self->ring, pos));
}

static PyObject *ring_owner(RingObject *self, PyObject *arg)
{
    uint64_t pos;
    if (pos_arg(arg, &pos) < 0)
        return NULL;
    return PyLong_FromLongLong(shoal_pool_owner(&self->ring, pos));
}

static PyObject *ring_retire(RingObject *self, PyObject *arg)
{
    uint64_t pos;
    if (pos_arg(arg, &pos) < 0)
        return NULL;
    int rc = shoal_pool_retire(&self->ring, pos);
    if (rc < 0)
        return ring_errno(rc, "retire failed");
    Py_RETURN_NONE;
}

static PyObject *ring_get_is_pool(RingObject *self, void *unused)
{
    (void)unused;
    return PyBool_FromLong(shoal_ring_is_pool(&self->ring));
}

static PyObject *ring_set_notify_fd(RingObject *self, PyObject *arg)
{
    int fd = (int)PyLong_AsLong(arg);
    if (PyErr_Occurred())
        return NULL;
    shoal_ring_set_notify_fd(&self->ring, fd);
    Py_RETURN_NONE;
}

/* set_doorbell(block, offset): both sides of the ring wake its consumer
 * through the doorbell at offset in block; set_doorbell(None) goes back to
 * the ring's own. */
static PyObject *ring_set_doorbell(RingObject *self, PyObject *args)
{
    PyObject *block;
    Py_ssize_t offset = 0;
    if (!PyArg_ParseTuple(args, "O|n:set_doorbell", &block, &offset))
        return NULL;
    void *db = NULL;
    if (block != Py_None && !(db = doorbell_at(block, offset)))
        return NULL;
    shoal_ring_set_doorbell(&self->ring, db);
    Py_XSETREF(self->db_block, block == Py_None ? NULL : Py_NewRef(block));
    Py_RETURN_NONE;
}

static PyObject *ring_get_closed(RingObject *self, void *unused)
{
    (void)unused;
    return PyBool_FromLong(shoal_ring_closed(&self->ring));
}

static PyObject *ring_close(RingObject *self, PyObject *unused)
{
    (void)unused;
    shoal_ring_close(&self->ring);
    Py_RETURN_NONE;
}

static Py_ssize_t ring_len(RingObject *self)
{
    return (Py_ssize_t)shoal_ring_count(&self->ring);
}

static PyMethodDef ring_methods[] = {
    {"size", (PyCFunction)ring_size, METH_O | METH_CLASS, "size(nslots) -> bytes a ring of nslots needs"},
    {"push", (PyCFunction)(void (*)(void))ring_push, METH_VARARGS | METH_KEYWORDS,
     "push(slots, wake=True) -> how many 64-byte slots were appended (wake=False: wake() later)"},
    {"wake", (PyCFunction)ring_wake, METH_NOARGS, "wake() -> True if the consumer slept (and was woken)"},
    {"put", (PyCFunction)ring_put, METH_O, "pool: put(slot) -> its position, None if full (wakes nobody)"},
    {"take", (PyCFunction)ring_take, METH_O, "pool: take(who) -> (position, slot), None if nothing waits"},
    {"withdraw", (PyCFunction)ring_withdraw, METH_O, "pool: withdraw(pos) -> True if nobody had taken it"},
    {"owner", (PyCFunction)ring_owner, METH_O,
     "pool: owner(pos) -> the taker's id, POOL_WAITING, or POOL_GONE (withdrawn, retired, not there)"},
    {"retire", (PyCFunction)ring_retire, METH_O, "pool: retire(pos): its task is done with; the slot may be reused"},
    {"pop", (PyCFunction)ring_pop, METH_VARARGS, "pop(max=64) -> up to max slots, as one bytes object"},
    {"pop_into", (PyCFunction)ring_pop_into, METH_VARARGS,
     "pop_into(list, max=64) -> slots popped (up to max), appended to list as one bytes object"},
    {"wait", (PyCFunction)(void (*)(void))ring_wait, METH_VARARGS | METH_KEYWORDS,
     "wait(timeout=-1, spin=50e-6) -> True when a slot can be popped, False on timeout"},
    {"set_notify_fd", (PyCFunction)ring_set_notify_fd, METH_O,
     "set_notify_fd(fd): as producer, wake the consumer through this eventfd"},
    {"close", (PyCFunction)ring_close, METH_NOARGS, "close the ring; a waiting consumer wakes"},
    {"set_doorbell", (PyCFunction)ring_set_doorbell, METH_VARARGS,
     "set_doorbell(block, offset=0): wake the consumer through the doorbell there (None: the ring's own)"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef ring_getset[] = {
    {"closed", (getter)ring_get_closed, NULL, "whether either side closed the ring", NULL},
    {"is_pool", (getter)ring_get_is_pool, NULL, "whether it is a pool (one producer, many takers)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PySequenceMethods ring_as_sequence = {.sq_length = (lenfunc)ring_len};

static PyTypeObject RingType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shoal._core.Ring",
    .tp_basicsize = sizeof(RingObject),
    .tp_dealloc = (destructor)ring_dealloc,
    .tp_as_sequence = &ring_as_sequence,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Ring(block, nslots=0, offset=0, pool=False): a single-producer single-consumer ring of 64-byte "
              "slots at offset in a writable block (nslots > 0 formats a new one); pool=True formats a pool, "
              "which many consumers take from (put, take, withdraw, owner, retire).",
    .tp_methods = ring_methods,
    .tp_getset = ring_getset,
    .tp_new = ring_new,
};

/* Doorbell(block, offset=0, clear=False) */
static PyObject *doorbell_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"block", "offset", "clear", NULL};
    PyObject *block;
    Py_ssize_t offset = 0;
    int clear = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|np:Doorbell", kwlist, &block, &offset, &clear))
        return NULL;
    void *db = doorbell_at(block, offset);
    if (!db)
        return NULL;
    DoorbellObject *self = (DoorbellObject *)type->tp_alloc(type, 0);
    if (!self)
        return NULL;
    if (clear)
        memset(db, 0, SHOAL_DOORBELL_SIZE);
    self->block = Py_NewRef(block);
    self->db = db;
    return (PyObject *)self;
}

static void doorbell_dealloc(DoorbellObject *self)
{
    Py_XDECREF(self->block);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* wait(rings, timeout=-1, spin=50e-6) -> True when one of the rings (which
 * must all use this doorbell) has something, or is closed; False on timeout. */
static PyObject *doorbell_wait(DoorbellObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"rings", "timeout", "spin", "want", NULL};
    PyObject *seq;
    double timeout = -1, spin = 50e-6;
    Py_ssize_t want = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|ddn:wait", kwlist, &seq, &timeout, &spin, &want))
        return NULL;
    if (want < 1 || want > UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "want is how many pushes wake the wait: 1 or more");
        return NULL;
    }
    PyObject *fast = PySequence_Fast(seq, "wait takes a sequence of Rings");
    if (!fast)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    shoal_ring **rings = PyMem_Malloc((size_t)(n ? n : 1) * sizeof *rings);
    if (!rings) {
        Py_DECREF(fast);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *o = PySequence_Fast_GET_ITEM(fast, i);
        if (!PyObject_TypeCheck(o, &RingType)) {
            PyMem_Free(rings);
            Py_DECREF(fast);
            PyErr_SetString(PyExc_TypeError, "wait takes a sequence of Rings");
            return NULL;
        }
        rings[i] = &((RingObject *)o)->ring;
    }
    int rc;
    int64_t t = timeout < 0 ? -1 : (int64_t)(timeout * 1e9), s = (int64_t)(spin * 1e9);
    /* The list keeps the Rings (and their memory) alive while we wait. */
    Py_BEGIN_ALLOW_THREADS
    rc = shoal_doorbell_wait_n(self->db, rings, (size_t)n, (uint32_t)want, s, t);
    Py_END_ALLOW_THREADS
    PyMem_Free(rings);
    Py_DECREF(fast);
    if (rc == -ETIMEDOUT)
        Py_RETURN_FALSE;
    if (rc < 0)
        return ring_errno(rc, "wait failed");
    Py_RETURN_TRUE;
}

static PyMethodDef doorbell_methods[] = {
    {"wait", (PyCFunction)(void (*)(void))doorbell_wait, METH_VARARGS | METH_KEYWORDS,
     "wait(rings, timeout=-1, spin=50e-6, want=1) -> True when one of the rings has something or is closed, "
     "False on timeout; once asleep, only the want-th push wakes it"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject DoorbellType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shoal._core.Doorbell",
    .tp_basicsize = sizeof(DoorbellObject),
    .tp_dealloc = (destructor)doorbell_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Doorbell(block, offset=0, clear=False): the doorbell at offset in a writable block, which the "
              "consumer of many rings waits on (rings point at it with Ring.set_doorbell).",
    .tp_methods = doorbell_methods,
    .tp_new = doorbell_new,
};

int shoal__ring_init(PyObject *m)
{
    if (PyType_Ready(&RingType) < 0 || PyType_Ready(&DoorbellType) < 0)
        return -1;
    if (PyModule_AddIntConstant(m, "RING_BELL_OFFSET", SHOAL_RING_BELL_OFFSET) < 0 ||
        PyModule_AddIntConstant(m, "POOL_WAITING", SHOAL_POOL_WAITING) < 0 ||
        PyModule_AddIntConstant(m, "POOL_GONE", SHOAL_POOL_GONE) < 0)
        return -1;
    if (PyModule_AddObjectRef(m, "Ring", (PyObject *)&RingType) < 0)
        return -1;
    return PyModule_AddObjectRef(m, "Doorbell", (PyObject *)&DoorbellType);
}
