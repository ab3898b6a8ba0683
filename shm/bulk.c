/*
 * shm/bulk.c - large files into and out of memory with io_uring.
 *
 * The region [0, n) of buf maps to [off, off + n) of the file. When off and
 * buf are aligned to SHOAL_BULK_ALIGN and the filesystem opens the file with
 * O_DIRECT, the aligned body goes through a direct descriptor (no page cache:
 * the device's DMA lands in buf) and the tail of under 4 KiB through the
 * page cache; otherwise all of it goes through the page cache. Either way
 * the body is cut into chunks, `depth` of them in flight on one ring, the
 * memory registered with the ring (fixed buffers: the kernel pins the pages
 * once instead of at every request) when the memlock limit allows it.
 */
#define _GNU_SOURCE
#include <shoal/bulk.h>

#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#define PIECE_MAX (1ull << 30) /* the kernel registers at most 1 GiB per iovec */

/* [off, off + n) through pread or pwrite on fd. */
static int plain(int fd, bool write, uint64_t off, uint8_t *p, size_t n, shoal_bulk_stats *st)
{
    while (n) {
        ssize_t r = write ? pwrite(fd, p, n, (off_t)off) : pread(fd, p, n, (off_t)off);
        st->requests++;
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (r == 0)
            return write ? -EIO : -ENODATA;
        off += (uint64_t)r;
        p += r;
        n -= (size_t)r;
        st->bytes += (uint64_t)r;
    }
    return 0;
}

struct req {
    uint64_t pos; /* from the region's start */
    size_t len;
};

struct xfer {
    struct io_uring ring;
    bool write, fixed, direct, async;
    int fd, bfd; /* the descriptor of the body; the buffered one for what O_DIRECT refuses */
    uint8_t *buf;
    uint64_t off;
    size_t piece; /* bytes per registered iovec, a multiple of the chunk */
    shoal_bulk_stats *st;
};

static void prep(struct xfer *x, struct req *r, uint64_t pos, size_t len)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(&x->ring); /* never NULL: one sqe per request slot */
    r->pos = pos;
    r->len = len;
    uint8_t *p = x->buf + pos;
    uint64_t at = x->off + pos;
    if (x->fixed) {
        int idx = (int)(pos / x->piece);
        if (x->write)
            io_uring_prep_write_fixed(sqe, x->fd, p, (unsigned)len, at, idx);
        else
            io_uring_prep_read_fixed(sqe, x->fd, p, (unsigned)len, at, idx);
    } else if (x->write) {
        io_uring_prep_write(sqe, x->fd, p, (unsigned)len, at);
    } else {
        io_uring_prep_read(sqe, x->fd, p, (unsigned)len, at);
    }
    if (x->async)
        sqe->flags |= IOSQE_ASYNC; /* to the ring's workers: copies from the page cache on every core */
    io_uring_sqe_set_data(sqe, r);
    x->st->requests++;
}

/* The region [0, m) of x through the ring, depth requests of chunk bytes at
 * a time. Returns 0 or a negative errno (after every request in flight has
 * completed: none writes into buf after we return). */
