/*
 * tests/fuzz/fuzz_request.c - the request lines that processes send the
 * node agent on its Unix socket (node_agent/parse.c: shoal__request_byte),
 * fed byte by byte into a line buffer the size of the agent's, exactly as
 * on_peer in node_agent/agent.c feeds them. (What engine_hello and
 * lane_open then read from a request depends on the agent's engines; they
 * are not here.)
 *
 * What the agent promises (docs/agent.md): a line that is not a request it
 * knows - malformed JSON, or longer than 511 bytes - is not taken for one.
 */
#include "fuzz.h"
#include "parse.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHECK(cond)                                                                                              \
    do {                                                                                                         \
        if (!(cond)) {                                                                                           \
            fprintf(stderr, "fuzz_request: %s:%d: %s\n", __FILE__, __LINE__, #cond);                           \
            abort();                                                                                             \
        }                                                                                                        \
    } while (0)

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* On the heap, exactly the agent's size, so that a write past it is seen. */
    char *line = malloc(FUZZ_REQUEST_LINE);
    CHECK(line);
    size_t len = 0, seen = 0;
    for (size_t k = 0; k < size; k++) {
        cJSON *j = (cJSON *)line; /* a sentinel: written only when a line ends */
        int kind = shoal__request_byte(line, FUZZ_REQUEST_LINE, &len, (char)data[k], &j);
        if (kind == SHOAL__REQ_MORE) {
            CHECK(j == (cJSON *)line);
            seen++;
            continue;
        }
        CHECK(len == 0);
        CHECK(kind == SHOAL__REQ_UNKNOWN || kind == SHOAL__REQ_ENGINE || kind == SHOAL__REQ_LANE);
        if (seen > FUZZ_REQUEST_LINE - 1)
            CHECK(kind == SHOAL__REQ_UNKNOWN);
        if (kind != SHOAL__REQ_UNKNOWN)
            CHECK(j && cJSON_IsObject(j));
        cJSON_Delete(j);
        seen = 0;
    }
    free(line);
    return 0;
}
