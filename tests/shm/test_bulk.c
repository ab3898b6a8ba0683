/*
 * tests/shm/test_bulk.c - shoal_bulk_read and shoal_bulk_write: every way
 * through (io_uring or pread/pwrite, O_DIRECT or the page cache, memory
 * registered or not), aligned and not, and the errors, on a file in a
 * temporary directory named with the pid (on the disk, where O_DIRECT works,
 * and not in /dev/shm, where it does not).
 */
#define _GNU_SOURCE
#include <criterion/criterion.h>

#include <shoal/bulk.h>

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#define SIZE ((size_t)(9u << 20) + 1234) /* chunks and a tail that is not aligned */

static char dir[PATH_MAX], file[PATH_MAX + 16];
static uint8_t *pattern;

static void setup(void)
{
    snprintf(dir, sizeof dir, "/var/tmp/shoal-test-bulk-%d", (int)getpid());
    cr_assert_eq(mkdir(dir, 0700), 0, "%s: %s", dir, strerror(errno));
    snprintf(file, sizeof file, "%s/data", dir);
    pattern = malloc(SIZE);
    for (size_t i = 0; i < SIZE; i++)
        pattern[i] = (uint8_t)(i * 2654435761u >> 13);
    FILE *f = fopen(file, "w");
    cr_assert_not_null(f);
    cr_assert_eq(fwrite(pattern, 1, SIZE, f), SIZE);
    fclose(f);
}

static void teardown(void)
{
    unlink(file);
    rmdir(dir);
    free(pattern);
}

TestSuite(bulk, .init = setup, .fini = teardown);

/* A buffer of n bytes whose first byte is skew past a 4 KiB boundary. */
static uint8_t *buffer(size_t n, size_t skew, void **base)
{
    cr_assert_eq(posix_memalign(base, SHOAL_BULK_ALIGN, n + skew + SHOAL_BULK_ALIGN), 0);
    memset(*base, 0xee, n + skew + SHOAL_BULK_ALIGN);
    return (uint8_t *)*base + skew;
}

static void read_and_check(shoal_bulk_opts o, uint64_t off, size_t skew, int want_direct, int want_uring)
{
    void *base;
    size_t n = SIZE - off;
    uint8_t *buf = buffer(n, skew, &base);
    shoal_bulk_stats st;
    cr_assert_eq(shoal_bulk_read(file, off, buf, n, &o, &st), 0);
    cr_assert(memcmp(buf, pattern + off, n) == 0, "the bytes read differ (off %llu, skew %zu)",
              (unsigned long long)off, skew);
    cr_assert_eq(buf[n], 0xee, "a byte past the buffer was written");
    cr_assert_eq(st.bytes, n);
    cr_assert_eq(st.uring, want_uring);
    if (want_direct >= 0)
        cr_assert_eq(st.direct_bytes > 0, want_direct, "direct_bytes %llu", (unsigned long long)st.direct_bytes);
    /* O_DIRECT through the ring registers the memory (fixed buffers), which
     * root may always do (CAP_IPC_LOCK passes RLIMIT_MEMLOCK). */
    if (want_direct == 1 && want_uring && !o.no_register && geteuid() == 0)
        cr_assert_eq(st.registered, 1, "the read_fixed path was not taken");
    if (o.no_register || !want_direct)
        cr_assert_eq(st.registered, 0);
    free(base);
}

/* The page cache holds the file (it was just written): reads go through it. */
Test(bulk, a_cached_file_is_read_through_the_page_cache)
{
    read_and_check((shoal_bulk_opts){0}, 0, 0, 0, 1);
    read_and_check((shoal_bulk_opts){.no_uring = 1}, 0, 0, 0, 0);
}

/* Out of the page cache (POSIX_FADV_DONTNEED after a sync), an aligned read
 * goes through O_DIRECT on a filesystem that takes it; a skewed buffer or
 * offset through the page cache, every byte right either way. */
