/*
 * tests/bridge/test_curve.c - Curve keys and their Z85 text (every error a
 * connection file can hold), and real Curve connections over ZeroMQ: a
 * member admitted by the ZAP handler, a stranger, a plaintext peer and a
 * wrong server key refused, each with the handshake event that says why.
 */
#include <criterion/criterion.h>

#include <shoal/curve.h>
#include <shoal/zwire.h>

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

TestSuite(curve);

static void keypair_text(char pub[41], char sec[41])
{
    uint8_t p[SHOAL_CURVE_KEY], s[SHOAL_CURVE_KEY];
    cr_assert_eq(shoal_curve_keypair(p, s), 0);
    shoal_curve_z85_encode(p, pub);
    shoal_curve_z85_encode(s, sec);
}

Test(curve, available_here)
{
    cr_assert_eq(shoal_curve_available(), 1, "Debian's libzmq is built with libsodium");
}

Test(curve, z85_round_trips_and_agrees_with_libzmq)
{
    for (int i = 0; i < 200; i++) {
        uint8_t key[SHOAL_CURVE_KEY], back[SHOAL_CURVE_KEY], theirs[SHOAL_CURVE_KEY];
        cr_assert_eq(shoal_wire_keygen(key), 0);
        if (i == 0)
            memset(key, 0xff, sizeof key); /* the largest group: 85^5 - 1 > 2^32 - 1 */
        char text[SHOAL_CURVE_Z85 + 1], zt[SHOAL_CURVE_Z85 + 1];
        shoal_curve_z85_encode(key, text);
        cr_assert_not_null(zmq_z85_encode(zt, key, sizeof key));
        cr_assert_str_eq(text, zt);
        cr_assert_eq(shoal_curve_z85_decode(text, back), 0);
        cr_assert_arr_eq(back, key, sizeof key);
        cr_assert_not_null(zmq_z85_decode(theirs, text));
        cr_assert_arr_eq(theirs, key, sizeof key);
    }
}

Test(curve, z85_errors_leave_the_key_alone)
{
    char good[SHOAL_CURVE_Z85 + 1], pub[SHOAL_CURVE_Z85 + 1];
    keypair_text(pub, good);
    uint8_t key[SHOAL_CURVE_KEY];
    memset(key, 0xab, sizeof key);
    char text[64];
    cr_assert_eq(shoal_curve_z85_decode(NULL, key), -ENOENT);
    cr_assert_eq(shoal_curve_z85_decode("", key), -EINVAL);
    snprintf(text, sizeof text, "%.39s", good);
    cr_assert_eq(shoal_curve_z85_decode(text, key), -EINVAL);
    snprintf(text, sizeof text, "%sA", good);
    cr_assert_eq(shoal_curve_z85_decode(text, key), -EINVAL);
    const char not_z85[] = " \"',;\\_`|~\x7f\x80";
    for (const char *c = not_z85; *c; c++) {
        snprintf(text, sizeof text, "%s", good);
        text[17] = *c;
        cr_assert_eq(shoal_curve_z85_decode(text, key), -EILSEQ, "character 0x%02x", (unsigned char)*c);
    }
    snprintf(text, sizeof text, "%s", good);
    memcpy(text + 5, "#####", 5); /* 85^5 - 1: past 32 bits */
    cr_assert_eq(shoal_curve_z85_decode(text, key), -ERANGE);
    for (size_t i = 0; i < sizeof key; i++)
        cr_assert_eq(key[i], 0xab, "a failed decode wrote byte %zu", i);
}