static int ring_transfer(struct xfer *x, size_t m, unsigned depth, size_t chunk)
{
    struct req *reqs = calloc(depth, sizeof *reqs);
    if (!reqs)
        return -ENOMEM;
    uint64_t next = 0;
    unsigned inflight = 0;
    int err = 0;
    for (unsigned i = 0; i < depth && next < m; i++) {
        size_t len = m - next < chunk ? (size_t)(m - next) : chunk;
        prep(x, &reqs[i], next, len);
        next += len;
        inflight++;
    }
    while (inflight) {
        int rc = io_uring_submit_and_wait(&x->ring, 1);
        /* EAGAIN/EBUSY: the kernel could not take them now (no memory for a
         * request, too many completions pending); what it did take still
         * completes, and the rest stays in the submission queue for the
         * next try. Anything else: what was not submitted never will be. */
        bool later = rc == -EINTR || rc == -EAGAIN || rc == -EBUSY || rc == -ENOMEM;
        if (rc < 0 && !later) {
            err = err ? err : rc;
            break;
        }
        struct io_uring_cqe *cqe;
        unsigned head, seen = 0;
        io_uring_for_each_cqe(&x->ring, head, cqe) {
            seen++;
            struct req *r = io_uring_cqe_get_data(cqe);
            int res = cqe->res;
            inflight--;
            if (res == -EAGAIN || res == -EINTR) {
                prep(x, r, r->pos, r->len);
                inflight++;
                continue;
            }
            if (res == -EINVAL && x->direct && !err) {
                /* O_DIRECT refused for this one after all: the page cache. */
                int prc = plain(x->bfd, x->write, x->off + r->pos, x->buf + r->pos, r->len, x->st);
                if (prc < 0)
                    err = prc;
            } else if (res < 0) {
                err = err ? err : res;
            } else if (res == 0) {
                err = err ? err : (x->write ? -EIO : -ENODATA);
            } else {
                x->st->bytes += (uint64_t)res;
                if (x->direct)
                    x->st->direct_bytes += (uint64_t)res;
                if ((size_t)res < r->len && !err) {
                    /* Short: the rest, by the ring if it stays aligned. */
                    uint64_t pos = r->pos + (uint64_t)res;
                    size_t len = r->len - (size_t)res;
                    if (x->direct && (pos % SHOAL_BULK_ALIGN || len % SHOAL_BULK_ALIGN)) {
                        int prc = plain(x->bfd, x->write, x->off + pos, x->buf + pos, len, x->st);
                        if (prc < 0)
                            err = prc;
                    } else {
                        prep(x, r, pos, len);
                        inflight++;
                        continue;
                    }
                }
            }
            if (!err && next < m) {
                size_t len = m - next < chunk ? (size_t)(m - next) : chunk;
                prep(x, r, next, len);
                next += len;
                inflight++;
            }
        }
        io_uring_cq_advance(&x->ring, seen);
        if (rc < 0 && rc != -EINTR && !seen)
            usleep(1000); /* nothing done and nothing taken: give the kernel a moment */
    }
    /* Out on an error: the requests still in the submission queue were
     * never submitted and never touch buf; those submitted may still write
     * into it, so wait for every one of them. */
    inflight -= io_uring_sq_ready(&x->ring);
    if (inflight) {
        while (inflight) {
            struct io_uring_cqe *cqe;
            int rc = io_uring_wait_cqe(&x->ring, &cqe);
            if (rc == -EINTR)
                continue;
            if (rc < 0) { /* never seen; the kernel may still write into buf, so wait on */
                usleep(1000);
                continue;
            }
            io_uring_cqe_seen(&x->ring, cqe);
            inflight--;
        }
    }
    free(reqs);
    return err;
}

/* Whether most of [off, off + n) of fd is in the page cache (mincore of a
 * mapping that is never touched): then reading through the page cache is
 * a copy, and O_DIRECT would go to the device again. */
static bool mostly_cached(int fd, uint64_t off, size_t n)
{
    long page = sysconf(_SC_PAGESIZE);
    if (n == 0)
        return true;
    n += off % (uint64_t)page; /* from the page that holds off */
    off -= off % (uint64_t)page;
    void *m = mmap(NULL, n, PROT_READ, MAP_SHARED, fd, (off_t)off);
    if (m == MAP_FAILED)
        return false;
    size_t pages = (n + (size_t)page - 1) / (size_t)page, in = 0;
    unsigned char *vec = malloc(pages);
    if (vec && mincore(m, n, vec) == 0)
        for (size_t i = 0; i < pages; i++)
            in += vec[i] & 1;
    free(vec);
    munmap(m, n);
    return in * 2 > pages;
}

