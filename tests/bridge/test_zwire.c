/*
 * tests/bridge/test_zwire.c - wire messages over real ZeroMQ sockets: a
 * ROUTER (as the controller has) and DEALERs (as agents and clients have),
 * including a raw socket that sends garbage.
 */
#include <criterion/criterion.h>

#include <shoal/zwire.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static uint8_t key[SHOAL_WIRE_KEY];
static void *ctx, *router, *dealer;
static char endpoint[128];

static void setup(void)
{
    cr_assert_eq(shoal_wire_keygen(key), 0);
    ctx = zmq_ctx_new();
    router = zmq_socket(ctx, ZMQ_ROUTER);
    dealer = zmq_socket(ctx, ZMQ_DEALER);
    int linger = 0, timeout = 5000;
    zmq_setsockopt(router, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(dealer, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(router, ZMQ_RCVTIMEO, &timeout, sizeof timeout);
    zmq_setsockopt(dealer, ZMQ_RCVTIMEO, &timeout, sizeof timeout);
    /* Criterion runs tests in parallel processes: the name holds our pid. */
    snprintf(endpoint, sizeof endpoint, "ipc:///tmp/shoal-test-zwire-%d", (int)getpid());
    cr_assert_eq(zmq_bind(router, endpoint), 0);
    cr_assert_eq(zmq_connect(dealer, endpoint), 0);
}

static void teardown(void)
{
    zmq_close(dealer);
    zmq_close(router);
    zmq_ctx_term(ctx);
    unlink(endpoint + strlen("ipc://"));
}

TestSuite(zwire, .init = setup, .fini = teardown);

static void send_task(void *sock, uint64_t id, const char *text, const void *buf, size_t buflen)
{
    shoal_msg_header h = {.type = SHOAL_MSG_TASK, .msg_id = id, .n_payload = 1, .n_buffers = buf ? 1 : 0};
    shoal_frame f[2] = {{text, strlen(text)}, {buf, buflen}};
    cr_assert_eq(shoal_wire_send(sock, key, NULL, &h, f, buf ? 2 : 1), 0);
}

/* Receives on the router, expecting a good message with id and text. */
static void expect_task(uint64_t id, const char *text)
{
    shoal_wire_msg m;
    shoal_wire_counters c = {0};
    int rc = shoal_wire_recv(router, key, true, NULL, 0, &m, &c);
    cr_assert_eq(rc, 0, "recv: %s", shoal_wire_strerror(rc));
    cr_assert(m.has_route);
    cr_assert_eq(m.hdr.msg_id, id);
    shoal_frame f = shoal_wire_frame(&m, 0);
    cr_assert_eq(f.len, strlen(text));
    cr_assert_eq(memcmp(f.data, text, f.len), 0);
    cr_assert_eq(c.received, 1);
    shoal_wire_msg_close(&m);
}

Test(zwire, round_trip_with_a_reply_by_route)
{
    static uint8_t big[1 << 20];
    memset(big, 7, sizeof big);
    send_task(dealer, 1, "apply", big, sizeof big);
    shoal_wire_msg m;
    cr_assert_eq(shoal_wire_recv(router, key, true, NULL, 0, &m, NULL), 0);
    cr_assert_eq(m.nframes, 2);
    shoal_frame b = shoal_wire_frame(&m, 1);
    cr_assert_eq(b.len, sizeof big);
    cr_assert_eq(((const uint8_t *)b.data)[12345], 7);
    /* Answer through the route the router saw. */
    shoal_frame route = {zmq_msg_data(&m.route), zmq_msg_size(&m.route)};
    shoal_msg_header h = {.type = SHOAL_MSG_RESULT, .reply_to = m.hdr.msg_id};
    cr_assert_eq(shoal_wire_send(router, key, &route, &h, NULL, 0), 0);
    shoal_wire_msg_close(&m);
    cr_assert_eq(shoal_wire_recv(dealer, key, false, NULL, 0, &m, NULL), 0);
    cr_assert_eq(m.hdr.type, SHOAL_MSG_RESULT);
    cr_assert_eq(m.hdr.reply_to, 1);
    cr_assert_not(m.has_route);
    shoal_wire_msg_close(&m);
}

Test(zwire, nothing_waiting_is_eagain)
{
    shoal_wire_msg m;
    cr_assert_eq(shoal_wire_recv(router, key, true, NULL, ZMQ_DONTWAIT, &m, NULL), -EAGAIN);
    shoal_wire_msg_close(&m);
}

Test(zwire, bad_signature_is_refused_and_the_stream_goes_on)
{
    uint8_t other[SHOAL_WIRE_KEY] = {1};
    shoal_msg_header h = {.type = SHOAL_MSG_TASK, .msg_id = 5, .n_payload = 1};
    shoal_frame f = {"evil", 4};
    cr_assert_eq(shoal_wire_send(dealer, other, NULL, &h, &f, 1), 0);
    send_task(dealer, 6, "good", NULL, 0);
    shoal_wire_msg m;
    shoal_wire_counters c = {0};
    cr_assert_eq(shoal_wire_recv(router, key, true, NULL, 0, &m, &c), -EACCES);
    cr_assert(m.has_route, "the sender can still be told");
    cr_assert_eq(c.bad_signature, 1);
    shoal_wire_msg_close(&m);
    expect_task(6, "good");
}

static uint64_t realtime_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

Test(zwire, a_message_is_stamped_when_sent)
{
    uint64_t before = realtime_ns();
    send_task(dealer, 1, "now", NULL, 0);
    shoal_msg_header h = {.type = SHOAL_MSG_TASK, .msg_id = 2, .stamp_ns = 42};
    cr_assert_eq(shoal_wire_send(dealer, key, NULL, &h, NULL, 0), 0);
    shoal_wire_msg m;
    cr_assert_eq(shoal_wire_recv(router, key, true, NULL, 0, &m, NULL), 0);
    cr_assert(m.hdr.stamp_ns >= before && m.hdr.stamp_ns <= realtime_ns(), "0 is stamped with the clock");
    shoal_wire_msg_close(&m);
    cr_assert_eq(shoal_wire_recv(router, key, true, NULL, 0, &m, NULL), 0);
    cr_assert_eq(m.hdr.stamp_ns, 42, "a stamp of the caller's is kept (and no window: accepted)");
    shoal_wire_msg_close(&m);
}

Test(zwire, a_stamp_outside_the_window_is_refused_either_way)
{
    const uint64_t day = 86400ull * 1000000000u;
    shoal_wire_limits lim = shoal_wire_default_limits;
    lim.max_skew_ns = 300ull * 1000000000u;
    uint64_t stamps[] = {realtime_ns() - day, realtime_ns() + day, realtime_ns() - 200ull * 1000000000u};
    for (int i = 0; i < 3; i++) {
        shoal_msg_header h = {.type = SHOAL_MSG_TASK, .msg_id = 10 + (uint64_t)i, .stamp_ns = stamps[i]};
        cr_assert_eq(shoal_wire_send(dealer, key, NULL, &h, NULL, 0), 0);
    }
    send_task(dealer, 13, "fresh", NULL, 0);
    shoal_wire_counters c = {0};
    shoal_wire_msg m;
    for (int i = 0; i < 2; i++) {
        cr_assert_eq(shoal_wire_recv(router, key, true, &lim, 0, &m, &c), -ESTALE, "stamp %d", i);
        cr_assert(m.has_route);
        cr_assert_eq(m.hdr.msg_id, 10 + (uint64_t)i, "the authentic header is kept, to answer it");
        shoal_wire_msg_close(&m);
    }
    cr_assert_eq(c.stale, 2);
    cr_assert_eq(shoal_wire_recv(router, key, true, &lim, 0, &m, &c), 0, "200 s is within 300 s");
    cr_assert_eq(m.hdr.msg_id, 12);
    shoal_wire_msg_close(&m);
    cr_assert_eq(shoal_wire_recv(router, key, true, &lim, 0, &m, &c), 0);
    cr_assert_eq(m.hdr.msg_id, 13);
    shoal_wire_msg_close(&m);
    cr_assert_eq(c.received, 2);
    /* A stale stamp under another key is a bad signature: the stamp of a
     * message that is not authentic says nothing. */
    uint8_t other[SHOAL_WIRE_KEY] = {1};
    shoal_msg_header h = {.type = SHOAL_MSG_TASK, .msg_id = 14, .stamp_ns = 1};
    cr_assert_eq(shoal_wire_send(dealer, other, NULL, &h, NULL, 0), 0);
    cr_assert_eq(shoal_wire_recv(router, key, true, &lim, 0, &m, &c), -EACCES);
    shoal_wire_msg_close(&m);
    cr_assert_eq(c.stale, 2);
}

Test(zwire, garbage_from_a_raw_socket_is_refused_and_the_stream_goes_on)
{
    unsigned seed = 3;
    static uint8_t junk[4096];
    shoal_wire_counters c = {0};
    for (int k = 0; k < 300; k++) {
        int parts = 1 + rand_r(&seed) % 6;
        for (int p = 0; p < parts; p++) {
            size_t len = (size_t)rand_r(&seed) % sizeof junk;
            if (p == 0 && k % 3 == 0)
                len = SHOAL_WIRE_HDR;
            for (size_t i = 0; i < len; i++)
                junk[i] = (uint8_t)rand_r(&seed);
            cr_assert_geq(zmq_send(dealer, junk, len, p + 1 < parts ? ZMQ_SNDMORE : 0), 0);
        }
        shoal_wire_msg m;
        int rc = shoal_wire_recv(router, key, true, NULL, 0, &m, &c);
        cr_assert(rc == -EBADMSG || rc == -EPROTO || rc == -EACCES || rc == -EMSGSIZE, "junk %d: %d", k, rc);
        shoal_wire_msg_close(&m);
    }
    cr_assert_eq(c.received, 0);
    cr_assert_eq(c.malformed + c.bad_signature + c.oversized, 300);
    send_task(dealer, 7, "still here", NULL, 0);
    expect_task(7, "still here");
}

Test(zwire, an_identity_alone_and_too_many_parts_are_refused)
{
    /* An empty message on a DEALER reaches the ROUTER as identity + empty part. */
    cr_assert_geq(zmq_send(dealer, "", 0, 0), 0);
    shoal_wire_msg m;
    shoal_wire_counters c = {0};
    cr_assert_eq(shoal_wire_recv(router, key, true, NULL, 0, &m, &c), -EBADMSG);
    shoal_wire_msg_close(&m);
    cr_assert_eq(c.malformed, 1);
    /* More parts than any message may have: read, dropped, counted (the
     * fuzz target found them uncounted), in sync after. */
    for (int p = 0; p < (int)SHOAL_WIRE_MAX_FRAMES + 10; p++)
        cr_assert_geq(zmq_send(dealer, "x", 1, p + 1 < (int)SHOAL_WIRE_MAX_FRAMES + 10 ? ZMQ_SNDMORE : 0), 0);
    cr_assert_eq(shoal_wire_recv(router, key, true, NULL, 0, &m, &c), -EBADMSG);
    shoal_wire_msg_close(&m);
    cr_assert_eq(c.malformed, 2);
    cr_assert_eq(c.received + c.oversized + c.bad_signature, 0);
    send_task(dealer, 8, "after", NULL, 0);
    expect_task(8, "after");
}

Test(zwire, oversized_frames_are_refused_before_hashing)
{
    static uint8_t big[1 << 16];
    send_task(dealer, 9, "big", big, sizeof big);
    shoal_wire_limits lim = {.max_frame = 1024, .max_body = 1 << 20};
    shoal_wire_msg m;
    shoal_wire_counters c = {0};
    cr_assert_eq(shoal_wire_recv(router, key, true, &lim, 0, &m, &c), -EFBIG, "signed: its header is read");
    cr_assert_eq(m.hdr.msg_id, 9);
    cr_assert(m.has_route);
    cr_assert_eq(c.oversized, 1);
    shoal_wire_msg_close(&m);
    send_task(dealer, 10, "small", NULL, 0);
    expect_task(10, "small");
}

Test(zwire, engine_error_results_are_escaped_json)
{
    shoal_msg_header h = {.msg_id = 3, .task_id = 9, .reply_to = 4};
    cr_assert_eq(shoal_wire_send_engine_error(dealer, key, NULL, &h, 7, "a \"quoted\"\nthing\\"), 0);
    shoal_wire_msg m;
    cr_assert_eq(shoal_wire_recv(router, key, true, NULL, 0, &m, NULL), 0);
    cr_assert_eq(m.hdr.type, SHOAL_MSG_RESULT);
    cr_assert_eq(m.hdr.task_id, 9);
    cr_assert_eq(m.hdr.reply_to, 4);
    cr_assert_eq(m.hdr.sender, 7);
    cr_assert_eq(m.hdr.n_payload, 2);
    shoal_frame f = shoal_wire_frame(&m, 0);
    char text[1024];
    cr_assert_lt(f.len, sizeof text);
    memcpy(text, f.data, f.len);
    text[f.len] = '\0';
    cr_assert(strstr(text, "\"ename\":\"EngineError\""), "%s", text);
    cr_assert(strstr(text, "\"evalue\":\"a \\\"quoted\\\"\\u000athing\\\\\""), "%s", text);
    shoal_wire_msg_close(&m);
}

Test(zwire, a_message_signed_once_is_sent_as_forward_sends_it)
{
    /* A queued message is signed when queued, then sent (maybe after
     * retries) with that header: it must decode as any other. */
    const char *text = "signed once";
    shoal_msg_header h = {.type = SHOAL_MSG_TASK, .msg_id = 11, .n_payload = 1};
    shoal_frame f = {text, strlen(text)};
    uint8_t hdr[SHOAL_WIRE_HDR];
    cr_assert_eq(shoal_wire_sign(key, &h, &f, 1, NULL, 0, hdr), 0);
    cr_assert_eq(shoal_wire_send_signed(dealer, NULL, hdr, &f, 1, NULL, 0), 0);
    expect_task(11, "signed once");
    /* Its frames held as ZeroMQ messages, as the queues hold them. */
    zmq_msg_t msg;
    zmq_msg_init_size(&msg, strlen(text));
    memcpy(zmq_msg_data(&msg), text, strlen(text));
    h.msg_id = 12;
    cr_assert_eq(shoal_wire_sign(key, &h, NULL, 0, &msg, 1, hdr), 0);
    cr_assert_eq(shoal_wire_send_signed(dealer, NULL, hdr, NULL, 0, &msg, 1), 0);
    expect_task(12, "signed once");
    zmq_msg_close(&msg);
}
