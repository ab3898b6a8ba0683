/* bridge/util.c - the clock and the log line that shoal's programs share. */
#include <shoal/util.h>

#include <stdarg.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>

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
