/*
 * tests/node_agent/test_parse.c - the agent's decoders of other processes'
 * input (node_agent/parse.c): request lines from its socket and message
 * blocks from engines. tests/fuzz/ feeds the same functions random bytes.
 */
#include <criterion/criterion.h>

#include "parse.h"

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Feeds text byte by byte; returns the kind of the first line that ends. */
static int feed(const char *text, cJSON **json)
{
    char line[512];
    size_t len = 0;
    for (const char *c = text; *c; c++) {
        int kind = shoal__request_byte(line, sizeof line, &len, *c, json);
        if (kind != SHOAL__REQ_MORE) {
            cr_assert_eq(len, 0, "a line that ended leaves the buffer empty");
            return kind;
        }
    }
    return SHOAL__REQ_MORE;
}

Test(request, engine_hello)
{
    cJSON *j = NULL;
    cr_assert_eq(feed("{\"role\": \"engine\", \"index\": 3}\n", &j), SHOAL__REQ_ENGINE);
    cr_assert_eq(cJSON_GetObjectItemCaseSensitive(j, "index")->valueint, 3);
    cJSON_Delete(j);
}

Test(request, lane)
{
    cJSON *j = NULL;
    cr_assert_eq(feed("{\"lane\": 7}\n", &j), SHOAL__REQ_LANE);
    cJSON_Delete(j);
}

Test(request, line_goes_on_until_newline)
{
    cJSON *j = (cJSON *)&j; /* a sentinel: nothing may write it before the newline */
    cr_assert_eq(feed("{\"lane\": 7}", &j), SHOAL__REQ_MORE);
    cr_assert_eq(j, (cJSON *)&j);
}

Test(request, unknown_requests)
{
    const char *lines[] = {"\n", "not json\n", "{\"role\": \"client\"}\n", "{\"role\": 1}\n", "[1, 2]\n",
                           "\"lane\"\n", "{\"lan\": 1}\n", "{\"lane\": 1\n"};
    for (size_t i = 0; i < sizeof lines / sizeof *lines; i++) {
        cJSON *j = NULL;
        cr_assert_eq(feed(lines[i], &j), SHOAL__REQ_UNKNOWN, "%s", lines[i]);
        cJSON_Delete(j);
    }
}

Test(request, lines_in_a_row)
{
    char line[512];
    size_t len = 0;
    const char *text = "{\"lane\": 1}\n{\"role\": \"engine\"}\nx\n";
    int want[] = {SHOAL__REQ_LANE, SHOAL__REQ_ENGINE, SHOAL__REQ_UNKNOWN}, got = 0;
    for (const char *c = text; *c; c++) {
        cJSON *j = NULL;
        int kind = shoal__request_byte(line, sizeof line, &len, *c, &j);
        if (kind == SHOAL__REQ_MORE)
            continue;
        cr_assert_lt(got, 3);
        cr_assert_eq(kind, want[got++]);
        cJSON_Delete(j);
    }
    cr_assert_eq(got, 3);
}

Test(request, a_line_too_long_is_refused_not_cut_short)
{
    /* A request padded past the 511 bytes a line may have used to be cut
     * to its first 511 and granted (the fuzz target found it). */
    char text[700];
    memset(text, ' ', sizeof text);
    memcpy(text, "{\"lane\": 1}", 11);
    text[sizeof text - 2] = '\n';
    text[sizeof text - 1] = '\0';
    cJSON *j = (cJSON *)text;
    cr_assert_eq(feed(text, &j), SHOAL__REQ_UNKNOWN);
    cr_assert_null(j);
    /* 511 bytes still fit, and the next line is read afresh. */
    text[511] = '\n';
    text[512] = '\0';
    cr_assert_eq(feed(text, &j), SHOAL__REQ_LANE);
    cJSON_Delete(j);
    char line[512];
    size_t len = 0;
    memset(text, 'x', 600);
    for (int i = 0; i < 600; i++)
        cr_assert_eq(shoal__request_byte(line, sizeof line, &len, text[i], &j), SHOAL__REQ_MORE);
    cr_assert_eq(shoal__request_byte(line, sizeof line, &len, '\n', &j), SHOAL__REQ_UNKNOWN);
    const char *next = "{\"lane\": 2}\n";
    int kind = SHOAL__REQ_MORE;
    for (const char *c = next; *c; c++)
        kind = shoal__request_byte(line, sizeof line, &len, *c, &j);
    cr_assert_eq(kind, SHOAL__REQ_LANE);
    cJSON_Delete(j);
}

