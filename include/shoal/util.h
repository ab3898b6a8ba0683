/*
 * shoal/util.h - the little that shoal's programs share: a monotonic clock,
 * where profiles live, command-line numbers and one log-line format.
 */
#ifndef SHOAL_UTIL_H
#define SHOAL_UTIL_H

#include <stddef.h>
#include <stdint.h>

/* CLOCK_MONOTONIC in nanoseconds. */
int64_t shoal_now_ns(void);

/* Where profiles live: $SHOAL_DIR, else ~/.shoal. Writes it into out (len
 * bytes). Returns 0 or -ENAMETOOLONG. */
int shoal_root_dir(char *out, size_t len);

/* The directory of profile NAME: <root>/profile_NAME. Returns 0 or
 * -ENAMETOOLONG. */
int shoal_profile_dir(const char *profile, char *out, size_t len);

/* A command-line number: decimal digits only, at most max. Returns 0 with
 * *out set, -EINVAL (empty, a sign, anything but digits) or -ERANGE. */
int shoal_parse_u64(const char *s, uint64_t max, uint64_t *out);

/* Writes "YYYY-mm-dd HH:MM:SS [who] message\n" to stderr, as one write, so
 * that lines of several processes sharing a log do not interleave. */
void shoal_log(const char *who, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#endif /* SHOAL_UTIL_H */
