/*
 * tests/shm/test_array.c - array descriptors: round trips, total decoding,
 * and the bounds check that guards every view built from one.
 */
#include <criterion/criterion.h>

#include <shoal/array.h>

#include <errno.h>
#include <stdint.h>
#include <string.h>

static shoal_array_desc desc2d(int64_t rows, int64_t cols)
{
    shoal_array_desc d;
    memset(&d, 0, sizeof d);
    strcpy(d.dtype, "<f8");
    d.ndim = 2;
    d.itemsize = 8;
    d.shape[0] = rows;
    d.shape[1] = cols;
    d.strides[0] = cols * 8;
    d.strides[1] = 8;
    return d;
}

Test(array, encode_decode_round_trip)
{
    shoal_array_desc d = desc2d(3, 5), back;
    d.offset = 128;
    uint8_t buf[2048];
    size_t len;
    cr_assert_eq(shoal_array_desc_encode(&d, buf, sizeof buf, &len), 0);
    cr_assert_eq(len, 40 + 32);
    cr_assert_eq(shoal_array_desc_decode(buf, len, &back), 0);
    cr_assert_eq(memcmp(&d, &back, sizeof d), 0);
    cr_assert_eq(shoal_array_desc_encode(&d, buf, 71, &len), -ENOBUFS);
}

Test(array, encode_rejects_bad_descriptors)
{
    shoal_array_desc d = desc2d(1, 1);
    uint8_t buf[2048];
    size_t len;
    d.ndim = SHOAL_ARRAY_MAXDIM + 1;
    cr_assert_eq(shoal_array_desc_encode(&d, buf, sizeof buf, &len), -EINVAL);
    d = desc2d(1, 1);
    memset(d.dtype, 'x', sizeof d.dtype);
    cr_assert_eq(shoal_array_desc_encode(&d, buf, sizeof buf, &len), -EINVAL);
}

Test(array, decode_is_total)
{
    shoal_array_desc d = desc2d(2, 2), out;
    uint8_t buf[2048];
    size_t len;
    cr_assert_eq(shoal_array_desc_encode(&d, buf, sizeof buf, &len), 0);
    /* Every truncation fails cleanly. */
    for (size_t n = 0; n < len; n++)
        cr_assert_eq(shoal_array_desc_decode(buf, n, &out), -EPROTO, "truncated to %zu", n);
    cr_assert_eq(shoal_array_desc_decode(buf, len + 1, &out), -EPROTO, "trailing byte");
    /* Every single-byte corruption either decodes to something or fails; never crashes. */
    for (size_t i = 0; i < len; i++) {
        uint8_t c[2048];
        memcpy(c, buf, len);
        c[i] ^= 0xff;
        int rc = shoal_array_desc_decode(c, len, &out);
        cr_assert(rc == 0 || rc == -EPROTO);
        if (i < 8 || (i >= 8 && i < 24 && c[i] < 0x21))
            cr_assert_eq(rc, -EPROTO, "corrupt byte %zu accepted", i);
    }
    /* Random bytes. */
    unsigned seed = 7;
    for (int k = 0; k < 10000; k++) {
        uint8_t r[1100];
        size_t n = (size_t)rand_r(&seed) % sizeof r;
        for (size_t i = 0; i < n; i++)
            r[i] = (uint8_t)rand_r(&seed);
        int rc = shoal_array_desc_decode(r, n, &out);
        cr_assert(rc == 0 || rc == -EPROTO);
    }
}

Test(array, check_accepts_what_fits)
{
    shoal_array_desc d = desc2d(3, 5);
    cr_assert_eq(shoal_array_desc_check(&d, 120), 0);
    cr_assert_eq(shoal_array_desc_check(&d, 119), -ERANGE);
    d.offset = 8;
    cr_assert_eq(shoal_array_desc_check(&d, 120), -ERANGE);
    cr_assert_eq(shoal_array_desc_check(&d, 128), 0);
}

