"""shoal._core.Socket: the signed wire protocol from Python, over real ZeroMQ sockets."""

import os

import numpy as np
import pytest

from shoal import _core


@pytest.fixture
def pair(tmp_path):
    key = _core.keygen()
    ep = f"ipc://{tmp_path}/s-{os.getpid()}"
    router = _core.Socket("router", key, bind=ep)
    dealer = _core.Socket("dealer", key, connect=ep)
    yield key, ep, router, dealer
    dealer.close()
    router.close()


def test_keygen_is_random():
    a, b = _core.keygen(), _core.keygen()
    assert len(a) == 32 and a != b


def test_round_trip_and_reply_by_route(pair):
    key, ep, router, dealer = pair
    arr = np.arange(1_000_000, dtype="f8")
    mid = dealer.send(_core.MSG_TASK, [b"apply", b'{"f": 1}'], [arr], task_id=42, target=3)
    hdr, payload, buffers, route = router.recv(timeout=5)
    assert hdr["type"] == _core.MSG_TASK and hdr["msg_id"] == mid and hdr["task_id"] == 42
    assert hdr["target"] == 3 and hdr["body_len"] == 5 + 8 + arr.nbytes
    assert [bytes(p) for p in payload] == [b"apply", b'{"f": 1}']
    got = np.frombuffer(buffers[0], dtype="f8")  # ZeroMQ's memory, not a copy
    assert not got.flags.writeable and got.base is buffers[0]
    np.testing.assert_array_equal(got, arr)
    router.send(_core.MSG_RESULT, [b"ok"], route=route, reply_to=mid)
    hdr, payload, buffers, route2 = dealer.recv(timeout=5)
    assert hdr["type"] == _core.MSG_RESULT and hdr["reply_to"] == mid and route2 is None
    assert router.counters["received"] == 1


def test_bad_signature_is_refused_with_the_sender_named(pair):
    key, ep, router, dealer = pair
    intruder = _core.Socket("dealer", _core.keygen(), connect=ep, identity=b"intruder")
    try:
        intruder.send(_core.MSG_TASK, [b"rm -rf"])
        with pytest.raises(_core.WireError) as e:
            router.recv(timeout=5)
        reason, code, route = e.value.args
        assert reason == "bad signature" and route == b"intruder"
        assert router.counters["bad_signature"] == 1
        dealer.send(_core.MSG_HEARTBEAT)
        hdr, *_ = router.recv(timeout=5)
        assert hdr["type"] == _core.MSG_HEARTBEAT, "the router keeps serving"
    finally:
        intruder.close()


def test_timeouts_and_usage_errors(pair):
    key, ep, router, dealer = pair
    with pytest.raises(TimeoutError):
        router.recv(timeout=0.05)
    with pytest.raises(ValueError, match="route"):
        router.send(_core.MSG_HEARTBEAT)
    with pytest.raises(ValueError, match="32 bytes"):
        _core.Socket("dealer", b"short", connect=ep)
    with pytest.raises(ValueError, match="kind"):
        _core.Socket("pub", key, connect=ep)
    with pytest.raises(ValueError, match="exactly one"):
        _core.Socket("dealer", key)
    with pytest.raises(OSError):
        _core.Socket("router", key, bind="nonsense://x")
    with pytest.raises(ValueError, match="at most"):
        dealer.send(_core.MSG_TASK, [b"x"] * 5000)
    dealer.close()
    with pytest.raises(ValueError, match="closed"):
        dealer.send(_core.MSG_HEARTBEAT)


def test_oversized_frames_are_refused(tmp_path):
    key = _core.keygen()
    ep = f"ipc://{tmp_path}/big-{os.getpid()}"
    router = _core.Socket("router", key, bind=ep, max_frame=1 << 16)
    dealer = _core.Socket("dealer", key, connect=ep)
    try:
        dealer.send(_core.MSG_TASK, [b"x"], [bytes(1 << 20)])
        dealer.send(_core.MSG_HEARTBEAT)
        # ZeroMQ itself drops the connection that carried the oversized frame,
        # before the router holds it; the dealer reconnects, and what it sends
        # next arrives.
        hdr, payload, buffers, route = router.recv(timeout=5)
        assert hdr["type"] == _core.MSG_HEARTBEAT
        with pytest.raises(TimeoutError):
            router.recv(timeout=0.2)
        assert router.counters["received"] == 1
    finally:
        dealer.close()
        router.close()


def test_messages_are_stamped_and_a_stamp_can_be_given(pair):
    import time
    key, ep, router, dealer = pair
    before = time.time_ns()
    dealer.send(_core.MSG_HEARTBEAT)
    dealer.send(_core.MSG_HEARTBEAT, stamp_ns=12345)
    hdr, *_ = router.recv(timeout=5)
    assert before <= hdr["stamp_ns"] <= time.time_ns()
    hdr, *_ = router.recv(timeout=5)
    assert hdr["stamp_ns"] == 12345, "this socket checks no window: accepted"
    assert router.counters["stale"] == 0


def test_curve_keys_are_checked_field_by_field(pair):
    key, ep, router, dealer = pair
    server, _ = _core.curve_keypair()
    pub, sec = _core.curve_keypair()
    assert len(pub) == len(sec) == 40 and pub != sec and _core.curve_keypair()[0] != pub
    good = {"server_key": server, "public_key": pub, "secret_key": sec}
    s = _core.Socket("dealer", key, connect=ep, curve=good)
    assert s.handshakes == {"succeeded": 0, "failed": 0, "refused": None}
    s.close()
    assert _core.Socket("dealer", key, connect=ep, curve=None).handshakes is None
    for change, words in (({"server_key": "x" * 39}, "curve.server_key is not 40 characters long"),
                          ({"public_key": "~" * 40}, "curve.public_key has a character that is not Z85's"),
                          ({"secret_key": 7}, "curve.secret_key is missing"),
                          ({"public_key": server}, "curve.public_key is not the public half of secret_key")):
        with pytest.raises(ValueError, match=words):
            _core.Socket("dealer", key, connect=ep, curve=dict(good, **change))
    with pytest.raises(ValueError, match="curve must be null, or an object"):
        _core.Socket("dealer", key, connect=ep, curve="keys")
    with pytest.raises(ValueError, match="for a dealer that connects"):
        _core.Socket("router", key, bind=ep + "-2", curve=good)


def test_a_plaintext_peer_refuses_a_curve_socket_and_it_says_so(pair):
    """A curve= socket whose peer does not speak Curve hears why at once,
    instead of waiting for an answer that cannot come."""
    key, ep, router, dealer = pair
    server, _ = _core.curve_keypair()
    pub, sec = _core.curve_keypair()
    s = _core.Socket("dealer", key, connect=ep, curve={"server_key": server, "public_key": pub, "secret_key": sec})
    try:
        with pytest.raises(ConnectionRefusedError, match="disagree on Curve"):
            s.recv(timeout=5)
        assert s.handshakes["failed"] >= 1 and "disagree" in s.handshakes["refused"]
    finally:
        s.close()