Test(curve, a_member_s_keys_are_checked_field_by_field)
{
    char spub[41], ssec[41], pub[41], sec[41], opub[41], osec[41];
    keypair_text(spub, ssec);
    keypair_text(pub, sec);
    keypair_text(opub, osec);
    shoal_curve_member k, want;
    memset(&k, 0x5a, sizeof k);
    want = k;
    const char *field = NULL;
    cr_assert_eq(shoal_curve_member_parse(spub, pub, sec, &k, &field), 0);
    cr_assert_null(field);
    uint8_t b[SHOAL_CURVE_KEY];
    cr_assert_eq(shoal_curve_z85_decode(spub, b), 0);
    cr_assert_arr_eq(k.server_key, b, sizeof b);
    cr_assert_eq(shoal_curve_z85_decode(sec, b), 0);
    cr_assert_arr_eq(k.secret_key, b, sizeof b);

    struct {
        const char *s, *p, *x, *field;
        int rc;
    } bad[] = {
        {NULL, pub, sec, "server_key", -ENOENT},   {"short", pub, sec, "server_key", -EINVAL},
        {spub, NULL, sec, "public_key", -ENOENT},  {spub, "x~", sec, "public_key", -EINVAL},
        {spub, pub, NULL, "secret_key", -ENOENT},  {spub, pub, opub, "public_key", -EKEYREJECTED},
        {spub, opub, sec, "public_key", -EKEYREJECTED},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        shoal_curve_member out = want;
        field = NULL;
        cr_assert_eq(shoal_curve_member_parse(bad[i].s, bad[i].p, bad[i].x, &out, &field), bad[i].rc, "case %zu", i);
        cr_assert_str_eq(field, bad[i].field, "case %zu", i);
        cr_assert_arr_eq(&out, &want, sizeof out, "case %zu: the output is untouched", i);
    }
    char text[41];
    snprintf(text, sizeof text, "%s", sec);
    text[3] = '~';
    cr_assert_eq(shoal_curve_member_parse(spub, pub, text, &k, &field), -EILSEQ);
    cr_assert_str_eq(field, "secret_key");
    cr_assert_eq(shoal_curve_member_parse(spub, pub, sec, &k, NULL), 0, "field may be NULL");
}

Test(curve, strerror_names_each_error)
{
    int rcs[] = {-ENOENT, -EINVAL, -EILSEQ, -ERANGE, -EKEYREJECTED, -ENOTSUP, -EIO};
    for (size_t i = 0; i < sizeof rcs / sizeof rcs[0]; i++)
        for (size_t j = 0; j < i; j++)
            cr_assert_str_neq(shoal_curve_strerror(rcs[i]), shoal_curve_strerror(rcs[j]));
    cr_assert(strstr(shoal_curve_strerror(-EINVAL), "40 characters"));
    cr_assert(strstr(shoal_curve_strerror(-EKEYREJECTED), "secret_key"));
}

/* ---- real connections ----------------------------------------------------------- */

static void *ctx, *zap, *server, *server_mon;
static uint8_t key[SHOAL_WIRE_KEY], server_pub[SHOAL_CURVE_KEY], server_sec[SHOAL_CURVE_KEY];
static shoal_curve_member member;
static char endpoint[128];

static void net_setup(void)
{
    cr_assert_eq(shoal_wire_keygen(key), 0);
    cr_assert_eq(shoal_curve_keypair(server_pub, server_sec), 0);
    memcpy(member.server_key, server_pub, SHOAL_CURVE_KEY);
    cr_assert_eq(shoal_curve_keypair(member.public_key, member.secret_key), 0);
    ctx = zmq_ctx_new();
    cr_assert_eq(shoal_curve_zap_bind(ctx, &zap), 0, "the handler first: then no connection goes unasked");
    server = zmq_socket(ctx, ZMQ_ROUTER);
    int zero = 0;
    zmq_setsockopt(server, ZMQ_LINGER, &zero, sizeof zero);
    cr_assert_eq(shoal_curve_server(server, server_sec, SHOAL_CURVE_DOMAIN_CLIENTS), 0);
    cr_assert_eq(shoal_curve_monitor(ctx, server, &server_mon), 0);
    snprintf(endpoint, sizeof endpoint, "ipc:///tmp/shoal-test-curve-%d", (int)getpid());
    cr_assert_eq(zmq_bind(server, endpoint), 0);
}

static void net_teardown(void)
{
    zmq_close(server_mon);
    zmq_close(server);
    zmq_close(zap);
    zmq_ctx_term(ctx);
    unlink(endpoint + strlen("ipc://"));
}

TestSuite(curve_net, .init = net_setup, .fini = net_teardown);

