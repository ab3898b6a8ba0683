/*
 * node_agent/loop.c - the agent's event loop on io_uring, or on epoll.
 *
 * Both backends report readiness edge-triggered: a callback runs when its fd
 * becomes ready, and must drain the fd (read until EAGAIN, accept until
 * EAGAIN, check ZMQ_EVENTS until no POLLIN) to hear from it again. That is
 * what a ZeroMQ fd requires anyway, and it lets io_uring use one multishot
 * poll per fd instead of re-arming after every event.
 *
 * io_uring: each watch is a multishot IORING_OP_POLL_ADD whose user_data
 * packs the fd and a generation; a completion whose generation is not the
 * watch's current one belongs to an old watch and is dropped, so unwatching
 * never races with a completion already in the queue. epoll: EPOLLET with
 * the fd in the event data, and the same generation check after a callback
 * that may have unwatched another fd.
 */
#define _GNU_SOURCE
#include "loop.h"

#include <errno.h>
#include <liburing.h>
#include <poll.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <time.h>
#include <unistd.h>

struct watch {
    shoal_loop_fd_cb cb;
    void *arg;
    uint32_t events;
    uint32_t gen; /* bumped by every watch and unwatch of this fd */
    bool active;
};

struct timer {
    uint64_t id;
    int64_t due_ns;
    int64_t period_ns;
    shoal_loop_timer_cb cb;
    void *arg;
};

struct shoal_loop {
    bool uring;
    struct io_uring ring;
    int epfd;
    struct watch *watches; /* indexed by fd */
    int nwatches;
    struct timer *timers;
    size_t ntimers, captimers;
    uint64_t next_timer_id;
    bool stop;
};

static int64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static uint64_t pack(int fd, uint32_t gen)
{
    return ((uint64_t)(uint32_t)fd << 32) | gen;
}

static bool uring_wanted(void)
{
    const char *v = getenv("SHOAL_NO_URING");
    return !(v && strcmp(v, "1") == 0);
}

int shoal_loop_create(shoal_loop **out)
{
    shoal_loop *l = calloc(1, sizeof *l);
    if (!l)
        return -ENOMEM;
    l->epfd = -1;
    if (uring_wanted() && io_uring_queue_init(256, &l->ring, 0) == 0) {
        l->uring = true;
    } else {
        /* io_uring is off, or unavailable here (ENOSYS on old kernels, EPERM
         * under a seccomp profile that blocks it): epoll does the same job. */
        l->epfd = epoll_create1(EPOLL_CLOEXEC);
        if (l->epfd < 0) {
            int e = -errno;
            free(l);
            return e;
        }
    }
    *out = l;
    return 0;
}

void shoal_loop_destroy(shoal_loop *l)
{
    if (!l)
        return;
    if (l->uring)
        io_uring_queue_exit(&l->ring);
    if (l->epfd >= 0)
        close(l->epfd);
    free(l->watches);
    free(l->timers);
    free(l);
}

const char *shoal_loop_backend(const shoal_loop *l)
{
    return l->uring ? "io_uring" : "epoll";
}

static struct io_uring_sqe *get_sqe(shoal_loop *l)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(&l->ring);
    if (!sqe) {
        /* The submission queue is full: hand it to the kernel and retry. */
        io_uring_submit(&l->ring);
        sqe = io_uring_get_sqe(&l->ring);
    }
    return sqe;
}

