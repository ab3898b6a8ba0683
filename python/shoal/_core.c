/*
 * python/shoal/_core.c - the shoal._core extension: the node arena from Python.
 *
 * Arena wraps one shoal_arena; Block owns exactly one reference to one block
 * and is the base object of every numpy array built over arena memory, so the
 * reference lives exactly as long as the last array (or memoryview) that uses
 * it. Read-only views are enforced twice: the array is created without
 * NPY_ARRAY_WRITEABLE, and the Block refuses writable buffer requests, so
 * numpy cannot be talked into making it writable later.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <numpy/arrayobject.h>

#include <shoal/arena.h>
#include <shoal/array.h>
#include <shoal/bulk.h>

#include "_common.h"
#include "_ring.h"
#include "_socket.h"
#include "_xfer.h"

#include <errno.h>
#include <pthread.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

typedef struct {
    PyObject_HEAD
    shoal_arena *arena;
    Py_ssize_t live_blocks; /* Blocks that still hold a reference */
    int attached; /* 1 if made by attach(), 0 if created here */
} ArenaObject;

typedef struct {
    PyObject_HEAD
    ArenaObject *owner; /* strong: keeps the mapping alive */
    shoal_handle handle;
    uint64_t win_off; /* the bytes its buffer exposes: [win_off, win_off + win_len) */
    uint64_t win_len;
    int readonly;
    /* A copy-on-write Block (acquire_bytes(private=True)): its buffer is a
     * private mapping of the block's pages, win_len bytes at priv + priv_delta;
     * writes stay in this process. NULL for a Block of the shared mapping. */
    uint8_t *priv;
    size_t priv_len;
    size_t priv_delta;
} BlockObject;

static PyTypeObject ArenaType;
static PyTypeObject BlockType;

/* Raises OSError(errnum, "what: reason"); OSError picks the subclass that
 * matches errnum (FileNotFoundError for ENOENT, and so on). Returns NULL. */
PyObject *shoal__raise_oserror(int errnum, const char *what, const char *reason)
{
    PyObject *args = Py_BuildValue("(iN)", errnum, PyUnicode_FromFormat("%s: %s", what, reason));
    if (!args)
        return NULL;
    PyObject *exc = PyObject_Call(PyExc_OSError, args, NULL);
    Py_DECREF(args);
    if (exc) {
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
    }
    return NULL;
}

/* The same for a negative errno from the C core. */
static PyObject *raise_errno(int neg, const char *what)
{
    return shoal__raise_oserror(-neg, what, strerror(-neg));
}

/* n bytes in the unit that reads best: "512 B", "3.0 MiB", "1.5 GiB". */
static void human_size(char *out, size_t len, uint64_t n)
{
    if (n < 1024)
        snprintf(out, len, "%llu B", (unsigned long long)n);
    else if (n < (1ull << 20))
        snprintf(out, len, "%.1f KiB", (double)n / 1024);
    else if (n < (1ull << 30))
        snprintf(out, len, "%.1f MiB", (double)n / (1 << 20));
    else
        snprintf(out, len, "%.1f GiB", (double)n / (1 << 30));
}

/* Raises the OSError of a failed allocation of n bytes: for a request that
 * the arena cannot hold (EINVAL) or has no free block for (ENOMEM), the
 * message gives the sizes and says how to make the arena larger. */
static PyObject *raise_alloc_error(shoal_arena *a, int neg, uint64_t n)
{
    shoal_arena_stats st;
    if ((neg != -EINVAL && neg != -ENOMEM) || shoal_arena_get_stats(a, &st) < 0)
        return raise_errno(neg, "arena allocation failed");
    char asked[32], heap[32], free_[32], largest[32], why[512];
    human_size(asked, sizeof asked, n);
    human_size(heap, sizeof heap, st.heap_size);
    human_size(free_, sizeof free_, st.free_bytes);
    human_size(largest, sizeof largest, st.largest_free);
    if (neg == -ENOMEM && st.largest_free >= n)
        snprintf(why, sizeof why, "%llu bytes (%s) asked; the arena has a free block for them, but the system "
                 "or this process's memory cgroup cannot supply the pages", (unsigned long long)n, asked);
    else
        snprintf(why, sizeof why, "%llu bytes (%s) asked, and the arena %s %llu bytes (%s; %s free, the largest "
                 "free block %s); `shoal start --arena-size BYTES` (shoal-agent --arena-size) sets its size",
                 (unsigned long long)n, asked, neg == -EINVAL ? "holds only" : "holds", (unsigned long long)st.heap_size,
                 heap, free_, largest);
    return shoal__raise_oserror(-neg, "arena allocation failed", why);
}

static int arena_usable(ArenaObject *self)
{
    if (!self->arena) {
        PyErr_SetString(PyExc_ValueError, "this shoal Arena is closed");
        return -1;
    }
    return 0;
}

/* ---- Block ---------------------------------------------------------------- */

/* Makes a Block that takes over one reference already held for handle. */
static BlockObject *block_new(ArenaObject *owner, shoal_handle h, int readonly)
{
    BlockObject *b = PyObject_New(BlockObject, &BlockType);
    if (!b)
        return NULL;
    Py_INCREF(owner);
    b->owner = owner;
    b->handle = h;
    b->win_off = 0;
    b->win_len = h.length;
    b->readonly = readonly;
    b->priv = NULL;
    b->priv_len = b->priv_delta = 0;
    owner->live_blocks++;
    return b;
}