Test(bulk, an_uncached_file_is_read_by_o_direct_when_aligned)
{
    int fd = open(file, O_RDONLY);
    cr_assert_geq(fd, 0);
    int probe = open(file, O_RDONLY | O_DIRECT);
    int direct = probe >= 0;
    if (probe >= 0)
        close(probe);
    /* A tmpfs takes O_DIRECT opens on new kernels but keeps its pages
     * cached whatever we advise: no claim about the path there. */
    struct statfs sf;
    if (statfs(dir, &sf) == 0 && sf.f_type == 0x01021994)
        direct = -1;
    const shoal_bulk_opts all[] = {{0}, {.no_register = 1}, {.depth = 1, .chunk = 4096}, {.depth = 64, .chunk = 1u << 20},
                                   {.no_uring = 1}};
    for (size_t i = 0; i < sizeof all / sizeof *all; i++) {
        for (int k = 0; k < 3; k++) {
            fdatasync(fd);
            posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
            uint64_t off = k == 1 ? 4096 * 3 : k == 2 ? 100 : 0;
            read_and_check(all[i], off, k == 0 ? 0 : 64, direct < 0 ? -1 : k == 0 && direct ? 1 : 0, !all[i].no_uring);
        }
    }
    close(fd);
}

Test(bulk, writes_round_trip_every_way)
{
    const shoal_bulk_opts all[] = {{0}, {.no_direct = 1}, {.no_uring = 1}, {.depth = 3, .chunk = 8192}};
    for (size_t i = 0; i < sizeof all / sizeof *all; i++) {
        for (int k = 0; k < 2; k++) {
            int fd = open(file, O_WRONLY | O_TRUNC);
            cr_assert_geq(fd, 0);
            close(fd);
            uint64_t off = k ? 100 : 4096;
            void *base;
            uint8_t *src = buffer(SIZE - off, k ? 8 : 0, &base);
            memcpy(src, pattern + off, SIZE - off);
            shoal_bulk_stats st;
            cr_assert_eq(shoal_bulk_write(file, off, src, SIZE - off, &all[i], &st), 0);
            cr_assert_eq(st.bytes, SIZE - off);
            free(base);
            uint8_t *back = malloc(SIZE);
            FILE *f = fopen(file, "r");
            cr_assert_eq(fread(back, 1, SIZE, f), SIZE, "the file is %zu bytes long", SIZE);
            fclose(f);
            cr_assert(memcmp(back + off, pattern + off, SIZE - off) == 0, "written bytes differ (way %zu)", i);
            free(back);
        }
    }
}

Test(bulk, errors_say_what_failed_and_write_nothing_past_the_buffer)
{
    uint8_t small[64];
    memset(small, 0xee, sizeof small);
    cr_assert_eq(shoal_bulk_read(file, SIZE - 10, small, 20, NULL, NULL), -ENODATA);
    cr_assert_eq(shoal_bulk_read(file, SIZE + 10, small, 1, NULL, NULL), -ENODATA);
    cr_assert_eq(shoal_bulk_read(dir, 0, small, 20, NULL, NULL), -EISDIR);
    char missing[PATH_MAX + 16];
    snprintf(missing, sizeof missing, "%s/missing", dir);
    cr_assert_eq(shoal_bulk_read(missing, 0, small, 20, NULL, NULL), -ENOENT);
    cr_assert_eq(shoal_bulk_write(missing, 0, small, 20, NULL, NULL), -ENOENT, "write never creates the file");
    cr_assert_eq(shoal_bulk_read(file, 0, small, 20, &(shoal_bulk_opts){.chunk = 1000}, NULL), -EINVAL);
    cr_assert_eq(shoal_bulk_read("/dev/null", 0, small, 20, NULL, NULL), -EINVAL, "not a regular file");
    cr_assert_eq(shoal_bulk_read(file, 0, small, 0, NULL, NULL), 0, "nothing to read is no error");
}
