/*
 * tests/shm/test_memlimit.c - reading the memory cgroup's limit (the
 * arena's default size is half of what a process may use), from fake
 * /proc/self/cgroup and /proc/self/mountinfo files over a fake cgroup tree
 * in a temporary directory named with the pid.
 */
#define _GNU_SOURCE
#include <criterion/criterion.h>

#include <shoal/arena.h>

#include "../../shm/memlimit.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static char root[PATH_MAX];

static void put(const char *rel, const char *text)
{
    char path[PATH_MAX + 64];
    snprintf(path, sizeof path, "%s/%s", root, rel);
    for (char *s = strchr(path + strlen(root) + 1, '/'); s; s = strchr(s + 1, '/')) {
        *s = '\0';
        mkdir(path, 0700);
        *s = '/';
    }
    FILE *f = fopen(path, "w");
    cr_assert_not_null(f, "%s", path);
    fputs(text, f);
    fclose(f);
}

static void setup(void)
{
    snprintf(root, sizeof root, "/tmp/shoal-test-memlimit-%d", (int)getpid());
    mkdir(root, 0700);
}

static void teardown(void)
{
    char cmd[PATH_MAX + 16];
    snprintf(cmd, sizeof cmd, "rm -rf %s", root);
    cr_assert_eq(system(cmd), 0);
}

static uint64_t limit(void)
{
    char cg[PATH_MAX + 16], mi[PATH_MAX + 16];
    snprintf(cg, sizeof cg, "%s/cgroup", root);
    snprintf(mi, sizeof mi, "%s/mountinfo", root);
    return shoal__cgroup_memory_limit(cg, mi);
}

static void mountinfo(const char *fstype, const char *mroot, const char *point, const char *super)
{
    char text[PATH_MAX * 2 + 256];
    snprintf(text, sizeof text,
             "22 1 0:20 / /proc rw,nosuid - proc proc rw\n"
             "30 22 0:26 %s %s/%s rw,nosuid shared:9 - %s cgroup %s\n", mroot, root, point, fstype, super);
    put("mountinfo", text);
}

TestSuite(memlimit, .init = setup, .fini = teardown);

Test(memlimit, v2_takes_the_lowest_limit_on_the_way_to_the_root)
{
    mountinfo("cgroup2", "/", "cg", "rw,nsdelegate");
    put("cgroup", "0::/a/b\n");
    put("cg/a/memory.max", "1073741824\n");
    put("cg/a/b/memory.max", "max\n");
    cr_assert_eq(limit(), 1ull << 30, "the parent's limit binds the child");
    put("cg/a/b/memory.max", "536870912\n");
    cr_assert_eq(limit(), 512ull << 20);
}

Test(memlimit, v1_reads_the_memory_hierarchy_below_a_mounted_subtree)
{
    mountinfo("cgroup", "/docker/abc", "memory", "rw,memory");
    put("cgroup", "5:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc/job\n0::/\n");
    put("memory/memory.limit_in_bytes", "9223372036854771712\n"); /* v1's "none" */
    put("memory/job/memory.limit_in_bytes", "268435456\n");
    cr_assert_eq(limit(), 256ull << 20);
}

Test(memlimit, no_cgroup_limit_is_none)
{
    mountinfo("cgroup2", "/", "cg", "rw");
    put("cgroup", "0::/\n");
    cr_assert_eq(limit(), UINT64_MAX, "the root has no memory.max");
    mountinfo("cgroup", "/", "cpu", "rw,cpu");
    put("cgroup", "3:cpu:/x\n");
    cr_assert_eq(limit(), UINT64_MAX, "no memory hierarchy mounted");
}

Test(memlimit, the_default_heap_is_half_of_the_usable_memory)
{
    uint64_t heap = shoal_arena_default_heap_size();
    cr_assert_eq(heap % (2 << 20), 0);
    cr_assert_leq(heap, shoal__usable_memory() / 2);
    cr_assert_geq(heap + (2 << 20), shoal__usable_memory() / 2);
}