static void block_dealloc(BlockObject *self)
{
    ArenaObject *owner = self->owner;
    if (self->priv)
        munmap(self->priv, self->priv_len); /* before the reference: the pages must not be reused under it */
    if (owner && owner->arena) {
        int rc;
        Py_BEGIN_ALLOW_THREADS
        rc = shoal_arena_release(owner->arena, self->handle);
        Py_END_ALLOW_THREADS
        /* -ECHILD: a forked child inherited this object; the parent still
         * holds the reference, so there is nothing to release here. */
        (void)rc;
    }
    if (owner) {
        owner->live_blocks--;
        Py_DECREF(owner);
    }
    PyObject_Free(self);
}

static int block_getbuffer(BlockObject *self, Py_buffer *view, int flags)
{
    if ((flags & PyBUF_WRITABLE) && self->readonly) {
        PyErr_SetString(PyExc_BufferError,
                        "this shoal arena block is shared read-only; view it with readonly=False "
                        "only if every process may see your writes");
        return -1;
    }
    if (self->priv)
        return PyBuffer_FillInfo(view, (PyObject *)self, self->priv + self->priv_delta, (Py_ssize_t)self->win_len,
                                 0, flags);
    void *p;
    int rc = shoal_arena_ptr(self->owner->arena, self->handle, &p);
    if (rc < 0) {
        raise_errno(rc, "shoal block is no longer valid");
        return -1;
    }
    if (PyBuffer_FillInfo(view, (PyObject *)self, (uint8_t *)p + self->win_off, (Py_ssize_t)self->win_len,
                          self->readonly, flags) < 0)
        return -1;
    return 0;
}

static PyBufferProcs block_as_buffer = {
    .bf_getbuffer = (getbufferproc)block_getbuffer,
};

static PyObject *block_get_handle(BlockObject *self, void *closure)
{
    (void)closure;
    return Py_BuildValue("(KKK)", (unsigned long long)self->handle.offset,
                         (unsigned long long)self->handle.length, (unsigned long long)self->handle.generation);
}

static PyObject *block_get_address(BlockObject *self, void *closure)
{
    (void)closure;
    if (self->priv) /* where its first exposed byte is, less win_off, as for a shared Block */
        return PyLong_FromVoidPtr(self->priv + self->priv_delta - self->win_off);
    return PyLong_FromVoidPtr((uint8_t *)shoal_arena_base(self->owner->arena) + self->handle.offset);
}

static PyObject *block_get_arena(BlockObject *self, void *closure)
{
    (void)closure;
    Py_INCREF(self->owner);
    return (PyObject *)self->owner;
}

static PyObject *block_get_readonly(BlockObject *self, void *closure)
{
    (void)closure;
    return PyBool_FromLong(self->readonly);
}

static PyObject *block_get_private(BlockObject *self, void *closure)
{
    (void)closure;
    return PyBool_FromLong(self->priv != NULL);
}

static PyObject *block_repr(BlockObject *self)
{
    return PyUnicode_FromFormat("<shoal Block offset=%llu length=%llu generation=%llu%s>",
                                (unsigned long long)self->handle.offset,
                                (unsigned long long)self->handle.length,
                                (unsigned long long)self->handle.generation,
                                self->priv ? " copy-on-write" : self->readonly ? " read-only" : "");
}

static PyGetSetDef block_getset[] = {
    {"handle", (getter)block_get_handle, NULL, "(offset, length, generation) of the block", NULL},
    {"readonly", (getter)block_get_readonly, NULL, "whether buffers of this block are read-only", NULL},
    {"private", (getter)block_get_private, NULL,
     "whether its buffer is a private copy-on-write mapping (writes stay in this process)", NULL},
    {"address", (getter)block_get_address, NULL, "address of the block's first byte in this process", NULL},
    {"arena", (getter)block_get_arena, NULL, "the Arena this block lives in", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject BlockType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shoal._core.Block",
    .tp_basicsize = sizeof(BlockObject),
    .tp_dealloc = (destructor)block_dealloc,
    .tp_repr = (reprfunc)block_repr,
    .tp_as_buffer = &block_as_buffer,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One reference to one arena block; released when the object is collected.",
    .tp_getset = block_getset,
};

/* ---- Arena ---------------------------------------------------------------- */

static PyObject *arena_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"heap_size", "retain_bytes", "prefault", "populate", "max_holders", "max_refs", NULL};
    unsigned long long heap = 0, retain = 0;
    int prefault = 0, populate = 1;
    unsigned int holders = 0, refs = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|KKppII:Arena", kwlist, &heap, &retain, &prefault, &populate,
                                     &holders, &refs))
        return NULL;
    shoal_arena_opts o = {
        .heap_size = heap,
        .retain_bytes = retain,
        .max_holders = holders,
        .max_refs = refs,
        .flags = (prefault ? SHOAL_ARENA_PREFAULT_THREAD : 0) | (populate ? 0 : SHOAL_ARENA_NO_POPULATE),
    };
    ArenaObject *self = (ArenaObject *)type->tp_alloc(type, 0);
    if (!self)
        return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = shoal_arena_create(&o, &self->arena);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        Py_DECREF(self);
        return raise_errno(rc, "cannot create a shoal arena");
    }
    return (PyObject *)self;
}