int shoal_loop_watch(shoal_loop *l, int fd, uint32_t events, shoal_loop_fd_cb cb, void *arg)
{
    if (fd < 0 || !cb || !(events & (POLLIN | POLLOUT)))
        return -EINVAL;
    if (fd >= l->nwatches) {
        int n = l->nwatches ? l->nwatches : 64;
        while (n <= fd)
            n *= 2;
        struct watch *w = realloc(l->watches, (size_t)n * sizeof *w);
        if (!w)
            return -ENOMEM;
        memset(w + l->nwatches, 0, (size_t)(n - l->nwatches) * sizeof *w);
        l->watches = w;
        l->nwatches = n;
    }
    struct watch *w = &l->watches[fd];
    if (w->active)
        return -EEXIST;
    uint32_t gen = w->gen + 1;
    if (l->uring) {
        struct io_uring_sqe *sqe = get_sqe(l);
        if (!sqe)
            return -EBUSY;
        io_uring_prep_poll_multishot(sqe, fd, events);
        io_uring_sqe_set_data64(sqe, pack(fd, gen));
    } else {
        struct epoll_event ev = {.events = EPOLLET, .data.u64 = pack(fd, gen)};
        if (events & POLLIN)
            ev.events |= EPOLLIN;
        if (events & POLLOUT)
            ev.events |= EPOLLOUT;
        if (epoll_ctl(l->epfd, EPOLL_CTL_ADD, fd, &ev) < 0)
            return -errno;
    }
    *w = (struct watch){.cb = cb, .arg = arg, .events = events, .gen = gen, .active = true};
    return 0;
}

int shoal_loop_unwatch(shoal_loop *l, int fd)
{
    if (fd < 0 || fd >= l->nwatches || !l->watches[fd].active)
        return -ENOENT;
    struct watch *w = &l->watches[fd];
    if (l->uring) {
        struct io_uring_sqe *sqe = get_sqe(l);
        if (sqe) {
            io_uring_prep_poll_remove(sqe, pack(fd, w->gen));
            io_uring_sqe_set_data64(sqe, 0); /* its own completion is ignored */
            /* Submit now: the fd may be closed right after we return. */
            io_uring_submit(&l->ring);
        }
    } else {
        epoll_ctl(l->epfd, EPOLL_CTL_DEL, fd, NULL);
    }
    w->active = false;
    w->gen++;
    return 0;
}

int shoal_loop_timer(shoal_loop *l, int64_t delay_ms, int64_t period_ms, shoal_loop_timer_cb cb, void *arg,
                     uint64_t *id)
{
    if (!cb)
        return -EINVAL;
    if (l->ntimers == l->captimers) {
        size_t n = l->captimers ? 2 * l->captimers : 8;
        struct timer *t = realloc(l->timers, n * sizeof *t);
        if (!t)
            return -ENOMEM;
        l->timers = t;
        l->captimers = n;
    }
    uint64_t tid = ++l->next_timer_id;
    l->timers[l->ntimers++] = (struct timer){tid, now_ns() + delay_ms * 1000000, period_ms * 1000000, cb, arg};
    if (id)
        *id = tid;
    return 0;
}

int shoal_loop_cancel(shoal_loop *l, uint64_t id)
{
    for (size_t i = 0; i < l->ntimers; i++) {
        if (l->timers[i].id == id) {
            l->timers[i] = l->timers[--l->ntimers];
            return 0;
        }
    }
    return -ENOENT;
}

/* Milliseconds until the next timer, capped by timeout_ms (-1: no cap). */
static int64_t wait_ms(const shoal_loop *l, int64_t timeout_ms)
{
    int64_t best = timeout_ms, now = now_ns();
    for (size_t i = 0; i < l->ntimers; i++) {
        int64_t ms = (l->timers[i].due_ns - now + 999999) / 1000000;
        if (ms < 0)
            ms = 0;
        if (best < 0 || ms < best)
            best = ms;
    }
    return best;
}

static int run_timers(shoal_loop *l)
{
    int ran = 0;
    int64_t now = now_ns();
    /* A callback may add or cancel timers: look the due one up afresh each
     * time rather than walking an array that changes under us. */
    for (;;) {
        size_t due = l->ntimers;
        for (size_t i = 0; i < l->ntimers; i++)
            if (l->timers[i].due_ns <= now && (due == l->ntimers || l->timers[i].due_ns < l->timers[due].due_ns))
                due = i;
        if (due == l->ntimers)
            return ran;
        struct timer t = l->timers[due];
        if (t.period_ns > 0)
            l->timers[due].due_ns = (t.due_ns + t.period_ns > now) ? t.due_ns + t.period_ns : now + t.period_ns;
        else
            l->timers[due] = l->timers[--l->ntimers];
        t.cb(l, t.id, t.arg);
        ran++;
    }
}

