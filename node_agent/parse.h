/*
 * node_agent/parse.h - the agent's decoders of what other processes hand it:
 * the request lines that arrive on its Unix socket, and the message blocks
 * that engines write into the arena. Private to the agent; they live apart
 * from agent.c so that the Criterion tests and the fuzz targets
 * (tests/fuzz/) run the very code the agent runs. Both are pure computation
 * on the caller's memory: safe from any thread, no global state.
 */
#ifndef SHOAL_AGENT_PARSE_H
#define SHOAL_AGENT_PARSE_H

#include <shoal/wire.h>

#include <cjson/cJSON.h>
#include <stddef.h>
#include <stdint.h>

/* What a request line asks for. */
enum shoal__request_kind {
    SHOAL__REQ_MORE = 0, /* the line goes on: feed the next byte */
    SHOAL__REQ_UNKNOWN,  /* not a request this agent knows */
    SHOAL__REQ_ENGINE,   /* {"role": "engine", ...}: an engine introduces itself */
    SHOAL__REQ_LANE,     /* {"lane": ...}: a client asks for a lane */
};

/*
 * Feeds byte c of a peer's stream into its line buffer (line, cap bytes, of
 * which *len are used; *len starts at 0). Returns SHOAL__REQ_MORE until c is
 * the newline that ends the line; then parses the line, resets *len to 0 and
 * returns its kind, with *json the parsed object (NULL if it is not JSON),
 * which the caller must cJSON_Delete whatever the kind. *json is only
 * written when a line ends. A line longer than cap - 1 bytes is
 * SHOAL__REQ_UNKNOWN (*json NULL), whatever its first cap - 1 bytes say.
 */
int shoal__request_byte(char *line, size_t cap, size_t *len, char c, cJSON **json);

#define SHOAL__MSGBLOCK_MAGIC 0x464D4853u /* "SHMF" */
#define SHOAL__MSGBLOCK_HDR 16u           /* magic, frames, payload frames, flags */

/*
 * Splits a message block of len bytes at p (docs/engine.md, "Message
 * blocks") into its frames. The block is another process's memory, so
 * every count and length is checked before it is used. On success returns 0
 * with *frames a malloc'd array of *nframes frames pointing into p (the
 * caller frees it) and *npayload the payload frames among them. Otherwise
 * returns -EBADMSG (wrong magic, more than SHOAL_WIRE_MAX_FRAMES frames,
 * more payload frames than frames, or lengths that run past len) or
 * -ENOMEM, and leaves the outputs untouched.
 */
int shoal__msgblock_frames(const uint8_t *p, uint64_t len, shoal_frame **frames, uint32_t *nframes,
                           uint32_t *npayload);

#endif /* SHOAL_AGENT_PARSE_H */