static PyObject *arena_attach(PyTypeObject *type, PyObject *args)
{
    int fd;
    if (!PyArg_ParseTuple(args, "i:attach", &fd))
        return NULL;
    ArenaObject *self = (ArenaObject *)type->tp_alloc(type, 0);
    if (!self)
        return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = shoal_arena_attach(fd, &self->arena);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        Py_DECREF(self);
        return raise_errno(rc, "cannot attach to the shoal arena behind this fd");
    }
    self->attached = 1;
    return (PyObject *)self;
}

static void arena_dealloc(ArenaObject *self)
{
    /* Blocks hold a strong reference to us, so none is alive here. */
    shoal_arena_close(self->arena);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *arena_close(ArenaObject *self, PyObject *unused)
{
    (void)unused;
    if (!self->arena)
        Py_RETURN_NONE;
    if (self->live_blocks) {
        PyErr_Format(PyExc_BufferError,
                     "cannot close the arena: %zd arrays or blocks still use it; delete them first",
                     self->live_blocks);
        return NULL;
    }
    shoal_arena *a = self->arena;
    self->arena = NULL;
    Py_BEGIN_ALLOW_THREADS
    shoal_arena_close(a);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *arena_get_fd(ArenaObject *self, void *closure)
{
    (void)closure;
    if (arena_usable(self) < 0)
        return NULL;
    return PyLong_FromLong(shoal_arena_fd(self->arena));
}

static PyObject *arena_alloc(ArenaObject *self, PyObject *args)
{
    unsigned long long n;
    if (!PyArg_ParseTuple(args, "K:alloc", &n) || arena_usable(self) < 0)
        return NULL;
    shoal_handle h;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = shoal_arena_alloc(self->arena, n, &h);
    Py_END_ALLOW_THREADS
    if (rc < 0)
        return raise_alloc_error(self->arena, rc, n);
    BlockObject *b = block_new(self, h, 0);
    if (!b) {
        shoal_arena_release(self->arena, h);
        return NULL;
    }
    return (PyObject *)b;
}

/* ---- message blocks (docs/engine.md, "Message blocks") ---- */

#define MSGBLOCK_MAGIC 0x464D4853u /* "SHMF" */
#define MSGBLOCK_HDR 16u           /* magic, frames, payload frames, flags; then a length per frame */
#define MSGBLOCK_MAX_FRAMES 4096u

/* pack(frames, npayload) -> Block: the frames (bytes-like objects) written
 * into one new block as a message block, the first npayload of them its
 * payload. */
static PyObject *arena_pack(ArenaObject *self, PyObject *args)
{
    PyObject *seq;
    Py_ssize_t npayload;
    if (!PyArg_ParseTuple(args, "On:pack", &seq, &npayload) || arena_usable(self) < 0)
        return NULL;
    PyObject *fast = PySequence_Fast(seq, "pack takes a sequence of bytes-like frames");
    if (!fast)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    if (n > (Py_ssize_t)MSGBLOCK_MAX_FRAMES || npayload < 0 || npayload > n) {
        Py_DECREF(fast);
        PyErr_Format(PyExc_ValueError, "a message block has at most %u frames, the payload among them",
                     MSGBLOCK_MAX_FRAMES);
        return NULL;
    }
    Py_buffer *v = PyMem_Calloc((size_t)(n ? n : 1), sizeof *v);
    if (!v) {
        Py_DECREF(fast);
        return PyErr_NoMemory();
    }
    PyObject *out = NULL;
    Py_ssize_t got = 0;
    uint64_t total = MSGBLOCK_HDR + 8 * (uint64_t)n;
    for (; got < n; got++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(fast, got), &v[got], PyBUF_C_CONTIGUOUS) < 0)
            goto done;
        total += (uint64_t)v[got].len;
    }
    shoal_handle h;
    int rc = shoal_arena_alloc(self->arena, total, &h);
    if (rc < 0) {
        raise_alloc_error(self->arena, rc, total);
        goto done;
    }
    void *mem = NULL;
    if ((rc = shoal_arena_ptr(self->arena, h, &mem)) < 0) {
        shoal_arena_release(self->arena, h);
        raise_errno(rc, "a new block cannot be mapped");
        goto done;
    }
    uint8_t *p = mem;
    uint32_t hdr[4] = {MSGBLOCK_MAGIC, (uint32_t)n, (uint32_t)npayload, 0};
    memcpy(p, hdr, sizeof hdr);
    uint64_t pos = MSGBLOCK_HDR + 8 * (uint64_t)n;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t len = (uint64_t)v[i].len;
        memcpy(p + MSGBLOCK_HDR + 8 * (size_t)i, &len, 8);
        if (len)
            memcpy(p + pos, v[i].buf, len);
        pos += len;
    }
    out = (PyObject *)block_new(self, h, 0);
    if (!out)
        shoal_arena_release(self->arena, h);
done:
    for (Py_ssize_t i = 0; i < got; i++)
        PyBuffer_Release(&v[i]);
    PyMem_Free(v);
    Py_DECREF(fast);
    return out;
}

/* unpack_frames(buf) -> (payload frames, buffer frames): lists of
 * memoryviews of buf, a message block, without a copy. The block is input:
 * ValueError if it does not add up. */
