/* shm/memlimit.h - the memory this process may use (memlimit.c). Private to shoal. */
#ifndef SHOAL_SHM_MEMLIMIT_H
#define SHOAL_SHM_MEMLIMIT_H

#include <stdint.h>

/*
 * The lowest memory limit of this process's cgroups, read from the files
 * named like /proc/self/cgroup and /proc/self/mountinfo (parameters, so
 * that a test can give its own): cgroup v2 memory.max and v1
 * memory.limit_in_bytes, of its cgroup and each ancestor up to the mount
 * point. UINT64_MAX when there is none. Thread-safe.
 */
uint64_t shoal__cgroup_memory_limit(const char *cgroup, const char *mountinfo);

/* The lower of the host's RAM and the cgroup limit above, for this process. */
uint64_t shoal__usable_memory(void);

#endif