/* A DEALER to the server: a Curve client of k, or plaintext (k NULL). */
static void *dealer(const shoal_curve_member *k, void **mon)
{
    void *d = zmq_socket(ctx, ZMQ_DEALER);
    int zero = 0;
    zmq_setsockopt(d, ZMQ_LINGER, &zero, sizeof zero);
    if (k)
        cr_assert_eq(shoal_curve_client(d, k), 0);
    cr_assert_eq(shoal_curve_monitor(ctx, d, mon), 0);
    cr_assert_eq(zmq_connect(d, endpoint), 0);
    return d;
}

/*
 * Serves ZAP and watches both monitors for up to 5 s, until the client's
 * monitor reports a handshake that succeeded or failed for good. Returns
 * that event; counts the ZAP requests answered (and admitted) on the way.
 */
static shoal_curve_event pump(void *client_mon, int *asked, int *admitted, shoal_curve_event *server_ev)
{
    shoal_curve_event ev = {0};
    for (int i = 0; i < 500; i++) {
        zmq_pollitem_t items[2] = {{zap, 0, ZMQ_POLLIN, 0}, {client_mon, 0, ZMQ_POLLIN, 0}};
        zmq_poll(items, 2, 10);
        shoal_curve_zap_request req;
        int rc;
        while ((rc = shoal_curve_zap_serve(zap, member.public_key, &req)) == 1) {
            ++*asked;
            *admitted += req.admitted;
            cr_assert_str_eq(req.domain, SHOAL_CURVE_DOMAIN_CLIENTS);
            cr_assert_str_eq(req.mechanism, "CURVE");
        }
        cr_assert_eq(rc, 0);
        shoal_curve_event sev;
        while (shoal_curve_monitor_read(server_mon, &sev) == 1)
            if (server_ev && sev.event != ZMQ_EVENT_HANDSHAKE_SUCCEEDED)
                *server_ev = sev;
        if (server_ev && server_ev->event)
            return ev; /* the client sees only its connection cut (NO_DETAIL) */
        char why[512];
        while (shoal_curve_monitor_read(client_mon, &ev) == 1)
            if (ev.event == ZMQ_EVENT_HANDSHAKE_SUCCEEDED || shoal_curve_event_fatal(&ev, why, sizeof why))
                return ev;
    }
    return ev;
}

Test(curve_net, a_member_is_admitted_and_its_messages_arrive)
{
    void *mon, *d = dealer(&member, &mon);
    shoal_msg_header h = {.type = SHOAL_MSG_QUERY, .msg_id = 7, .n_payload = 1};
    shoal_frame f = {"hello", 5};
    cr_assert_eq(shoal_wire_send(d, key, NULL, &h, &f, 1), 0);
    int asked = 0, admitted = 0;
    shoal_curve_event ev = pump(mon, &asked, &admitted, NULL);
    cr_assert_eq(ev.event, ZMQ_EVENT_HANDSHAKE_SUCCEEDED);
    cr_assert_eq(asked, 1);
    cr_assert_eq(admitted, 1);
    int timeout = 5000;
    zmq_setsockopt(server, ZMQ_RCVTIMEO, &timeout, sizeof timeout);
    shoal_wire_msg m;
    cr_assert_eq(shoal_wire_recv(server, key, true, NULL, 0, &m, NULL), 0);
    cr_assert_eq(m.hdr.msg_id, 7);
    shoal_wire_msg_close(&m);
    zmq_close(mon);
    zmq_close(d);
}

Test(curve_net, a_stranger_is_refused_by_zap_and_told)
{
    shoal_curve_member stranger = member;
    cr_assert_eq(shoal_curve_keypair(stranger.public_key, stranger.secret_key), 0);
    void *mon, *d = dealer(&stranger, &mon);
    int asked = 0, admitted = 0;
    shoal_curve_event ev = pump(mon, &asked, &admitted, NULL);
    cr_assert_eq(ev.event, ZMQ_EVENT_HANDSHAKE_FAILED_AUTH);
    cr_assert_eq(ev.value, 400);
    char why[512];
    cr_assert_eq(shoal_curve_event_fatal(&ev, why, sizeof why), 1);
    cr_assert(strstr(why, "refused this process's Curve key"), "%s", why);
    cr_assert_geq(asked, 1);
    cr_assert_eq(admitted, 0);
    zmq_close(mon);
    zmq_close(d);
}