static PyObject *core_unpack_frames(PyObject *mod, PyObject *buf)
{
    (void)mod;
    PyObject *view = PyMemoryView_FromObject(buf);
    if (!view)
        return NULL;
    Py_buffer *b = PyMemoryView_GET_BUFFER(view);
    if (b->ndim != 1 || b->itemsize != 1 || !PyBuffer_IsContiguous(b, 'C')) {
        PyObject *cast = PyObject_CallMethod(view, "cast", "s", "B");
        Py_DECREF(view);
        if (!cast)
            return NULL;
        view = cast;
        b = PyMemoryView_GET_BUFFER(view);
    }
    const uint8_t *p = b->buf;
    uint64_t len = (uint64_t)b->len;
    PyObject *payload = NULL, *buffers = NULL, *out = NULL;
    uint32_t w[4];
    if (len < MSGBLOCK_HDR)
        goto bad;
    memcpy(w, p, sizeof w);
    if (w[0] != MSGBLOCK_MAGIC || w[2] > w[1] || w[1] > MSGBLOCK_MAX_FRAMES || MSGBLOCK_HDR + 8 * (uint64_t)w[1] > len)
        goto bad;
    if (!(payload = PyList_New(w[2])) || !(buffers = PyList_New(w[1] - w[2])))
        goto done;
    uint64_t pos = MSGBLOCK_HDR + 8 * (uint64_t)w[1];
    for (uint32_t i = 0; i < w[1]; i++) {
        uint64_t n;
        memcpy(&n, p + MSGBLOCK_HDR + 8 * (size_t)i, 8);
        if (n > len - pos) {
            PyErr_SetString(PyExc_ValueError, "a frame runs past its message block");
            goto done;
        }
        PyObject *lo = PyLong_FromUnsignedLongLong(pos), *hi = PyLong_FromUnsignedLongLong(pos + n);
        PyObject *slice = lo && hi ? PySlice_New(lo, hi, NULL) : NULL;
        Py_XDECREF(lo);
        Py_XDECREF(hi);
        PyObject *frame = slice ? PyObject_GetItem(view, slice) : NULL;
        Py_XDECREF(slice);
        if (!frame)
            goto done;
        if (i < w[2])
            PyList_SET_ITEM(payload, i, frame);
        else
            PyList_SET_ITEM(buffers, i - w[2], frame);
        pos += n;
    }
    out = PyTuple_Pack(2, payload, buffers);
    goto done;
bad:
    PyErr_SetString(PyExc_ValueError, "not a shoal message block");
done:
    Py_XDECREF(payload);
    Py_XDECREF(buffers);
    Py_DECREF(view);
    return out;
}

/* Builds an ndarray over p with base `block` (reference stolen). */
static PyObject *make_array(PyArray_Descr *descr, int nd, npy_intp *dims, npy_intp *strides, void *p,
                            int flags, BlockObject *block)
{
    PyObject *arr = PyArray_NewFromDescr(&PyArray_Type, descr, nd, dims, strides, p, flags, NULL);
    if (!arr) {
        Py_DECREF(block);
        return NULL;
    }
    if (PyArray_SetBaseObject((PyArrayObject *)arr, (PyObject *)block) < 0) {
        Py_DECREF(arr);
        return NULL;
    }
    return arr;
}

static int refuse_objects(PyArray_Descr *descr)
{
    if (PyDataType_REFCHK(descr)) {
        PyErr_SetString(PyExc_TypeError,
                        "object arrays cannot live in shared memory (they hold pointers into one "
                        "process); pickle them instead");
        return -1;
    }
    if (PyDataType_HASFIELDS(descr) || PyDataType_HASSUBARRAY(descr)) {
        PyErr_SetString(PyExc_TypeError, "structured dtypes are not supported in the arena yet");
        return -1;
    }
    return 0;
}

static PyObject *arena_empty(ArenaObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"shape", "dtype", "order", NULL};
    PyObject *shape_obj, *dtype_obj = Py_None;
    const char *order = "C";
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|Os:empty", kwlist, &shape_obj, &dtype_obj, &order) ||
        arena_usable(self) < 0)
        return NULL;
    if (strcmp(order, "C") && strcmp(order, "F")) {
        PyErr_SetString(PyExc_ValueError, "order must be 'C' or 'F'");
        return NULL;
    }
    PyArray_Dims dims = {NULL, 0};
    if (!PyArray_IntpConverter(shape_obj, &dims))
        return NULL;
    PyArray_Descr *descr = NULL;
    if (!PyArray_DescrConverter2(dtype_obj, &descr))
        goto fail_dims;
    if (!descr)
        descr = PyArray_DescrFromType(NPY_DOUBLE);
    if (refuse_objects(descr) < 0)
        goto fail_descr;
    npy_intp nbytes = PyDataType_ELSIZE(descr);
    for (int i = 0; i < dims.len; i++) {
        if (dims.ptr[i] < 0) {
            PyErr_SetString(PyExc_ValueError, "negative dimensions are not allowed");
            goto fail_descr;
        }
        if (__builtin_mul_overflow(nbytes, dims.ptr[i], &nbytes)) {
            PyErr_SetString(PyExc_ValueError, "array is too big");
            goto fail_descr;
        }
    }
    shoal_handle h;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = shoal_arena_alloc(self->arena, nbytes ? (uint64_t)nbytes : 1, &h);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        raise_alloc_error(self->arena, rc, nbytes ? (uint64_t)nbytes : 1);
        goto fail_descr;
    }
    BlockObject *b = block_new(self, h, 0);
    if (!b) {
        shoal_arena_release(self->arena, h);
        goto fail_descr;
    }
    int flags = NPY_ARRAY_WRITEABLE | (order[0] == 'F' ? NPY_ARRAY_F_CONTIGUOUS : 0);
    PyObject *arr = make_array(descr, dims.len, dims.ptr, NULL, (uint8_t *)shoal_arena_base(self->arena) + h.offset,
                               flags, b);
    PyDimMem_FREE(dims.ptr);
    return arr;

