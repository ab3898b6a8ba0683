/*
 * shoal/bulk.h - reading and writing large files straight into and out of
 * memory (an arena block) with io_uring: several requests in flight, the
 * memory registered with the ring, O_DIRECT where the filesystem takes it
 * and the alignment fits; plain pread/pwrite where io_uring is missing or
 * turned off. docs/bulk.md has the rules and the figures.
 */
#ifndef SHOAL_BULK_H
#define SHOAL_BULK_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SHOAL_BULK_ALIGN 4096u /* what O_DIRECT asks of offsets, lengths and addresses here */

typedef struct shoal_bulk_opts {
    unsigned depth;    /* requests in flight; 0: 8 */
    size_t chunk;      /* bytes per request, a multiple of SHOAL_BULK_ALIGN; 0: 4 MiB */
    int no_uring;      /* pread/pwrite instead of io_uring */
    int no_direct;     /* never O_DIRECT */
    int no_register;   /* do not register the memory with the ring */
} shoal_bulk_opts;

typedef struct shoal_bulk_stats {
    uint64_t bytes;        /* moved */
    uint64_t direct_bytes; /* of them, through O_DIRECT */
    uint32_t requests;     /* submitted (pread/pwrite calls without io_uring) */
    int uring;             /* 1 if io_uring moved them */
    int registered;        /* 1 if the memory was registered with the ring */
    int cached;            /* 1 if most of the file's range was in the page cache (read: no O_DIRECT) */
} shoal_bulk_stats;

/*
 * Reads n bytes of the file at path, from byte off, into buf: through the
 * page cache when most of that range is there already (mincore), else by
 * O_DIRECT where it can (see above). Returns 0, or
 * a negative errno: -ENODATA if the file ends before off + n, -EISDIR for a
 * directory, open's and read's errors otherwise. st (may be NULL) says how.
 */
int shoal_bulk_read(const char *path, uint64_t off, void *buf, size_t n, const shoal_bulk_opts *o,
                    shoal_bulk_stats *st);

/*
 * Writes n bytes of buf to the file at path (which must exist: the caller
 * creates it, with its header), from byte off. Returns 0 or a negative
 * errno. The file is not truncated or synced.
 */
int shoal_bulk_write(const char *path, uint64_t off, const void *buf, size_t n, const shoal_bulk_opts *o,
                     shoal_bulk_stats *st);

#ifdef __cplusplus
}
#endif

#endif /* SHOAL_BULK_H */
