/*
 * node_agent/parse.c - decoding request lines and message blocks for the
 * agent (parse.h). What arrives here comes from other processes: nothing is
 * trusted, every length is checked before use.
 */
#include "parse.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

int shoal__request_byte(char *line, size_t cap, size_t *len, char c, cJSON **json)
{
    if (c != '\n') {
        if (*len < cap - 1)
            line[(*len)++] = c;
        else
            *len = cap; /* too long: refused when it ends, not cut short and read */
        return SHOAL__REQ_MORE;
    }
    size_t n = *len;
    *len = 0;
    if (n == cap) {
        *json = NULL;
        return SHOAL__REQ_UNKNOWN;
    }
    line[n] = '\0';
    cJSON *j = cJSON_Parse(line);
    *json = j;
    cJSON *role = cJSON_GetObjectItemCaseSensitive(j, "role");
    if (cJSON_IsString(role) && !strcmp(role->valuestring, "engine"))
        return SHOAL__REQ_ENGINE;
    if (cJSON_GetObjectItemCaseSensitive(j, "lane"))
        return SHOAL__REQ_LANE;
    return SHOAL__REQ_UNKNOWN;
}

int shoal__msgblock_frames(const uint8_t *p, uint64_t len, shoal_frame **frames, uint32_t *nframes,
                           uint32_t *npayload)
{
    uint32_t w[4];
    if (len < SHOAL__MSGBLOCK_HDR)
        return -EBADMSG;
    memcpy(w, p, sizeof w);
    if (w[0] != SHOAL__MSGBLOCK_MAGIC || w[1] > SHOAL_WIRE_MAX_FRAMES || w[2] > w[1] ||
        SHOAL__MSGBLOCK_HDR + 8 * (uint64_t)w[1] > len)
        return -EBADMSG;
    shoal_frame *f = malloc((w[1] ? w[1] : 1) * sizeof *f);
    if (!f)
        return -ENOMEM;
    uint64_t pos = SHOAL__MSGBLOCK_HDR + 8 * (uint64_t)w[1];
    for (uint32_t i = 0; i < w[1]; i++) {
        uint64_t n;
        memcpy(&n, p + SHOAL__MSGBLOCK_HDR + 8 * i, 8);
        if (n > len - pos) {
            free(f);
            return -EBADMSG;
        }
        f[i] = (shoal_frame){p + pos, n};
        pos += n;
    }
    *frames = f;
    *nframes = w[1];
    *npayload = w[2];
    return 0;
}
