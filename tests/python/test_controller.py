"""shoal-controller: the connection file, registration, queries, heartbeats,
shutdown, and bad input, against the real controller process.

The peers here speak the wire protocol through shoal._core.Socket. Where a
test needs a node agent's side of the conversation before the agent exists,
it speaks that side itself and says so.
"""

import json
import os
import stat
import struct
import subprocess
import time

import pytest

from shoal import _core, serialize

from procs import Controller, controller_binary


@pytest.fixture
def ctl(tmp_path):
    c = Controller(tmp_path)
    yield c
    assert c.stop() == 0
    assert not c.conn.exists(), "the connection file is removed on exit"


def test_connection_file_is_private_and_complete(ctl):
    assert stat.S_IMODE(ctl.dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(ctl.conn.stat().st_mode) == 0o600
    info = ctl.info
    assert info["pid"] == ctl.proc.pid and info["signature_scheme"] == "hmac-sha256"
    assert info["client"].startswith("tcp://127.0.0.1:") and info["agent"].startswith("tcp://127.0.0.1:")
    assert len(ctl.key) == 32


def test_a_second_controller_for_the_profile_refuses(ctl, tmp_path):
    p = subprocess.run([controller_binary()], env=dict(os.environ, SHOAL_DIR=str(tmp_path)),
                       capture_output=True, text=True, timeout=10)
    assert p.returncode == 1 and "already running" in p.stderr
    assert json.loads(ctl.conn.read_text())["pid"] == ctl.proc.pid, "the first one's file is untouched"


def test_client_registers_and_queries(ctl):
    s = ctl.socket()
    kind, body = ctl.ask(s, _core.MSG_REGISTER)
    assert kind == _core.MSG_REGISTER_REPLY and body == {"nodes": [], "engines": []}
    kind, body = ctl.ask(s, _core.MSG_QUERY, {"what": "status"})
    assert kind == _core.MSG_QUERY_REPLY
    assert body["refused"]["from_clients"] == {"malformed": 0, "oversized": 0, "bad_signature": 0, "stale": 0,
                                               "unauthenticated": 0, "handshake_failed": 0}


def test_bad_signature_is_refused_and_the_controller_keeps_serving(ctl):
    intruder = ctl.socket(key=_core.keygen(), identity=b"intruder")
    intruder.send(_core.MSG_QUERY, [b"{}"])
    with pytest.raises(_core.WireError) as e:  # the ERROR reply is signed with the real key
        intruder.recv(timeout=5)
    assert e.value.args[0] == "bad signature"
    s = ctl.socket()
    kind, body = ctl.ask(s, _core.MSG_QUERY, {})
    assert body["refused"]["from_clients"]["bad_signature"] == 1


def test_malformed_frames_from_a_raw_socket_do_not_crash_it(ctl):
    raw = ctl.socket()
    agent_raw = ctl.socket("agent")
    junk = [[b""], [b"x" * 96], [os.urandom(96), b"payload"], [os.urandom(1000)] * 3, [b"SHWP" + bytes(92)],
            [b"\x00" * 96] + [b"y"] * 50]
    for frames in junk:
        raw.send_raw(frames)
        agent_raw.send_raw(frames)
    for sock in (raw, agent_raw):
        for _ in junk:  # each one is answered with an ERROR naming the reason
            hdr, payload, _, _ = sock.recv(timeout=5)
            assert hdr["type"] == _core.MSG_ERROR
            reason = json.loads(bytes(payload[0]))["error"]
            assert reason.startswith("message refused: ") and reason != "message refused: error", reason
    assert ctl.proc.poll() is None
    kind, body = ctl.ask(ctl.socket(), _core.MSG_QUERY, {})
    assert body["refused"]["from_clients"]["malformed"] == len(junk)
    assert body["refused"]["from_agents"]["malformed"] == len(junk)


def test_unknown_and_misplaced_messages_get_an_error(ctl):
    s = ctl.socket()
    kind, body = ctl.ask(s, 999)
    assert kind == _core.MSG_ERROR and "999" in body["error"]
    kind, body = ctl.ask(s, _core.MSG_TASK)
    assert kind == _core.MSG_ERROR and "targets in payload frame 0" in body["error"]
    mid = s.send(_core.MSG_TASK, [b"\x07\x00\x00"])
    hdr, payload, _, _ = s.recv(timeout=5)
    assert hdr["type"] == _core.MSG_ERROR and "bad target list" in json.loads(bytes(payload[0]))["error"]
    a = ctl.socket("agent")
    kind, body = ctl.ask(a, _core.MSG_REGISTER, {"host": 3})
    assert kind == _core.MSG_ERROR and "REGISTER needs" in body["error"]
    kind, body = ctl.ask(a, _core.MSG_ENGINE_EVENT, {"event": "started", "local": 0, "pid": 1})
    assert kind == _core.MSG_ERROR and "register again" in body["error"]


def test_abort_of_unknown_or_malformed_tasks(ctl):
    s = ctl.socket()
    kind, body = ctl.ask(s, _core.MSG_ABORT)
    assert kind == _core.MSG_ERROR and "msg_ids" in body["error"]
    kind, body = ctl.ask(s, _core.MSG_ABORT, {"msg_ids": "all"})
    assert kind == _core.MSG_ERROR
    kind, body = ctl.ask(s, _core.MSG_ABORT, {"msg_ids": [1, "x", None, 1e300]})
    assert kind == _core.MSG_QUERY_REPLY and body == {"aborting": 0}, "none of them is a task of this client's"
    kind, body = ctl.ask(s, _core.MSG_QUERY, {})
    assert kind == _core.MSG_QUERY_REPLY, "and it goes on"


def test_signal_with_bad_targets_says_which(ctl):
    s = ctl.socket()
    kind, body = ctl.ask(s, _core.MSG_SIGNAL, {"sig": "INT"})
    assert kind == _core.MSG_ERROR and "signal number" in body["error"]
    kind, body = ctl.ask(s, _core.MSG_SIGNAL, {"sig": 99, "targets": [0]})
    assert kind == _core.MSG_ERROR
    kind, body = ctl.ask(s, _core.MSG_SIGNAL, {"sig": 2, "targets": [0, 1.5, "x", -1]})
    assert kind == _core.MSG_QUERY_REPLY
    assert body == {"signalled": [], "not_running": [0, 1.5, "x", -1]}, "no engine has registered"


def test_nodes_and_engines_register(ctl):
    # The node agent's side of the conversation, spoken by the test.
    a = ctl.socket("agent")
    kind, body = ctl.ask(a, _core.MSG_REGISTER, {"host": "here", "pid": os.getpid()})
    assert kind == _core.MSG_REGISTER_REPLY and body["node"] == 0 and body["heartbeat_ms"] == 200
    ids = [ctl.ask(a, _core.MSG_ENGINE_EVENT, {"event": "started", "local": i, "pid": 1000 + i})[1]["engine"]
           for i in range(3)]
    assert ids == [0, 1, 2], "engine ids in registration order"
    a.send(_core.MSG_ENGINE_EVENT, [json.dumps({"event": "died", "local": 1, "pid": 1001}).encode()])
    c = ctl.socket()
    deadline = time.monotonic() + 5
    while True:
        _, reg = ctl.ask(c, _core.MSG_REGISTER)
        if not reg["engines"][1]["alive"] or time.monotonic() > deadline:
            break
    assert [e["alive"] for e in reg["engines"]] == [True, False, True]
    assert [e["pid"] for e in reg["engines"]] == [1000, 1001, 1002]
    hdr, *_ = a.recv(timeout=5)
    assert hdr["type"] == _core.MSG_HEARTBEAT, "a registered node gets heartbeats"
    # Losing a node that stops answering: test_agent.py, with the real agent.


def test_shutdown_from_a_client_stops_it_and_tells_the_agents(tmp_path):
    ctl = Controller(tmp_path, profile="p2")
    a = ctl.socket("agent")
    ctl.ask(a, _core.MSG_REGISTER, {"host": "here", "pid": os.getpid()})
    kind, body = ctl.ask(ctl.socket(), _core.MSG_SHUTDOWN)
    assert body == {"stopping": True}
    assert ctl.proc.wait(timeout=10) == 0
    assert not ctl.conn.exists()
    while True:
        hdr, *_ = a.recv(timeout=5)
        if hdr["type"] != _core.MSG_HEARTBEAT:
            break
    assert hdr["type"] == _core.MSG_SHUTDOWN
    ctl.stop()


def fake_node(ctl, host="fake-host", pid=4242):
    """A node agent's side, spoken by the test: registered, with one engine."""
    a = ctl.socket("agent")
    kind, _ = ctl.ask(a, _core.MSG_REGISTER, {"host": host, "pid": pid})
    assert kind == _core.MSG_REGISTER_REPLY
    eid = ctl.ask(a, _core.MSG_ENGINE_EVENT, {"event": "started", "local": 0, "pid": pid + 1})[1]["engine"]
    return a, eid


def next_task(sock, timeout=10):
    """The next TASK the controller sends this agent (heartbeats skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        hdr, payload, _, _ = sock.recv(timeout=max(deadline - time.monotonic(), 0.01))
        if hdr["type"] == _core.MSG_TASK:
            return hdr


def test_an_agent_that_registers_again_from_a_new_connection_fails_what_it_had(tmp_path):
    """The same agent (host, pid) registers from a new connection while its
    node still lives under the old one (ZeroMQ reconnected it under a new
    identity): what went the old way may never have arrived, so its tasks
    fail, and the engines serve on through the new one. (Before, its task
    waited for ever.)"""
    import shoal
    ctl = Controller(tmp_path / "home")
    try:
        a, eid = fake_node(ctl)
        with shoal.Client(url_file=str(ctl.conn), lanes=False) as rc:
            ar = rc[eid].apply_async(abs, -1)
            next_task(a)
            b = ctl.socket("agent")
            kind, _ = ctl.ask(b, _core.MSG_REGISTER, {"host": "fake-host", "pid": 4242,
                                                     "engines": [{"id": eid, "pid": 4243}]})
            assert kind == _core.MSG_REGISTER_REPLY
            t0 = time.monotonic()
            with pytest.raises(shoal.EngineError, match=f"engine {eid} was lost with its node"):
                ar.get(10)
            assert time.monotonic() - t0 < 2
            # The engine serves on through the new connection: its task goes
            # there, and its answer from there reaches the client.
            later = rc[eid].apply_async(abs, -2)
            t2 = next_task(b)
            assert not later.done()
            b.send(_core.MSG_RESULT, [json.dumps({"status": "ok"}).encode(), serialize.dumps(2).payload],
                   task_id=t2["task_id"], sender=eid, reply_to=t2["msg_id"])
            assert later.get(5) == 2
    finally:
        ctl.stop()


def test_a_result_past_the_limits_fails_its_task_and_says_why(tmp_path):
    """A result whose payload is past --max-payload, from an agent with the
    key: refused unread, and its task fails with the sizes (before, it
    waited for ever). A client's signed message past the limits gets an
    error that answers it (before: an answer to nothing)."""
    import shoal
    ctl = Controller(tmp_path / "home", extra=("--max-payload", "65536"))
    try:
        a, eid = fake_node(ctl)
        with shoal.Client(url_file=str(ctl.conn), lanes=False) as rc:
            ar = rc[eid].apply_async(abs, -1)
            task = next_task(a)
            a.send(_core.MSG_RESULT, [b"{}", b"x" * 100000], task_id=task["task_id"], sender=eid,
                   reply_to=task["msg_id"])
            with pytest.raises(shoal.EngineError, match=r"engine \d+ sent a result of 1000\d\d bytes, past this "
                                                        r"controller's limits \(--max-payload 65536, --max-frame"):
                ar.get(10)
        s = ctl.socket()
        mid = s.send(_core.MSG_TASK, [b"x" * 100000])
        hdr, payload, _, _ = s.recv(timeout=5)
        assert hdr["type"] == _core.MSG_ERROR and hdr["reply_to"] == mid
        assert "past this controller's limits (--max-payload 65536" in json.loads(bytes(payload[0]))["error"]
    finally:
        ctl.stop()


def test_a_day_old_stamp_is_refused_counted_and_answered(tmp_path):
    """A message signed with the cluster key but stamped a day ago (or a day
    ahead) is refused: before, it was answered, so a recorded message ran
    again whenever it was replayed. A client's request gets an ERROR that
    says why; an agent's stale RESULT fails its task part with the reason,
    so that no client waits for it; both are counted and logged."""
    import shoal
    ctl = Controller(tmp_path / "home")
    try:
        a, eid = fake_node(ctl)
        s = ctl.socket()
        day = 86400 * 10**9
        for stamp, side in ((time.time_ns() - day, "before"), (time.time_ns() + day, "after")):
            mid = s.send(_core.MSG_TASK, [struct.pack("<I", eid), b"{}", b""], stamp_ns=stamp)
            hdr, payload, _, _ = s.recv(timeout=5)
            assert hdr["type"] == _core.MSG_ERROR and hdr["reply_to"] == mid
            error = json.loads(bytes(payload[0]))["error"]
            assert f"was stamped 86400.0 s {side} this controller's clock, past --max-skew-ms 300000" in error
        with pytest.raises(TimeoutError):
            next_task(a, timeout=1)  # nothing reached the node
        with shoal.Client(url_file=str(ctl.conn), lanes=False) as rc:
            ar = rc[eid].apply_async(abs, -1)
            task = next_task(a)
            a.send(_core.MSG_RESULT, [json.dumps({"status": "ok"}).encode(), serialize.dumps(1).payload],
                   task_id=task["task_id"], sender=eid, reply_to=task["msg_id"], stamp_ns=time.time_ns() - day)
            with pytest.raises(shoal.EngineError, match=f"engine {eid} sent a result that was stamped 86400"):
                ar.get(10)
        kind, body = ctl.ask(s, _core.MSG_QUERY, {})
        assert body["refused"]["from_clients"]["stale"] == 2 and body["refused"]["from_agents"]["stale"] == 1
        log = ctl.log.read_text()
        assert "refused a message (type 6) from a client: it was stamped 86400.0 s before" in log
        assert "refused a message (type 7) from an agent" in log
        assert json.loads(ctl.conn.read_text())["max_skew_ms"] == 300000
        assert ctl.ask(s, _core.MSG_QUERY, {})[0] == _core.MSG_QUERY_REPLY, "a fresh stamp is answered"
    finally:
        ctl.stop()


@pytest.mark.parametrize("ip, curve", [("127.0.0.1", False), ("127.8.9.10", False), ("lo", False),
                                       ("0.0.0.0", True), ("*", True)])
def test_curve_is_on_by_default_beyond_loopback(tmp_path, ip, curve):
    """0.0.0.0 and * listen on every interface: beyond loopback."""
    ctl = Controller(tmp_path / "home", extra=("--ip", ip))
    try:
        info = ctl.info
        assert (info["curve"] is not None) == curve
        if curve:
            assert "(CurveZMQ)" in ctl.log.read_text()
            assert "secret" not in json.dumps(info).replace("secret_key", ""), "only the member's secret"
            kind, body = ctl.ask(ctl.socket(), _core.MSG_QUERY, {})
            assert body["curve"] is True
    finally:
        ctl.stop()


def test_curve_can_be_turned_on_and_off_and_off_is_warned_of_beyond_loopback(tmp_path):
    on = Controller(tmp_path / "a", extra=("--curve",))
    try:
        assert on.info["curve"] is not None
        kind, body = on.ask(on.socket(), _core.MSG_QUERY, {})
        assert body["curve"] is True
    finally:
        on.stop()
    off = Controller(tmp_path / "b", extra=("--ip", "*", "--no-curve"))
    try:
        assert off.info["curve"] is None
        assert "warning: --no-curve: listening on *, beyond loopback, in plaintext" in off.log.read_text()
    finally:
        off.stop()


@pytest.mark.parametrize("args, words", [
    (["--curve", "--no-curve"], "contradict"),
    (["--max-skew-ms", "abc"], "--max-skew-ms wants a number of milliseconds"),
    (["--max-skew-ms", "999"], "--max-skew-ms wants a number of milliseconds"),
    (["--max-skew-ms", "10000"], "--max-skew-ms (10000) must be at least 34000 ms"),
])
def test_the_controller_refuses_curve_and_skew_options_it_cannot_use(tmp_path, args, words):
    p = subprocess.run([controller_binary(), *args], env=dict(os.environ, SHOAL_DIR=str(tmp_path)),
                       capture_output=True, text=True, timeout=10)
    assert p.returncode == 2 and words in p.stderr, p.stderr


def test_max_skew_0_checks_no_stamp_and_says_so(tmp_path):
    """For hosts whose clocks cannot be kept in step: no window, a warning."""
    ctl = Controller(tmp_path / "home", extra=("--max-skew-ms", "0"))
    try:
        assert ctl.info["max_skew_ms"] == 0
        assert "warning: --max-skew-ms 0: stamps are not checked" in ctl.log.read_text()
        s = ctl.socket()
        mid = s.send(_core.MSG_QUERY, [b"{}"], stamp_ns=time.time_ns() - 86400 * 10**9)
        hdr, payload, _, _ = s.recv(timeout=5)
        assert hdr["type"] == _core.MSG_QUERY_REPLY and hdr["reply_to"] == mid
        assert json.loads(bytes(payload[0]))["refused"]["from_clients"]["stale"] == 0
    finally:
        ctl.stop()
