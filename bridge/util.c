/* bridge/util.c - the clock and the log line that shoal's programs share. */
#include <shoal/util.h>

#include <errno.h>
#include <stdarg.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

int shoal_root_dir(char *out, size_t len)
{
    const char *root = getenv("SHOAL_DIR"), *home = getenv("HOME");
    int n = root && *root ? snprintf(out, len, "%s", root)
                          : snprintf(out, len, "%s/.shoal", home && *home ? home : ".");
    return n < 0 || (size_t)n >= len ? -ENAMETOOLONG : 0;
}

int shoal_profile_dir(const char *profile, char *out, size_t len)
{
    int rc = shoal_root_dir(out, len);
    if (rc < 0)
        return rc;
    size_t used = strlen(out);
    int n = snprintf(out + used, len - used, "/profile_%s", profile);
    return n < 0 || (size_t)n >= len - used ? -ENAMETOOLONG : 0;
}

int shoal_parse_u64(const char *s, uint64_t max, uint64_t *out)
{
    /* strtoull alone takes "abc" for 0, "-1" for 2^64-1 and "12x" for 12. */
    if (!s || *s < '0' || *s > '9')
        return -EINVAL;
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (*end)
        return -EINVAL;
    if (errno == ERANGE || v > max)
        return -ERANGE;
    *out = v;
    return 0;
}

int64_t shoal_now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

void shoal_log(const char *who, const char *fmt, ...)
{
    char line[1024];
    time_t t = time(NULL);
    struct tm tm;
    size_t n = strftime(line, sizeof line, "%Y-%m-%d %H:%M:%S", localtime_r(&t, &tm));
    int k = snprintf(line + n, sizeof line - n, " [%s] ", who);
    if (k > 0 && (size_t)k < sizeof line - n)
        n += (size_t)k;
    va_list ap;
    va_start(ap, fmt);
    k = vsnprintf(line + n, sizeof line - n - 1, fmt, ap);
    va_end(ap);
    n = k < 0 ? n : (n + (size_t)k < sizeof line - 1 ? n + (size_t)k : sizeof line - 2);
    line[n++] = '\n';
    (void)write(STDERR_FILENO, line, n);
}