fail_descr:
    Py_DECREF(descr);
fail_dims:
    PyDimMem_FREE(dims.ptr);
    return NULL;
}

static PyObject *arena_describe(ArenaObject *self, PyObject *args)
{
    PyArrayObject *arr;
    if (!PyArg_ParseTuple(args, "O!:describe", &PyArray_Type, &arr) || arena_usable(self) < 0)
        return NULL;
    PyObject *base = (PyObject *)arr;
    while (PyArray_Check(base) && PyArray_BASE((PyArrayObject *)base))
        base = PyArray_BASE((PyArrayObject *)base);
    if (!PyObject_TypeCheck(base, &BlockType) || ((BlockObject *)base)->owner != self) {
        PyErr_SetString(PyExc_ValueError, "this array does not live in this arena");
        return NULL;
    }
    BlockObject *b = (BlockObject *)base;
    PyArray_Descr *descr = PyArray_DESCR(arr);
    if (refuse_objects(descr) < 0)
        return NULL;
    shoal_array_desc d;
    memset(&d, 0, sizeof d);
    PyObject *str = PyObject_GetAttrString((PyObject *)descr, "str");
    if (!str)
        return NULL;
    const char *s = PyUnicode_AsUTF8(str);
    if (!s || strlen(s) >= SHOAL_ARRAY_DTYPE_LEN) {
        if (s)
            PyErr_Format(PyExc_TypeError, "dtype %s cannot be described", s);
        Py_DECREF(str);
        return NULL;
    }
    strcpy(d.dtype, s);
    Py_DECREF(str);
    d.ndim = (uint32_t)PyArray_NDIM(arr);
    d.itemsize = (uint64_t)PyArray_ITEMSIZE(arr);
    uint8_t *start = (uint8_t *)shoal_arena_base(self->arena) + b->handle.offset;
    d.offset = (uint64_t)((uint8_t *)PyArray_DATA(arr) - start);
    for (uint32_t i = 0; i < d.ndim; i++) {
        d.shape[i] = PyArray_DIM(arr, (int)i);
        d.strides[i] = PyArray_STRIDE(arr, (int)i);
    }
    int rc = shoal_array_desc_check(&d, b->handle.length);
    if (rc < 0)
        return raise_errno(rc, "array reaches outside its block");
    uint8_t buf[SHOAL_ARRAY_DESC_FIXED + 16 * SHOAL_ARRAY_MAXDIM];
    size_t len;
    rc = shoal_array_desc_encode(&d, buf, sizeof buf, &len);
    if (rc < 0)
        return raise_errno(rc, "cannot encode the array descriptor");
    return Py_BuildValue("((KKK)y#)", (unsigned long long)b->handle.offset, (unsigned long long)b->handle.length,
                         (unsigned long long)b->handle.generation, (const char *)buf, (Py_ssize_t)len);
}

static int parse_handle(PyObject *o, shoal_handle *h)
{
    unsigned long long off, len, gen;
    if (!PyArg_ParseTuple(o, "KKK;a handle is (offset, length, generation)", &off, &len, &gen))
        return -1;
    h->offset = off;
    h->length = len;
    h->generation = gen;
    return 0;
}

static PyObject *arena_view(ArenaObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"handle", "desc", "readonly", NULL};
    PyObject *hobj;
    Py_buffer db;
    int readonly = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!y*|p:view", kwlist, &PyTuple_Type, &hobj, &db, &readonly))
        return NULL;
    PyObject *result = NULL;
    shoal_handle h;
    shoal_array_desc d;
    if (arena_usable(self) < 0 || parse_handle(hobj, &h) < 0)
        goto out;
    int rc = shoal_array_desc_decode(db.buf, (size_t)db.len, &d);
    if (rc < 0) {
        raise_errno(rc, "malformed array descriptor");
        goto out;
    }
    if ((rc = shoal_array_desc_check(&d, h.length)) < 0) {
        raise_errno(rc, "array descriptor does not fit its block");
        goto out;
    }
    PyObject *dstr = PyUnicode_FromString(d.dtype);
    PyArray_Descr *descr = NULL;
    if (!dstr)
        goto out;
    int ok = PyArray_DescrConverter(dstr, &descr);
    Py_DECREF(dstr);
    if (!ok)
        goto out;
    if (refuse_objects(descr) < 0 || (uint64_t)PyDataType_ELSIZE(descr) != d.itemsize) {
        if (!PyErr_Occurred())
            PyErr_Format(PyExc_ValueError, "descriptor itemsize %llu does not match dtype %s",
                         (unsigned long long)d.itemsize, d.dtype);
        Py_DECREF(descr);
        goto out;
    }
    Py_BEGIN_ALLOW_THREADS
    rc = shoal_arena_acquire(self->arena, h);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        Py_DECREF(descr);
        raise_errno(rc, "cannot use this arena handle");
        goto out;
    }
    BlockObject *b = block_new(self, h, readonly);
    if (!b) {
        shoal_arena_release(self->arena, h);
        Py_DECREF(descr);
        goto out;
    }
    npy_intp dims[SHOAL_ARRAY_MAXDIM], strides[SHOAL_ARRAY_MAXDIM];
    for (uint32_t i = 0; i < d.ndim; i++) {
        dims[i] = (npy_intp)d.shape[i];
        strides[i] = (npy_intp)d.strides[i];
    }
    uint8_t *p = (uint8_t *)shoal_arena_base(self->arena) + h.offset + d.offset;
    result = make_array(descr, (int)d.ndim, dims, strides, p, readonly ? 0 : NPY_ARRAY_WRITEABLE, b);
