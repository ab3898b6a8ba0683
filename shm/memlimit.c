/*
 * shm/memlimit.c - how much memory this process may use: the host's RAM, or
 * less where its memory cgroup has a lower limit (a container, a systemd
 * slice, a batch job). The arena's default size is half of it
 * (shoal_arena_default_heap_size): sized from the host's RAM alone, an
 * arena in a container with a lower limit promised memory that the cgroup's
 * OOM killer would take back.
 *
 * Both cgroup versions are read: v2's memory.max and v1's
 * memory.limit_in_bytes, in the process's own cgroup and each ancestor up
 * to the hierarchy's mount point (an ancestor's limit binds its
 * descendants), the lowest winning. The mount points come from
 * /proc/self/mountinfo, the process's cgroups from /proc/self/cgroup.
 */
#define _GNU_SOURCE
#include "memlimit.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* v1 reports "no limit" as a huge number (LONG_MAX rounded to pages). */
#define NO_LIMIT_ABOVE (1ull << 62)

/* Reads a limit file: a number of bytes, or "max" (v2's "none"). Returns the
 * limit, or UINT64_MAX for none or an unreadable file. */
static uint64_t read_limit(const char *path)
{
    FILE *f = fopen(path, "re");
    if (!f)
        return UINT64_MAX;
    char buf[64] = "";
    char *ok = fgets(buf, sizeof buf, f);
    fclose(f);
    char *end;
    errno = 0;
    unsigned long long v = ok ? strtoull(buf, &end, 10) : 0;
    if (!ok || errno || end == buf || v >= NO_LIMIT_ABOVE)
        return UINT64_MAX;
    return v;
}

/* Undoes mountinfo's octal escapes (\040 for a space) in place. */
static void unescape(char *s)
{
    char *w = s;
    for (char *r = s; *r;) {
        if (r[0] == '\\' && r[1] >= '0' && r[1] <= '3' && r[2] >= '0' && r[2] <= '7' && r[3] >= '0' &&
            r[3] <= '7') {
            *w++ = (char)((r[1] - '0') * 64 + (r[2] - '0') * 8 + (r[3] - '0'));
            r += 4;
        } else {
            *w++ = *r++;
        }
    }
    *w = '\0';
}

/* Whether the comma-separated list has the word. */
static int has_word(const char *list, const char *word)
{
    size_t n = strlen(word);
    for (const char *p = list; p && *p; p = strchr(p, ',') ? strchr(p, ',') + 1 : NULL)
        if (!strncmp(p, word, n) && (p[n] == ',' || p[n] == '\0'))
            return 1;
    return 0;
}

/*
 * Finds the mount of a hierarchy in mountinfo: cgroup2 (v1 = 0), or the v1
 * hierarchy with the memory controller (v1 = 1). Fills its mount point and
 * its root (the cgroup it shows, "/" unless it is a bind mount of a
 * subtree). Returns 0 or -ENOENT.
 */
static int find_mount(const char *mountinfo, int v1, char *point, size_t plen, char *root, size_t rlen)
{
    FILE *f = fopen(mountinfo, "re");
    if (!f)
        return -ENOENT;
    char line[4096];
    int rc = -ENOENT;
    while (rc < 0 && fgets(line, sizeof line, f)) {
        /* id parent major:minor root point options [optional...] - fstype source superoptions */
        char *sep = strstr(line, " - ");
        if (!sep)
            continue;
        *sep = '\0';
        char *save = NULL, *fields[5];
        int n = 0;
        for (char *t = strtok_r(line, " ", &save); t && n < 5; t = strtok_r(NULL, " ", &save))
            fields[n++] = t;
        char *save2 = NULL;
        char *fstype = strtok_r(sep + 3, " ", &save2);
        (void)strtok_r(NULL, " ", &save2); /* source */
        char *super = strtok_r(NULL, " \n", &save2);
        if (n < 5 || !fstype)
            continue;
        if (v1 ? strcmp(fstype, "cgroup") || !super || !has_word(super, "memory") : strcmp(fstype, "cgroup2"))
            continue;
        unescape(fields[3]);
        unescape(fields[4]);
        if (strlen(fields[4]) < plen && strlen(fields[3]) < rlen) {
            strcpy(point, fields[4]);
            strcpy(root, fields[3]);
            rc = 0;
        }
    }
    fclose(f);
    return rc;
}

/*
 * The lowest limit of one hierarchy: the process's cgroup in it (from
 * /proc/self/cgroup) and its ancestors, up to the mount point.
 */
static uint64_t hierarchy_limit(const char *cgroup, const char *mountinfo, int v1)
{
    char point[PATH_MAX], root[PATH_MAX];
    if (find_mount(mountinfo, v1, point, sizeof point, root, sizeof root) < 0)
        return UINT64_MAX;
    FILE *f = fopen(cgroup, "re");
    if (!f)
        return UINT64_MAX;
    char line[4096], path[PATH_MAX] = "";
    int found = 0;
    while (!found && fgets(line, sizeof line, f)) {
        /* hierarchy-id:controllers:path; v2's is "0::path" */
        char *c1 = strchr(line, ':'), *c2 = c1 ? strchr(c1 + 1, ':') : NULL;
        if (!c2)
            continue;
        *c2 = '\0';
        if (v1 ? !has_word(c1 + 1, "memory") : (strncmp(line, "0:", 2) || c1[1] != '\0'))
            continue;
        char *p = c2 + 1;
        p[strcspn(p, "\n")] = '\0';
        /* A mount of a subtree shows paths below its root. */
        size_t rl = strlen(root);
        if (strcmp(root, "/") && !strncmp(p, root, rl) && (p[rl] == '/' || p[rl] == '\0'))
            p += rl;
        const char *rest = strcmp(p, "/") ? p : "";
        size_t pl = strlen(point), tl = strlen(rest);
        if (pl + tl < sizeof path) {
            memcpy(path, point, pl);
            memcpy(path + pl, rest, tl + 1);
            found = 1;
        }
    }
    fclose(f);
    if (!found)
        return UINT64_MAX;
    uint64_t lowest = UINT64_MAX;
    size_t top = strlen(point);
    for (;;) {
        char file[PATH_MAX + 32];
        snprintf(file, sizeof file, "%s/%s", path, v1 ? "memory.limit_in_bytes" : "memory.max");
        uint64_t v = read_limit(file);
        if (v < lowest)
            lowest = v;
        char *slash = strrchr(path, '/');
        if (strlen(path) <= top || !slash || (size_t)(slash - path) < top)
            break;
        *slash = '\0';
    }
    return lowest;
}

uint64_t shoal__cgroup_memory_limit(const char *cgroup, const char *mountinfo)
{
    uint64_t v2 = hierarchy_limit(cgroup, mountinfo, 0);
    uint64_t v1 = hierarchy_limit(cgroup, mountinfo, 1);
    return v2 < v1 ? v2 : v1;
}

uint64_t shoal__usable_memory(void)
{
    long pages = sysconf(_SC_PHYS_PAGES), psz = sysconf(_SC_PAGESIZE);
    uint64_t ram = (pages > 0 && psz > 0) ? (uint64_t)pages * (uint64_t)psz : (1ull << 32);
    uint64_t limit = shoal__cgroup_memory_limit("/proc/self/cgroup", "/proc/self/mountinfo");
    return limit < ram ? limit : ram;
}