static int transfer(const char *path, bool write, uint64_t off, uint8_t *buf, size_t n, const shoal_bulk_opts *o,
                    shoal_bulk_stats *out)
{
    shoal_bulk_stats local = {0};
    shoal_bulk_stats *st = out ? out : &local;
    memset(st, 0, sizeof *st);
    shoal_bulk_opts d = {0};
    if (!o)
        o = &d;
    unsigned depth = o->depth ? o->depth : 8;
    size_t chunk = o->chunk ? o->chunk : 4u << 20;
    if (depth > 1024 || chunk % SHOAL_BULK_ALIGN || chunk > PIECE_MAX)
        return -EINVAL;
    int flags = (write ? O_WRONLY : O_RDONLY) | O_CLOEXEC;
    int bfd = open(path, flags);
    if (bfd < 0)
        return -errno;
    struct stat sb;
    if (fstat(bfd, &sb) < 0) {
        int e = -errno;
        close(bfd);
        return e;
    }
    if (S_ISDIR(sb.st_mode)) {
        close(bfd);
        return -EISDIR;
    }
    if (!write && (!S_ISREG(sb.st_mode) || (uint64_t)sb.st_size < off || (uint64_t)sb.st_size - off < n)) {
        close(bfd);
        return S_ISREG(sb.st_mode) ? -ENODATA : -EINVAL;
    }
    /* The body through O_DIRECT when everything lines up, the tail buffered. */
    int dfd = -1;
    size_t body = n;
    bool cached = !write && mostly_cached(bfd, off, n);
    if (!o->no_direct && !cached && off % SHOAL_BULK_ALIGN == 0 && (uintptr_t)buf % SHOAL_BULK_ALIGN == 0 &&
        n >= SHOAL_BULK_ALIGN) {
        dfd = open(path, flags | O_DIRECT);
        if (dfd >= 0)
            body = n / SHOAL_BULK_ALIGN * SHOAL_BULK_ALIGN;
    }
    struct xfer x = {.write = write, .direct = dfd >= 0, .fd = dfd >= 0 ? dfd : bfd, .bfd = bfd, .buf = buf,
                     .off = off, .st = st, .async = cached};
    st->cached = cached;
    int rc = 0;
    bool ring = !o->no_uring && body > 0 && io_uring_queue_init(depth, &x.ring, 0) == 0;
    if (ring) {
        st->uring = 1;
        /* Registering pins the pages once, which pays for reads from the
         * device; for copies out of the page cache it costs more (7 ms for
         * 256 MiB here) than the copies it saves. */
        if (!o->no_register && x.direct) {
            x.piece = PIECE_MAX / chunk * chunk;
            size_t nvec = (body + x.piece - 1) / x.piece;
            struct iovec *iov = calloc(nvec, sizeof *iov);
            if (iov) {
                for (size_t i = 0; i < nvec; i++) {
                    iov[i].iov_base = buf + i * x.piece;
                    iov[i].iov_len = i + 1 < nvec ? x.piece : body - i * x.piece;
                }
                /* Fails past RLIMIT_MEMLOCK (an unprivileged user's 8 MiB,
                 * say): then the requests pin their pages one by one. */
                x.fixed = io_uring_register_buffers(&x.ring, iov, (unsigned)nvec) == 0;
                st->registered = x.fixed;
                free(iov);
            }
        }
        rc = ring_transfer(&x, body, depth, chunk);
        io_uring_queue_exit(&x.ring); /* unregisters */
    } else if (body > 0) {
        rc = plain(x.fd, write, off, buf, body, st);
        if (rc == -EINVAL && x.direct) { /* O_DIRECT refused at the first read: the page cache */
            x.direct = false;
            rc = plain(bfd, write, off, buf, body, st);
        } else if (x.direct) {
            st->direct_bytes = st->bytes;
        }
    }
    if (rc == 0 && body < n)
        rc = plain(bfd, write, off + body, buf + body, n - body, st);
    if (dfd >= 0)
        close(dfd);
    close(bfd);
    return rc;
}

int shoal_bulk_read(const char *path, uint64_t off, void *buf, size_t n, const shoal_bulk_opts *o,
                    shoal_bulk_stats *st)
{
    return transfer(path, false, off, buf, n, o, st);
}

int shoal_bulk_write(const char *path, uint64_t off, const void *buf, size_t n, const shoal_bulk_opts *o,
                     shoal_bulk_stats *st)
{
    return transfer(path, true, off, (uint8_t *)(uintptr_t)buf, n, o, st);
}