out:
    PyBuffer_Release(&db);
    return result;
}

static PyObject *arena_acquire_bytes(ArenaObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"handle", "start", "nbytes", "readonly", "private", NULL};
    PyObject *hobj;
    unsigned long long start, nbytes;
    int readonly = 1, private_ = 0;
    shoal_handle h;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!KK|pp:acquire_bytes", kwlist, &PyTuple_Type, &hobj, &start,
                                     &nbytes, &readonly, &private_) ||
        arena_usable(self) < 0 || parse_handle(hobj, &h) < 0)
        return NULL;
    if (start > h.length || nbytes > h.length - start)
        return raise_errno(-ERANGE, "byte range outside its block");
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = shoal_arena_acquire(self->arena, h);
    Py_END_ALLOW_THREADS
    if (rc < 0)
        return raise_errno(rc, "cannot use this arena handle");
    BlockObject *b = block_new(self, h, readonly && !private_);
    if (!b) {
        shoal_arena_release(self->arena, h);
        return NULL;
    }
    b->win_off = start;
    b->win_len = nbytes;
    if (private_) {
        /* The pages under [start, start + nbytes) of the block, mapped
         * privately from the arena's memfd (a handle's offset is the
         * payload's offset in it): reads see the block, the first write to
         * a page copies it for this process alone. The Block keeps its
         * reference, so the pages cannot be freed and reused under it. */
        uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE), first = h.offset + start;
        uint64_t map_off = first & ~(page - 1);
        size_t len = (size_t)(first + (nbytes ? nbytes : 1) - map_off);
        void *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE, shoal_arena_fd(self->arena), (off_t)map_off);
        if (m == MAP_FAILED) {
            int e = errno;
            Py_DECREF(b);
            return shoal__raise_oserror(e, "cannot map an arena block copy-on-write", strerror(e));
        }
        b->priv = m;
        b->priv_len = len;
        b->priv_delta = (size_t)(first - map_off);
    }
    return (PyObject *)b;
}

