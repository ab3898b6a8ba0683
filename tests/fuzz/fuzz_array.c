/*
 * tests/fuzz/fuzz_array.c - array descriptors (shm/array.c):
 * shoal_array_desc_decode, shoal_array_desc_check and, for what decodes,
 * shoal_array_desc_encode - what Arena.view runs on a descriptor that
 * another process sent before it builds a numpy view.
 *
 * Input: the block's length (8 bytes, little-endian), then the descriptor.
 * What decodes must encode back to the same bytes. What the check accepts
 * is walked element by element (when there are few enough) in a heap buffer
 * of exactly the block's length, so that AddressSanitizer sees any element
 * the check let reach outside the block; the offsets are also compared with
 * the block's bounds directly.
 */
#include <shoal/array.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHECK(cond)                                                                                              \
    do {                                                                                                         \
        if (!(cond)) {                                                                                           \
            fprintf(stderr, "fuzz_array: %s:%d: %s\n", __FILE__, __LINE__, #cond);                             \
            abort();                                                                                             \
        }                                                                                                        \
    } while (0)

#define WALK_MAX_BLOCK (1u << 16)
#define WALK_MAX_ELEMENTS 4096u

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Visits every element of d, touching its first and last byte in buf. */
static void walk(const shoal_array_desc *d, const uint8_t *buf, uint64_t block_len)
{
    uint64_t idx[SHOAL_ARRAY_MAXDIM] = {0};
    volatile uint8_t sink = 0;
    for (;;) {
        __extension__ __int128 off = d->offset;
        for (uint32_t i = 0; i < d->ndim; i++)
            off += (__int128)idx[i] * d->strides[i];
        CHECK(off >= 0 && off + d->itemsize <= block_len);
        sink ^= buf[(size_t)off];
        sink ^= buf[(size_t)off + d->itemsize - 1];
        uint32_t i = d->ndim;
        while (i > 0 && ++idx[i - 1] == (uint64_t)d->shape[i - 1])
            idx[--i] = 0;
        if (i == 0)
            break;
    }
    (void)sink;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 8)
        return 0;
    uint64_t block_len = 0;
    for (int i = 0; i < 8; i++)
        block_len |= (uint64_t)data[i] << (8 * i);
    data += 8;
    size -= 8;

    shoal_array_desc d;
    int rc = shoal_array_desc_decode(data, size, &d);
    if (rc < 0) {
        CHECK(rc == -EPROTO);
        return 0;
    }
    CHECK(d.ndim <= SHOAL_ARRAY_MAXDIM && shoal_array_desc_size(&d) == size);
    uint8_t again[SHOAL_ARRAY_DESC_FIXED + 16 * SHOAL_ARRAY_MAXDIM];
    size_t len = 0;
    CHECK(shoal_array_desc_encode(&d, again, sizeof again, &len) == 0);
    CHECK(len == size && !memcmp(again, data, size));

    rc = shoal_array_desc_check(&d, block_len);
    if (rc < 0) {
        CHECK(rc == -EINVAL || rc == -ERANGE);
        return 0;
    }
    CHECK(d.itemsize > 0);
    uint64_t count = 1;
    for (uint32_t i = 0; i < d.ndim; i++) {
        CHECK(d.shape[i] >= 0);
        if (__builtin_mul_overflow(count, (uint64_t)d.shape[i], &count))
            count = UINT64_MAX;
    }
    if (count == 0) {
        CHECK(d.offset <= block_len);
        return 0;
    }
    if (block_len > WALK_MAX_BLOCK || count > WALK_MAX_ELEMENTS)
        return 0;
    uint8_t *buf = malloc(block_len ? block_len : 1);
    CHECK(buf);
    memset(buf, 0, block_len);
    walk(&d, buf, block_len);
    free(buf);
    return 0;
}