/* Builds a message block of frames of the given lengths (bytes 'a', 'b', ...). */
static size_t block(uint8_t *out, uint32_t n, uint32_t npayload, const uint64_t *lens)
{
    uint32_t w[4] = {SHOAL__MSGBLOCK_MAGIC, n, npayload, 0};
    memcpy(out, w, sizeof w);
    size_t pos = SHOAL__MSGBLOCK_HDR + 8 * (size_t)n;
    for (uint32_t i = 0; i < n; i++) {
        memcpy(out + SHOAL__MSGBLOCK_HDR + 8 * i, &lens[i], 8);
        memset(out + pos, 'a' + (int)i, lens[i]);
        pos += lens[i];
    }
    return pos;
}

Test(msgblock, frames)
{
    uint8_t b[256];
    uint64_t lens[3] = {3, 0, 5};
    size_t len = block(b, 3, 2, lens);
    shoal_frame *f = NULL;
    uint32_t n = 0, np = 0;
    cr_assert_eq(shoal__msgblock_frames(b, len, &f, &n, &np), 0);
    cr_assert_eq(n, 3);
    cr_assert_eq(np, 2);
    cr_assert_eq(f[0].len, 3);
    cr_assert_eq(memcmp(f[0].data, "aaa", 3), 0);
    cr_assert_eq(f[1].len, 0);
    cr_assert_eq(f[2].len, 5);
    cr_assert_eq((const uint8_t *)f[2].data, b + len - 5);
    free(f);
}

Test(msgblock, no_frames)
{
    uint8_t b[16];
    size_t len = block(b, 0, 0, NULL);
    shoal_frame *f = NULL;
    uint32_t n = 1, np = 1;
    cr_assert_eq(shoal__msgblock_frames(b, len, &f, &n, &np), 0);
    cr_assert_eq(n, 0);
    cr_assert_eq(np, 0);
    free(f);
}

Test(msgblock, refuses_what_does_not_add_up)
{
    uint8_t b[256];
    uint64_t lens[2] = {4, 4};
    size_t len = block(b, 2, 1, lens);
    shoal_frame *f = (shoal_frame *)b; /* untouched on failure */
    uint32_t n = 99, np = 99;

    cr_assert_eq(shoal__msgblock_frames(b, 15, &f, &n, &np), -EBADMSG, "shorter than a header");
    cr_assert_eq(shoal__msgblock_frames(b, len - 1, &f, &n, &np), -EBADMSG, "a frame runs past the block");
    cr_assert_eq(shoal__msgblock_frames(b, SHOAL__MSGBLOCK_HDR + 8, &f, &n, &np), -EBADMSG,
                 "the lengths run past the block");
    uint8_t c[256];
    memcpy(c, b, len);
    c[0] ^= 1;
    cr_assert_eq(shoal__msgblock_frames(c, len, &f, &n, &np), -EBADMSG, "wrong magic");
    memcpy(c, b, len);
    uint32_t np3 = 3;
    memcpy(c + 8, &np3, 4);
    cr_assert_eq(shoal__msgblock_frames(c, len, &f, &n, &np), -EBADMSG, "more payload frames than frames");
    memcpy(c, b, len);
    uint32_t many = SHOAL_WIRE_MAX_FRAMES + 1;
    memcpy(c + 4, &many, 4);
    cr_assert_eq(shoal__msgblock_frames(c, UINT64_MAX, &f, &n, &np), -EBADMSG, "too many frames");
    memcpy(c, b, len);
    uint64_t huge = UINT64_MAX - 2;
    memcpy(c + SHOAL__MSGBLOCK_HDR + 8, &huge, 8);
    cr_assert_eq(shoal__msgblock_frames(c, len, &f, &n, &np), -EBADMSG, "a length that would wrap");
    cr_assert_eq(f, (shoal_frame *)b);
    cr_assert_eq(n, 99);
    cr_assert_eq(np, 99);
}
