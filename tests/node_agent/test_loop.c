/*
 * tests/node_agent/test_loop.c - the agent's event loop, every test on both
 * backends: io_uring (skipped, with the reason, where the kernel or a
 * seccomp profile refuses it) and epoll (forced with SHOAL_NO_URING=1).
 */
#define _GNU_SOURCE
#include <criterion/criterion.h>

#include "loop.h"

#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static shoal_loop *make(int uring)
{
    if (uring) {
        unsetenv("SHOAL_NO_URING");
        struct io_uring probe;
        int rc = io_uring_queue_init(4, &probe, 0);
        if (rc < 0)
            cr_skip_test("io_uring is unavailable here (%s)", strerror(-rc));
        io_uring_queue_exit(&probe);
    } else {
        setenv("SHOAL_NO_URING", "1", 1);
    }
    shoal_loop *l = NULL;
    cr_assert_eq(shoal_loop_create(&l), 0);
    cr_assert_str_eq(shoal_loop_backend(l), uring ? "io_uring" : "epoll");
    return l;
}

/* Runs the loop until cond holds, for at most a few seconds. */
#define RUN_UNTIL(l, cond)                                                                       \
    do {                                                                                         \
        for (int i_ = 0; i_ < 500 && !(cond); i_++)                                              \
            cr_assert_geq(shoal_loop_run_once((l), 10), 0);                                      \
        cr_assert(cond, "never happened: " #cond);                                               \
    } while (0)

#define BOTH(name)                                                                               \
    static void name(int uring);                                                                 \
    Test(loop, name##_io_uring) { name(1); }                                                     \
    Test(loop, name##_epoll) { name(0); }                                                        \
    static void name(int uring)

struct hits {
    int n;
    uint32_t events;
    int drain; /* read the fd dry in the callback */
    int unwatch_fd; /* unwatch this other fd from the callback, if >= 0 */
};

static void on_fd(shoal_loop *l, int fd, uint32_t events, void *arg)
{
    struct hits *h = arg;
    h->n++;
    h->events |= events;
    if (h->drain) {
        char buf[256];
        while (read(fd, buf, sizeof buf) > 0)
            ;
    }
    if (h->unwatch_fd >= 0)
        shoal_loop_unwatch(l, h->unwatch_fd);
}

BOTH(pipe_readiness_is_reported_edge_by_edge)
{
    shoal_loop *l = make(uring);
    int p[2];
    cr_assert_eq(pipe2(p, O_NONBLOCK | O_CLOEXEC), 0);
    struct hits h = {.drain = 1, .unwatch_fd = -1};
    cr_assert_eq(shoal_loop_watch(l, p[0], POLLIN, on_fd, &h), 0);
    cr_assert_eq(shoal_loop_run_once(l, 0), 0, "nothing to read yet");
    cr_assert_eq(write(p[1], "a", 1), 1);
    RUN_UNTIL(l, h.n == 1);
    cr_assert(h.events & POLLIN);
    cr_assert_eq(shoal_loop_run_once(l, 20), 0, "drained: no new edge");
    cr_assert_eq(write(p[1], "b", 1), 1);
    RUN_UNTIL(l, h.n == 2);
    cr_assert_eq(shoal_loop_unwatch(l, p[0]), 0);
    cr_assert_eq(write(p[1], "c", 1), 1);
    cr_assert_eq(shoal_loop_run_once(l, 20), 0, "unwatched");
    close(p[0]);
    close(p[1]);
    shoal_loop_destroy(l);
}

BOTH(an_fd_ready_before_it_is_watched_reports_at_once)
{
    shoal_loop *l = make(uring);
    int efd = eventfd(3, EFD_NONBLOCK | EFD_CLOEXEC);
    struct hits h = {.drain = 1, .unwatch_fd = -1};
    cr_assert_eq(shoal_loop_watch(l, efd, POLLIN, on_fd, &h), 0);
    RUN_UNTIL(l, h.n == 1);
    close(efd);
    shoal_loop_destroy(l);
}

BOTH(unwatching_drops_events_already_pending)
{
    shoal_loop *l = make(uring);
    int a[2], b[2];
    cr_assert_eq(pipe2(a, O_NONBLOCK), 0);
    cr_assert_eq(pipe2(b, O_NONBLOCK), 0);
    /* Whichever callback runs first unwatches the other pipe, whose event
     * is already pending: it must not run. */
    struct hits ha = {.drain = 1, .unwatch_fd = b[0]}, hb = {.drain = 1, .unwatch_fd = a[0]};
    cr_assert_eq(shoal_loop_watch(l, a[0], POLLIN, on_fd, &ha), 0);
    cr_assert_eq(shoal_loop_watch(l, b[0], POLLIN, on_fd, &hb), 0);
    cr_assert_eq(shoal_loop_run_once(l, 0), 0);
    cr_assert_eq(write(a[1], "x", 1), 1);
    cr_assert_eq(write(b[1], "x", 1), 1);
    RUN_UNTIL(l, ha.n + hb.n >= 1);
    for (int i = 0; i < 5; i++)
        shoal_loop_run_once(l, 10);
    cr_assert_eq(ha.n + hb.n, 1, "a: %d, b: %d", ha.n, hb.n);
    shoal_loop_destroy(l);
}

BOTH(a_pidfd_reports_the_death_of_a_child)
{
    shoal_loop *l = make(uring);
    pid_t pid = fork();
    if (pid == 0) {
        usleep(50 * 1000);
        _exit(7);
    }
    int pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
    cr_assert_geq(pidfd, 0, "pidfd_open: %s", strerror(errno));
    struct hits h = {.unwatch_fd = -1};
    cr_assert_eq(shoal_loop_watch(l, pidfd, POLLIN, on_fd, &h), 0);
    RUN_UNTIL(l, h.n == 1);
    int st;
    cr_assert_eq(waitpid(pid, &st, WNOHANG), pid, "the child had exited when the pidfd fired");
    cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 7);
    shoal_loop_unwatch(l, pidfd);
    close(pidfd);
    shoal_loop_destroy(l);
}

struct tick {
    int order[16];
    int n;
    uint64_t cancel;
};

static void on_timer(shoal_loop *l, uint64_t id, void *arg)
{
    struct tick *t = arg;
    if (t->n < 16)
        t->order[t->n++] = (int)id;
    if (t->cancel && t->n >= 3) {
        shoal_loop_cancel(l, t->cancel);
        t->cancel = 0;
    }
}

BOTH(timers_fire_in_order_and_periodic_ones_repeat)
{
    shoal_loop *l = make(uring);
    struct tick t = {0};
    uint64_t late, early, every;
    cr_assert_eq(shoal_loop_timer(l, 60, 0, on_timer, &t, &late), 0);
    cr_assert_eq(shoal_loop_timer(l, 20, 0, on_timer, &t, &early), 0);
    cr_assert_eq(shoal_loop_timer(l, 5, 15, on_timer, &t, &every), 0);
    t.cancel = every;
    RUN_UNTIL(l, t.n >= 4);
    for (int i = 0; i < 6; i++)
        shoal_loop_run_once(l, 20);
    /* every (5 ms), every (20), early (20), then every is cancelled; late (60). */
    int early_at = -1, late_at = -1, everys = 0;
    for (int i = 0; i < t.n; i++) {
        if (t.order[i] == (int)early)
            early_at = i;
        else if (t.order[i] == (int)late)
            late_at = i;
        else
            everys++;
    }
    cr_assert(early_at >= 0 && late_at > early_at, "early at %d, late at %d", early_at, late_at);
    cr_assert_geq(everys, 2, "the periodic timer repeated");
    cr_assert_leq(everys, 3, "and stopped when cancelled");
    cr_assert_eq(shoal_loop_cancel(l, every), -ENOENT);
    shoal_loop_destroy(l);
}

static void stop_on_read(shoal_loop *l, int fd, uint32_t events, void *arg)
{
    (void)events;
    (void)arg;
    uint64_t v;
    (void)read(fd, &v, sizeof v);
    shoal_loop_stop(l);
}

BOTH(run_returns_when_a_callback_stops_it)
{
    shoal_loop *l = make(uring);
    int efd = eventfd(0, EFD_NONBLOCK);
    cr_assert_eq(shoal_loop_watch(l, efd, POLLIN, stop_on_read, NULL), 0);
    uint64_t one = 1;
    cr_assert_eq(write(efd, &one, sizeof one), (ssize_t)sizeof one);
    cr_assert_eq(shoal_loop_run(l), 0);
    close(efd);
    shoal_loop_destroy(l);
}

BOTH(usage_errors)
{
    shoal_loop *l = make(uring);
    int efd = eventfd(0, EFD_NONBLOCK);
    struct hits h = {.unwatch_fd = -1};
    cr_assert_eq(shoal_loop_watch(l, -1, POLLIN, on_fd, &h), -EINVAL);
    cr_assert_eq(shoal_loop_watch(l, efd, 0, on_fd, &h), -EINVAL);
    cr_assert_eq(shoal_loop_watch(l, efd, POLLIN, NULL, &h), -EINVAL);
    cr_assert_eq(shoal_loop_watch(l, efd, POLLIN, on_fd, &h), 0);
    cr_assert_eq(shoal_loop_watch(l, efd, POLLIN, on_fd, &h), -EEXIST);
    cr_assert_eq(shoal_loop_unwatch(l, efd), 0);
    cr_assert_eq(shoal_loop_unwatch(l, efd), -ENOENT);
    cr_assert_eq(shoal_loop_unwatch(l, 100000), -ENOENT);
    cr_assert_eq(shoal_loop_timer(l, 1, 0, NULL, NULL, NULL), -EINVAL);
    close(efd);
    shoal_loop_destroy(l);
    shoal_loop_destroy(NULL);
}