Test(curve_net, a_plaintext_peer_fails_the_handshake)
{
    void *mon, *d = dealer(NULL, &mon);
    int asked = 0, admitted = 0;
    shoal_curve_event ev = pump(mon, &asked, &admitted, NULL);
    cr_assert_eq(ev.event, ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL);
    cr_assert_eq(ev.value, ZMQ_PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH);
    cr_assert_eq(asked, 0, "refused before ZAP is asked");
    zmq_close(mon);
    zmq_close(d);
}

Test(curve_net, a_wrong_server_key_fails_the_handshake)
{
    shoal_curve_member wrong = member;
    uint8_t other_sec[SHOAL_CURVE_KEY];
    cr_assert_eq(shoal_curve_keypair(wrong.server_key, other_sec), 0);
    void *mon, *d = dealer(&wrong, &mon);
    int asked = 0, admitted = 0;
    shoal_curve_event server_ev = {0};
    (void)pump(mon, &asked, &admitted, &server_ev);
    cr_assert_eq(server_ev.event, ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL, "event %#x", server_ev.event);
    cr_assert_eq(server_ev.value, ZMQ_PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC);
    cr_assert_eq(asked, 0, "the server cannot read its HELLO: ZAP is never asked");
    zmq_close(mon);
    zmq_close(d);
}

Test(curve_net, zap_answers_a_malformed_request_with_400)
{
    void *req = zmq_socket(ctx, ZMQ_REQ);
    int zero = 0, timeout = 5000;
    zmq_setsockopt(req, ZMQ_LINGER, &zero, sizeof zero);
    zmq_setsockopt(req, ZMQ_RCVTIMEO, &timeout, sizeof timeout);
    cr_assert_eq(zmq_connect(req, "inproc://zeromq.zap.01"), 0);
    shoal_curve_zap_request r;
    cr_assert_eq(shoal_curve_zap_serve(zap, member.public_key, &r), 0, "nothing waits");
    /* A CURVE request with the member's key, then the same with one byte of
     * the key changed, then three parts of nonsense. */
    for (int k = 0; k < 3; k++) {
        uint8_t cred[SHOAL_CURVE_KEY];
        memcpy(cred, member.public_key, sizeof cred);
        cred[0] ^= k == 1;
        if (k < 2) {
            const char *parts[] = {"1.0", "id1", "shoal-clients", "127.0.0.1", "", "CURVE"};
            for (int i = 0; i < 6; i++)
                zmq_send(req, parts[i], strlen(parts[i]), ZMQ_SNDMORE);
            zmq_send(req, cred, sizeof cred, 0);
        } else {
            zmq_send(req, "2.0", 3, ZMQ_SNDMORE);
            zmq_send(req, "x", 1, ZMQ_SNDMORE);
            zmq_send(req, "y", 1, 0);
        }
        int rc;
        for (int i = 0; (rc = shoal_curve_zap_serve(zap, member.public_key, &r)) == 0 && i < 500; i++)
            usleep(10000);
        cr_assert_eq(rc, 1);
        cr_assert_eq(r.admitted, k == 0, "request %d", k);
        char part[6][64];
        int n = 0, more = 1;
        while (more && n < 6) {
            int len = zmq_recv(req, part[n], sizeof part[n] - 1, 0);
            cr_assert_geq(len, 0);
            part[n++][len] = '\0';
            size_t ml = sizeof more;
            zmq_getsockopt(req, ZMQ_RCVMORE, &more, &ml);
        }
        cr_assert_eq(n, 6);
        cr_assert_str_eq(part[0], "1.0");
        cr_assert_str_eq(part[1], k < 2 ? "id1" : "x");
        cr_assert_str_eq(part[2], k == 0 ? "200" : "400");
    }
    void *again;
    cr_assert_eq(shoal_curve_zap_bind(ctx, &again), -EADDRINUSE, "one handler per context");
    zmq_close(req);
}