Test(array, check_handles_negative_zero_and_fortran_strides)
{
    shoal_array_desc d = desc2d(3, 5);
    /* a[::-1]: element 0 is the last row. */
    d.strides[0] = -40;
    d.offset = 80;
    cr_assert_eq(shoal_array_desc_check(&d, 120), 0);
    d.offset = 72;
    cr_assert_eq(shoal_array_desc_check(&d, 120), -ERANGE, "reaches below the block");
    /* Broadcast: stride 0 reads one row many times. */
    d = desc2d(1000000, 5);
    d.strides[0] = 0;
    cr_assert_eq(shoal_array_desc_check(&d, 40), 0);
    /* Fortran order. */
    d = desc2d(3, 5);
    d.strides[0] = 8;
    d.strides[1] = 24;
    cr_assert_eq(shoal_array_desc_check(&d, 120), 0);
    /* Empty arrays touch nothing. */
    d = desc2d(0, 5);
    cr_assert_eq(shoal_array_desc_check(&d, 0), 0);
    /* 0-d: one element. */
    d.ndim = 0;
    cr_assert_eq(shoal_array_desc_check(&d, 8), 0);
    cr_assert_eq(shoal_array_desc_check(&d, 7), -ERANGE);
}

Test(array, check_rejects_overflow_and_nonsense)
{
    shoal_array_desc d = desc2d(1, 1);
    d.shape[0] = d.shape[1] = INT64_MAX;
    d.strides[0] = d.strides[1] = INT64_MAX;
    cr_assert_eq(shoal_array_desc_check(&d, UINT64_MAX), -ERANGE, "products overflow 64 bits");
    d = desc2d(-1, 5);
    cr_assert_eq(shoal_array_desc_check(&d, 1000), -EINVAL);
    d = desc2d(1, 1);
    d.itemsize = 0;
    cr_assert_eq(shoal_array_desc_check(&d, 1000), -EINVAL);
    d = desc2d(1, 1);
    d.offset = UINT64_MAX - 4;
    cr_assert_eq(shoal_array_desc_check(&d, UINT64_MAX), -ERANGE);
}

Test(array, check_rejects_a_negative_shape_behind_an_empty_one)
{
    /* An empty dimension used to end the check before the shapes after it
     * were looked at (found by fuzz_array). */
    shoal_array_desc d = desc2d(0, -5);
    cr_assert_eq(shoal_array_desc_check(&d, 1000), -EINVAL);
    d = desc2d(-5, 0);
    cr_assert_eq(shoal_array_desc_check(&d, 1000), -EINVAL);
    d = desc2d(0, 5);
    cr_assert_eq(shoal_array_desc_check(&d, 0), 0, "no element: fits anywhere in the block");
}

Test(array, check_sums_of_huge_spans_do_not_wrap)
{
    /* Three spans of almost 2^126 add up past 2^127: in 128-bit arithmetic
     * the sum used to overflow (undefined behaviour, in practice a negative
     * highest byte that passed the check). */
    shoal_array_desc d = desc2d(1, 1);
    d.ndim = 3;
    d.itemsize = 1;
    for (int i = 0; i < 3; i++) {
        d.shape[i] = INT64_MAX;
        d.strides[i] = INT64_MAX;
    }
    cr_assert_eq(shoal_array_desc_check(&d, 1u << 20), -ERANGE);
    for (int i = 0; i < 3; i++)
        d.strides[i] = INT64_MIN;
    d.offset = UINT64_MAX;
    cr_assert_eq(shoal_array_desc_check(&d, UINT64_MAX), -ERANGE);
    /* 64 dimensions of the largest spans, mixed signs. */
    d.ndim = SHOAL_ARRAY_MAXDIM;
    for (uint32_t i = 0; i < d.ndim; i++) {
        d.shape[i] = INT64_MAX;
        d.strides[i] = i % 2 ? INT64_MIN : INT64_MAX;
    }
    cr_assert_eq(shoal_array_desc_check(&d, UINT64_MAX), -ERANGE);
}
