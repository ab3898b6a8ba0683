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