static PyObject *core_address(PyObject *mod, PyObject *obj)
{
    (void)mod;
    Py_buffer v;
    if (PyObject_GetBuffer(obj, &v, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *r = PyLong_FromVoidPtr(v.buf);
    PyBuffer_Release(&v);
    return r;
}

static PyObject *arena_stats(ArenaObject *self, PyObject *unused)
{
    (void)unused;
    if (arena_usable(self) < 0)
        return NULL;
    shoal_arena_stats s;
    int rc = shoal_arena_get_stats(self->arena, &s);
    if (rc < 0)
        return raise_errno(rc, "cannot read arena stats");
    return Py_BuildValue("{sKsKsKsKsKsKsKsKsKsIsI}", "heap_size", (unsigned long long)s.heap_size, "used_bytes",
                         (unsigned long long)s.used_bytes, "used_blocks", (unsigned long long)s.used_blocks,
                         "free_bytes", (unsigned long long)s.free_bytes, "free_blocks",
                         (unsigned long long)s.free_blocks, "largest_free", (unsigned long long)s.largest_free,
                         "committed_bytes", (unsigned long long)s.committed_bytes, "released_bytes",
                         (unsigned long long)s.released_bytes, "high_water", (unsigned long long)s.high_water,
                         "holders", s.holders, "recoveries", s.recoveries);
}

static PyObject *arena_check(ArenaObject *self, PyObject *unused)
{
    (void)unused;
    if (arena_usable(self) < 0)
        return NULL;
    char msg[256];
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = shoal_arena_check(self->arena, msg, sizeof msg);
    Py_END_ALLOW_THREADS
    if (rc == -EUCLEAN) {
        PyErr_Format(PyExc_RuntimeError, "arena invariant broken: %s", msg);
        return NULL;
    }
    if (rc < 0)
        return raise_errno(rc, "cannot check the arena");
    Py_RETURN_NONE;
}

static PyObject *arena_reclaim(ArenaObject *self, PyObject *args)
{
    int pid;
    if (!PyArg_ParseTuple(args, "i:reclaim", &pid) || arena_usable(self) < 0)
        return NULL;
    int rc = shoal_arena_reclaim(self->arena, pid);
    if (rc < 0)
        return raise_errno(rc, "cannot reclaim that process's references");
    return PyLong_FromLong(rc);
}

static PyObject *arena_reclaim_dead(ArenaObject *self, PyObject *unused)
{
    (void)unused;
    if (arena_usable(self) < 0)
        return NULL;
    int rc = shoal_arena_reclaim_dead(self->arena);
    if (rc < 0)
        return raise_errno(rc, "cannot reclaim dead processes' references");
    return PyLong_FromLong(rc);
}

static PyObject *arena_enter(PyObject *self, PyObject *unused)
{
    (void)unused;
    Py_INCREF(self);
    return self;
}

static PyObject *arena_exit(ArenaObject *self, PyObject *args)
{
    (void)args;
    return arena_close(self, NULL);
}

static PyMethodDef arena_methods[] = {
    {"attach", (PyCFunction)arena_attach, METH_VARARGS | METH_CLASS,
     "attach(fd) -> Arena: map the arena behind an inherited fd and become one of its holders."},
    {"close", (PyCFunction)arena_close, METH_NOARGS,
     "Release this process's references and unmap. Refused while arrays still use the arena."},
    {"alloc", (PyCFunction)arena_alloc, METH_VARARGS, "alloc(nbytes) -> Block holding one reference."},
    {"pack", (PyCFunction)arena_pack, METH_VARARGS,
     "pack(frames, npayload) -> Block: a new message block of the frames, the first npayload the payload."},
    {"empty", (PyCFunction)(void (*)(void))arena_empty, METH_VARARGS | METH_KEYWORDS,
     "empty(shape, dtype=float, order='C') -> writable ndarray in a new block."},
    {"describe", (PyCFunction)arena_describe, METH_VARARGS,
     "describe(array) -> (handle, desc): what another process needs to view this array."},
    {"view", (PyCFunction)(void (*)(void))arena_view, METH_VARARGS | METH_KEYWORDS,
     "view(handle, desc, readonly=True) -> ndarray over the block, holding one new reference."},
    {"acquire_bytes", (PyCFunction)(void (*)(void))arena_acquire_bytes, METH_VARARGS | METH_KEYWORDS,
     "acquire_bytes(handle, start, nbytes, readonly=True, private=False) -> Block exposing bytes [start, start+nbytes) of "
     "the block, holding one new reference; private=True maps them copy-on-write (writes stay in this process)."},
    {"stats", (PyCFunction)arena_stats, METH_NOARGS, "stats() -> dict of the arena's accounting."},
    {"check", (PyCFunction)arena_check, METH_NOARGS, "check(): raise RuntimeError if an invariant is broken."},
    {"reclaim", (PyCFunction)arena_reclaim, METH_VARARGS,
     "reclaim(pid) -> int: release everything a dead process held."},
    {"reclaim_dead", (PyCFunction)arena_reclaim_dead, METH_NOARGS,
     "reclaim_dead() -> int: reclaim every dead process's holder record."},
    {"__enter__", (PyCFunction)arena_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)arena_exit, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef arena_getset[] = {
    {"fd", (getter)arena_get_fd, NULL, "the arena's memfd (pass it to a child to attach)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject ArenaType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shoal._core.Arena",
    .tp_basicsize = sizeof(ArenaObject),
    .tp_dealloc = (destructor)arena_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Arena(heap_size=0, retain_bytes=0, prefault=False, populate=True, max_holders=0, max_refs=0)\n\n"
              "A node's shared-memory arena (a memfd). Zero sizes take the defaults: half of RAM for the heap.",
    .tp_methods = arena_methods,
    .tp_getset = arena_getset,
    .tp_new = arena_new,
};

static int core_exec(PyObject *m)
{
    if (PyArray_ImportNumPyAPI() < 0)
        return -1;
    if (PyType_Ready(&ArenaType) < 0 || PyType_Ready(&BlockType) < 0)
        return -1;
    if (PyModule_AddObjectRef(m, "Arena", (PyObject *)&ArenaType) < 0 ||
        PyModule_AddObjectRef(m, "Block", (PyObject *)&BlockType) < 0)
        return -1;
    if (shoal__socket_init(m) < 0 || PyModule_AddFunctions(m, shoal__socket_functions) < 0 ||
        shoal__ring_init(m) < 0 || shoal__xfer_init(m) < 0)
        return -1;
    if (PyModule_AddIntConstant(m, "ALIGN", SHOAL_ARENA_ALIGN) < 0 ||
        PyModule_AddIntConstant(m, "CHUNK", SHOAL_ARENA_CHUNK) < 0)
        return -1;
    return 0;
}

static PyModuleDef_Slot core_slots[] = {
    {Py_mod_exec, core_exec},
    {0, NULL},
};

/* One thread's share of a copy. */
struct copy_part {
    uint8_t *dst;
    const uint8_t *src;
    size_t len;
};

static void *copy_part_main(void *arg)
{
    struct copy_part *p = arg;
    memcpy(p->dst, p->src, p->len);
    return NULL;
}

#define COPY_MAX_THREADS 16
#define COPY_SHARE (16u << 20) /* at least this much per thread */

/*
 * copy(dst, src, threads=0): copies the bytes of src into dst (contiguous,
 * dst writable and at least as long), split between threads. A copy into
 * shared memory that this process has not touched yet is bounded by mapping
 * its pages one by one (about 1 us per 4 KiB page here), which threads do in
 * parallel; 0 threads: one per core, at most 16, and one per 16 MiB.
 */
static PyObject *core_copy(PyObject *mod, PyObject *args, PyObject *kw)
{
    (void)mod;
    static char *kwlist[] = {"dst", "src", "threads", NULL};
    Py_buffer d, sv;
    int threads = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "w*y*|i:copy", kwlist, &d, &sv, &threads))
        return NULL;
    if (sv.len > d.len) {
        PyBuffer_Release(&d);
        PyBuffer_Release(&sv);
        PyErr_SetString(PyExc_ValueError, "the destination is shorter than the source");
        return NULL;
    }
    size_t len = (size_t)sv.len;
    if (threads <= 0) {
        long cores = sysconf(_SC_NPROCESSORS_ONLN);
        threads = cores > 0 ? (int)cores : 1;
    }
    if ((size_t)threads > len / COPY_SHARE)
        threads = (int)(len / COPY_SHARE);
    if (threads > COPY_MAX_THREADS)
        threads = COPY_MAX_THREADS;
    if (threads < 1)
        threads = 1;
    struct copy_part parts[COPY_MAX_THREADS];
    pthread_t tids[COPY_MAX_THREADS];
    int started[COPY_MAX_THREADS] = {0};
    size_t share = (len / (size_t)threads + 4095) & ~(size_t)4095, pos = 0;
    Py_BEGIN_ALLOW_THREADS
    for (int i = 0; i < threads; i++) {
        size_t n = i == threads - 1 || share > len - pos ? len - pos : share;
        parts[i] = (struct copy_part){(uint8_t *)d.buf + pos, (const uint8_t *)sv.buf + pos, n};
        pos += n;
        /* The last part is ours; a thread that cannot start leaves its part to us too. */
        if (i < threads - 1)
            started[i] = pthread_create(&tids[i], NULL, copy_part_main, &parts[i]) == 0;
    }
    for (int i = 0; i < threads; i++)
        if (!started[i])
            copy_part_main(&parts[i]);
    for (int i = 0; i < threads; i++)
        if (started[i])
            pthread_join(tids[i], NULL);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&d);
    PyBuffer_Release(&sv);
    Py_RETURN_NONE;
}

/*
 * bulk_read(path, offset, dst, depth=0, chunk=0, uring=True, direct=True, register=True) and
 * bulk_write(path, offset, src, ...): the bytes of dst (writable, contiguous) from the file at
 * path starting at offset, or src's bytes into it, through shoal_bulk_read/write (io_uring).
 * Returns a dict of how (bytes, direct_bytes, requests, uring, registered). Raises OSError with
 * the path (EOFError for a file that ends early).
 */
static PyObject *core_bulk(PyObject *args, PyObject *kw, int write)
{
    static char *kwlist[] = {"path", "offset", "buffer", "depth", "chunk", "uring", "direct", "register", NULL};
    PyObject *pathobj;
    unsigned long long off;
    Py_buffer b;
    unsigned depth = 0;
    unsigned long long chunk = 0;
    int uring = 1, direct = 1, reg = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, write ? "O&Ky*|IKppp:bulk_write" : "O&Kw*|IKppp:bulk_read", kwlist,
                                     PyUnicode_FSConverter, &pathobj, &off, &b, &depth, &chunk, &uring, &direct,
                                     &reg))
        return NULL;
    shoal_bulk_opts o = {.depth = depth, .chunk = (size_t)chunk, .no_uring = !uring, .no_direct = !direct,
                         .no_register = !reg};
    shoal_bulk_stats st;
    const char *path = PyBytes_AS_STRING(pathobj);
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = write ? shoal_bulk_write(path, off, b.buf, (size_t)b.len, &o, &st)
               : shoal_bulk_read(path, off, b.buf, (size_t)b.len, &o, &st);
    Py_END_ALLOW_THREADS
    unsigned long long end = off + (unsigned long long)b.len;
    PyBuffer_Release(&b);
    if (rc == -ENODATA) {
        PyErr_Format(PyExc_EOFError, "%s ends before byte %llu: it is shorter than its header says", path, end);
        Py_DECREF(pathobj);
        return NULL;
    }
    if (rc < 0) { /* FileNotFoundError, IsADirectoryError, ... with the path */
        errno = -rc;
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, pathobj);
        Py_DECREF(pathobj);
        return NULL;
    }
    Py_DECREF(pathobj);
    return Py_BuildValue("{sKsKsIsisisi}", "bytes", (unsigned long long)st.bytes, "direct_bytes",
                         (unsigned long long)st.direct_bytes, "requests", st.requests, "uring", st.uring,
                         "registered", st.registered, "cached", st.cached);
}

