/*
 * shoal/array.h - describing an n-dimensional array that lives in a block.
 *
 * A descriptor is what another process needs, beside the block's handle, to
 * rebuild a numpy array over the same bytes: the element type, the shape, the
 * strides and where element [0, ..., 0] sits in the block. It travels as a
 * little-endian byte string (docs/arena.md has the table); decoding is total,
 * and shoal_array_desc_check proves that every element lies inside the block
 * before anyone builds a view.
 */
#ifndef SHOAL_ARRAY_H
#define SHOAL_ARRAY_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SHOAL_ARRAY_MAXDIM 64 /* numpy 2's NPY_MAXDIMS */
#define SHOAL_ARRAY_DTYPE_LEN 16 /* numpy dtype.str, NUL-padded, e.g. "<f8" */
#define SHOAL_ARRAY_DESC_MAGIC 0x52524153u /* "SARR" */
#define SHOAL_ARRAY_DESC_VERSION 1u
#define SHOAL_ARRAY_DESC_FIXED 40u /* bytes before shape[] */

typedef struct shoal_array_desc {
    char dtype[SHOAL_ARRAY_DTYPE_LEN];
    uint32_t ndim;
    uint64_t itemsize;
    uint64_t offset; /* bytes from the block's first byte to element [0,...,0] */
    int64_t shape[SHOAL_ARRAY_MAXDIM];
    int64_t strides[SHOAL_ARRAY_MAXDIM]; /* bytes; may be negative or zero */
} shoal_array_desc;

/* Bytes that d encodes to. */
size_t shoal_array_desc_size(const shoal_array_desc *d);

/*
 * Writes d's encoding into buf (cap bytes) and its size into *len.
 * Returns 0, -EINVAL (ndim too large, dtype not NUL-terminated) or -ENOBUFS.
 */
int shoal_array_desc_encode(const shoal_array_desc *d, void *buf, size_t cap, size_t *len);

/*
 * Decodes len bytes from buf into *d. Total: any bytes give 0 or -EPROTO
 * (wrong magic or version, wrong length, ndim too large, dtype not printable
 * ASCII); it never reads past buf + len. *d is untouched on failure.
 */
int shoal_array_desc_decode(const void *buf, size_t len, shoal_array_desc *d);

/*
 * Checks that every element d describes lies inside a block of block_len
 * bytes, without overflow: itemsize > 0, shapes >= 0, and the lowest and
 * highest byte any index reaches inside [0, block_len).
 * Returns 0, -EINVAL (bad itemsize or shape) or -ERANGE (outside the block).
 */
int shoal_array_desc_check(const shoal_array_desc *d, uint64_t block_len);

#ifdef __cplusplus
}
#endif

#endif /* SHOAL_ARRAY_H */
