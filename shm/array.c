/*
 * shm/array.c - encoding, decoding and bounds-checking array descriptors.
 *
 * The encoding is explicit little-endian byte by byte, so that it means the
 * same on every host, and the decoder trusts nothing it reads.
 */
#include <shoal/array.h>

#include <errno.h>
#include <string.h>

/* __extension__ keeps -Wpedantic quiet about the GNU 128-bit type. */
__extension__ typedef __int128 i128;

static void put_u64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static uint64_t get_u64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v |= (uint64_t)p[i] << (8 * i);
    return v;
}

static int dtype_ok(const char *s)
{
    size_t n = strnlen(s, SHOAL_ARRAY_DTYPE_LEN);
    if (n == 0 || n == SHOAL_ARRAY_DTYPE_LEN)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (s[i] < 0x21 || s[i] > 0x7e)
            return 0;
    for (size_t i = n; i < SHOAL_ARRAY_DTYPE_LEN; i++)
        if (s[i])
            return 0;
    return 1;
}

size_t shoal_array_desc_size(const shoal_array_desc *d)
{
    return SHOAL_ARRAY_DESC_FIXED + 16u * d->ndim;
}

int shoal_array_desc_encode(const shoal_array_desc *d, void *buf, size_t cap, size_t *len)
{
    if (d->ndim > SHOAL_ARRAY_MAXDIM || !dtype_ok(d->dtype))
        return -EINVAL;
    size_t n = shoal_array_desc_size(d);
    if (cap < n)
        return -ENOBUFS;
    uint8_t *p = buf;
    put_u64(p, SHOAL_ARRAY_DESC_MAGIC | ((uint64_t)SHOAL_ARRAY_DESC_VERSION << 32) |
                   ((uint64_t)d->ndim << 48));
    memcpy(p + 8, d->dtype, SHOAL_ARRAY_DTYPE_LEN);
    put_u64(p + 24, d->itemsize);
    put_u64(p + 32, d->offset);
    for (uint32_t i = 0; i < d->ndim; i++) {
        put_u64(p + SHOAL_ARRAY_DESC_FIXED + 8 * i, (uint64_t)d->shape[i]);
        put_u64(p + SHOAL_ARRAY_DESC_FIXED + 8 * (d->ndim + i), (uint64_t)d->strides[i]);
    }
    *len = n;
    return 0;
}

int shoal_array_desc_decode(const void *buf, size_t len, shoal_array_desc *d)
{
    const uint8_t *p = buf;
    if (len < SHOAL_ARRAY_DESC_FIXED)
        return -EPROTO;
    uint64_t w = get_u64(p);
    uint32_t ndim = p[6];
    if ((uint32_t)w != SHOAL_ARRAY_DESC_MAGIC || ((w >> 32) & 0xffff) != SHOAL_ARRAY_DESC_VERSION ||
        p[7] != 0 || ndim > SHOAL_ARRAY_MAXDIM || len != SHOAL_ARRAY_DESC_FIXED + 16u * ndim)
        return -EPROTO;
    shoal_array_desc out;
    memset(&out, 0, sizeof out);
    memcpy(out.dtype, p + 8, SHOAL_ARRAY_DTYPE_LEN);
    if (!dtype_ok(out.dtype))
        return -EPROTO;
    out.ndim = ndim;
    out.itemsize = get_u64(p + 24);
    out.offset = get_u64(p + 32);
    for (uint32_t i = 0; i < ndim; i++) {
        out.shape[i] = (int64_t)get_u64(p + SHOAL_ARRAY_DESC_FIXED + 8 * i);
        out.strides[i] = (int64_t)get_u64(p + SHOAL_ARRAY_DESC_FIXED + 8 * (ndim + i));
    }
    *d = out;
    return 0;
}

int shoal_array_desc_check(const shoal_array_desc *d, uint64_t block_len)
{
    if (d->itemsize == 0 || d->ndim > SHOAL_ARRAY_MAXDIM)
        return -EINVAL;
    /* Every shape is checked before an empty one ends the check early. */
    int empty = 0;
    for (uint32_t i = 0; i < d->ndim; i++) {
        if (d->shape[i] < 0)
            return -EINVAL;
        empty |= d->shape[i] == 0;
    }
    if (empty)
        return d->offset <= block_len ? 0 : -ERANGE; /* no element exists */
    /* Lowest and highest byte offsets reached, relative to element 0, in
     * signed 128-bit arithmetic: one span is below 2^126 in magnitude, and
     * the sums stop as soon as they leave the block's 2^64, so that none of
     * the 64 additions can overflow. */
    i128 lo = 0, hi = 0;
    for (uint32_t i = 0; i < d->ndim; i++) {
        i128 span = (i128)(d->shape[i] - 1) * d->strides[i];
        if (span < 0)
            lo += span;
        else
            hi += span;
        if (hi > (i128)block_len || lo < -(i128)UINT64_MAX)
            return -ERANGE;
    }
    i128 first = (i128)d->offset + lo;
    i128 last = (i128)d->offset + hi + (i128)d->itemsize;
    if (first < 0 || last > (i128)block_len)
        return -ERANGE;
    return 0;
}
