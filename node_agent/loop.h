/*
 * node_agent/loop.h - the node agent's event loop: fds and timers, on
 * io_uring or on epoll.
 *
 * One loop waits on everything the agent cares about: the bridge's ZeroMQ
 * fd, the engines' doorbell eventfds, pidfds, its Unix socket. Watches are
 * edge-triggered: a callback runs when its fd becomes ready, and must drain
 * it (read or accept until EAGAIN; for a ZeroMQ fd, until ZMQ_EVENTS has no
 * POLLIN) to hear from it again. An fd that is ready when it is watched
 * reports at once. Timers are kept in the loop's own memory and bound the
 * wait.
 *
 * The backend is io_uring (multishot poll) unless the environment variable
 * SHOAL_NO_URING is set to 1, or io_uring cannot be set up (old kernels;
 * containers whose seccomp profile blocks it): then epoll, by itself.
 *
 * A loop belongs to the thread that runs it; callbacks run on that thread,
 * and may watch, unwatch, add and cancel timers, and stop the loop.
 */
#ifndef SHOAL_LOOP_H
#define SHOAL_LOOP_H

#include <stdint.h>

typedef struct shoal_loop shoal_loop;

/* Called with the poll(2) events that are ready (POLLIN, POLLOUT, POLLERR,
 * POLLHUP). */
typedef void (*shoal_loop_fd_cb)(shoal_loop *l, int fd, uint32_t events, void *arg);
/* Called once when the timer is due (again every period, if periodic). */
typedef void (*shoal_loop_timer_cb)(shoal_loop *l, uint64_t id, void *arg);

/* Creates a loop. Returns 0 and *out, or -ENOMEM, or the errno of epoll. */
int shoal_loop_create(shoal_loop **out);

/* Destroys a loop: drops every watch and timer. Accepts NULL. */
void shoal_loop_destroy(shoal_loop *l);

/* "io_uring" or "epoll". */
const char *shoal_loop_backend(const shoal_loop *l);

/*
 * Watches fd for events (POLLIN and/or POLLOUT) until unwatched; one watch
 * per fd. Returns 0, -EEXIST (fd is watched already), -EINVAL, -ENOMEM, or
 * the backend's errno.
 */
int shoal_loop_watch(shoal_loop *l, int fd, uint32_t events, shoal_loop_fd_cb cb, void *arg);

/* Stops watching fd; its callback will not run again, even for events that
 * are already pending. Returns 0 or -ENOENT. Call it before closing fd. */
int shoal_loop_unwatch(shoal_loop *l, int fd);

/*
 * Calls cb after delay_ms, and then every period_ms if period_ms > 0.
 * Returns a timer id (> 0) through *id. Returns 0 or -ENOMEM.
 */
int shoal_loop_timer(shoal_loop *l, int64_t delay_ms, int64_t period_ms, shoal_loop_timer_cb cb, void *arg,
                     uint64_t *id);

/* Cancels a timer. Returns 0 or -ENOENT. */
int shoal_loop_cancel(shoal_loop *l, uint64_t id);

/*
 * Waits up to timeout_ms (-1: until something happens; 0: not at all) and
 * runs the callbacks of what is ready and the timers that are due.
 * Returns the number of callbacks run, or a negative errno.
 */
int shoal_loop_run_once(shoal_loop *l, int64_t timeout_ms);

/* Runs until shoal_loop_stop. Returns 0 or a negative errno. */
int shoal_loop_run(shoal_loop *l);

/* Makes shoal_loop_run return after the current callbacks. */
void shoal_loop_stop(shoal_loop *l);

#endif /* SHOAL_LOOP_H */