static PyObject *core_bulk_read(PyObject *mod, PyObject *args, PyObject *kw)
{
    (void)mod;
    return core_bulk(args, kw, 0);
}

static PyObject *core_bulk_write(PyObject *mod, PyObject *args, PyObject *kw)
{
    (void)mod;
    return core_bulk(args, kw, 1);
}

static PyMethodDef core_methods[] = {
    {"bulk_read", (PyCFunction)(void (*)(void))core_bulk_read, METH_VARARGS | METH_KEYWORDS,
     "bulk_read(path, offset, dst, depth=0, chunk=0, uring=True, direct=True, register=True) -> dict: fills dst "
     "with the file's bytes from offset, through io_uring (docs/bulk.md)."},
    {"bulk_write", (PyCFunction)(void (*)(void))core_bulk_write, METH_VARARGS | METH_KEYWORDS,
     "bulk_write(path, offset, src, depth=0, chunk=0, uring=True, direct=True, register=True) -> dict: writes "
     "src's bytes into the existing file from offset, through io_uring (docs/bulk.md)."},
    {"unpack_frames", core_unpack_frames, METH_O,
     "unpack_frames(buf) -> (payload frames, buffer frames): memoryviews of a message block's frames."},
    {"address", core_address, METH_O, "address(obj) -> int: where a contiguous buffer's bytes are in memory."},
    {"copy", (PyCFunction)(void (*)(void))core_copy, METH_VARARGS | METH_KEYWORDS,
     "copy(dst, src, threads=0): copy src's bytes into dst, split between threads (0: one per core, at most one "
     "per 16 MiB)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef core_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "shoal._core",
    .m_doc = "shoal's C core: the node's shared-memory arena and the wire protocol.",
    .m_size = 0,
    .m_methods = core_methods,
    .m_slots = core_slots,
};

PyMODINIT_FUNC PyInit__core(void);
PyMODINIT_FUNC PyInit__core(void)
{
    return PyModuleDef_Init(&core_module);
}
