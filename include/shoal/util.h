/*
 * shoal/util.h - the little that shoal's programs share: a monotonic clock
 * and one log-line format.
 */
#ifndef SHOAL_UTIL_H
#define SHOAL_UTIL_H

#include <stdint.h>

/* CLOCK_MONOTONIC in nanoseconds. */
int64_t shoal_now_ns(void);

/* Writes "YYYY-mm-dd HH:MM:SS [who] message\n" to stderr, as one write, so
 * that lines of several processes sharing a log do not interleave. */
void shoal_log(const char *who, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#endif /* SHOAL_UTIL_H */