/* Runs fd's callback if the completion or event still belongs to its
 * current watch. */
static int dispatch(shoal_loop *l, uint64_t data, uint32_t events)
{
    int fd = (int)(data >> 32);
    uint32_t gen = (uint32_t)data;
    if (fd < 0 || fd >= l->nwatches)
        return 0;
    struct watch *w = &l->watches[fd];
    if (!w->active || w->gen != gen)
        return 0;
    w->cb(l, fd, events, w->arg);
    return 1;
}

static int run_uring(shoal_loop *l, int64_t ms)
{
    struct io_uring_cqe *cqe;
    struct __kernel_timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000};
    int rc = io_uring_submit_and_wait_timeout(&l->ring, &cqe, 1, ms < 0 ? NULL : &ts, NULL);
    if (rc < 0 && rc != -ETIME && rc != -EINTR)
        return rc;
    /* Copy the completions out before running callbacks, which submit. */
    struct {
        uint64_t data;
        int32_t res;
        uint32_t flags;
    } done[256];
    unsigned n = 0, head;
    io_uring_for_each_cqe(&l->ring, head, cqe)
    {
        if (n == 256)
            break;
        done[n].data = io_uring_cqe_get_data64(cqe);
        done[n].res = cqe->res;
        done[n].flags = cqe->flags;
        n++;
    }
    io_uring_cq_advance(&l->ring, n);
    int ran = 0;
    for (unsigned i = 0; i < n; i++) {
        if (!done[i].data)
            continue; /* a poll_remove's own completion */
        int fd = (int)(done[i].data >> 32);
        uint32_t gen = (uint32_t)done[i].data;
        bool current = fd < l->nwatches && l->watches[fd].active && l->watches[fd].gen == gen;
        if (current && !(done[i].flags & IORING_CQE_F_MORE)) {
            /* The kernel ended this multishot poll (an error, or overflow):
             * arm it again so that the watch goes on. */
            struct io_uring_sqe *sqe = get_sqe(l);
            if (sqe) {
                io_uring_prep_poll_multishot(sqe, fd, l->watches[fd].events);
                io_uring_sqe_set_data64(sqe, done[i].data);
            }
        }
        if (done[i].res < 0) {
            if (current && done[i].res != -ECANCELED)
                ran += dispatch(l, done[i].data, POLLERR);
            continue;
        }
        ran += dispatch(l, done[i].data, (uint32_t)done[i].res);
    }
    return ran;
}

static int run_epoll(shoal_loop *l, int64_t ms)
{
    struct epoll_event ev[64];
    int n = epoll_wait(l->epfd, ev, 64, ms < 0 ? -1 : (int)(ms > 1000000 ? 1000000 : ms));
    if (n < 0)
        return errno == EINTR ? 0 : -errno;
    int ran = 0;
    for (int i = 0; i < n; i++) {
        uint32_t e = 0;
        if (ev[i].events & EPOLLIN)
            e |= POLLIN;
        if (ev[i].events & EPOLLOUT)
            e |= POLLOUT;
        if (ev[i].events & EPOLLERR)
            e |= POLLERR;
        if (ev[i].events & EPOLLHUP)
            e |= POLLHUP;
        ran += dispatch(l, ev[i].data.u64, e);
    }
    return ran;
}

int shoal_loop_run_once(shoal_loop *l, int64_t timeout_ms)
{
    int64_t ms = wait_ms(l, timeout_ms);
    int ran = l->uring ? run_uring(l, ms) : run_epoll(l, ms);
    if (ran < 0)
        return ran;
    return ran + run_timers(l);
}

int shoal_loop_run(shoal_loop *l)
{
    l->stop = false;
    while (!l->stop) {
        int rc = shoal_loop_run_once(l, -1);
        if (rc < 0)
            return rc;
    }
    return 0;
}

void shoal_loop_stop(shoal_loop *l)
{
    l->stop = true;
}
