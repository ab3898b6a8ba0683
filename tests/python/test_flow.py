"""Flow control through the controller: no result is ever dropped silently
(docs/controller.md, "Flow control")."""

import json
import struct
import time

import pytest

import shoal
from shoal import _core, serialize

from procs import Agent, Controller


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A cluster whose controller keeps at most 64 KiB of results for a
    client that does not read, and lets one client have 3000 task parts in
    flight."""
    root = tmp_path_factory.mktemp("flow")
    ctl = Controller(root / "home", heartbeat_ms=500,
                     extra=("--client-backlog", str(64 << 10), "--max-client-parts", "3000"))
    agent = Agent(ctl, root / "run", engines=2)
    yield ctl, agent
    agent.stop()
    ctl.stop()


def task(engine, value):
    """A TASK body as a client sends it: abs(value) on engine."""
    s = serialize.dumps((abs, (value,), {}))
    return [struct.pack("<I", engine), json.dumps({"kind": "apply", "buffers": []}).encode(), s.payload]


def take(sock, n, timeout=60):
    """n messages from sock, as (header, meta or error body)."""
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < n:
        hdr, payload, _, _ = sock.recv(timeout=max(deadline - time.monotonic(), 0.01))
        got.append((hdr, json.loads(bytes(payload[0]))))
    return got


def status(ctl):
    s = ctl.socket()
    try:
        return ctl.ask(s, _core.MSG_QUERY)[1]
    finally:
        s.close()


def test_a_client_that_submits_before_it_reads_gets_every_result(tmp_path):
    """50,000 tasks through the controller before the first get(): every
    one answered (before, about 13,500 were, and the rest were lost)."""
    ctl = Controller(tmp_path / "home", heartbeat_ms=500)
    agent = Agent(ctl, tmp_path / "run", engines=2)
    try:
        with shoal.Client(url_file=str(ctl.conn), lanes=False) as rc:
            v = rc.load_balanced_view()
            ars = [rc[i % 2].apply_async(abs, -i) for i in range(50_000)]
            ars.append(v.apply_async(abs, -1))
            assert [ar.get(60) for ar in ars[:-1]] == list(range(50_000))
            assert ars[-1].get(10) == 1
        st = status(ctl)
        assert st["tasks_pending"] == 0 and st["clients"]["results_dropped"] == 0
    finally:
        agent.stop()
        ctl.stop()


def test_results_wait_at_the_controller_for_a_client_that_reads_late(small):
    """A raw client (no window) sends 2500 tasks and reads nothing for a
    while: the controller queues what its ZeroMQ queue cannot hold, and
    every result arrives once the client reads."""
    ctl, agent = small
    s = ctl.socket()
    e = agent.engines[0]["id"]
    mids = {s.send(_core.MSG_TASK, task(e, -i)): i for i in range(2500)}
    time.sleep(3)  # every task done meanwhile; most results wait
    got = take(s, 2500)
    values = {}
    for hdr, meta in got:
        assert hdr["type"] == _core.MSG_RESULT and meta["status"] == "ok", meta
        values[hdr["reply_to"]] = hdr
    assert set(values) == set(mids)
    s.close()


def test_a_client_that_does_not_read_is_told_what_was_dropped(small):
    """Past --client-backlog (64 KiB here) the controller drops results of a
    client that does not read, and tells it: each such task fails with an
    EngineError that says why. Every task ends; none is lost silently."""
    ctl, agent = small
    s = ctl.socket()
    e = agent.engines[1]["id"]
    # 32 KiB results: the ZeroMQ queues and the kernel's socket buffers
    # (about 2000 messages and 10 MB) fill, then the 64 KiB of backlog.
    code = serialize.dumps((bytes, (32 << 10,), {})).payload
    body = [struct.pack("<I", e), json.dumps({"kind": "apply", "buffers": []}).encode(), code]
    mids = [s.send(_core.MSG_TASK, body) for _ in range(2900)]
    deadline = time.monotonic() + 60
    while status(ctl)["tasks_pending"] and time.monotonic() < deadline:
        time.sleep(0.2)
    st = status(ctl)
    assert st["tasks_pending"] == 0 and st["clients"]["results_dropped"] > 0, st
    assert st["clients"]["queued_bytes"] <= 64 << 10
    got = take(s, len(mids))
    assert sorted(h["reply_to"] for h, _ in got) == sorted(mids), "a task got no answer, or two"
    dropped = [m for _, m in got if m["status"] != "ok"]
    assert len(dropped) == st["clients"]["results_dropped"]
    assert all(m["ename"] == "EngineError" and "did not read its results" in m["evalue"]
               and "--client-backlog" in m["evalue"] for m in dropped), dropped[:3]
    deadline = time.monotonic() + 10
    while status(ctl)["clients"]["with_tasks_or_queued"] and time.monotonic() < deadline:
        time.sleep(0.1)  # the controller keeps nothing of it once all is said
    assert status(ctl)["clients"] == dict(st["clients"], queued_messages=0, queued_bytes=0, dropped_to_tell=0,
                                          with_tasks_or_queued=0)
    s.close()


def test_a_client_past_its_limit_of_tasks_in_flight_is_refused(small):
    ctl, agent = small
    s = ctl.socket()
    e = agent.engines[0]["id"]
    sleep = serialize.dumps((time.sleep, (0.5,), {})).payload
    first = s.send(_core.MSG_TASK, [struct.pack("<I", e), json.dumps({"kind": "apply", "buffers": []}).encode(),
                                    sleep])
    mids = [s.send(_core.MSG_TASK, task(e, -1)) for _ in range(3000)]
    got = take(s, 3001)
    errors = [(h, m) for h, m in got if h["type"] == _core.MSG_ERROR]
    assert [h["reply_to"] for h, _ in errors] == [mids[-1]], "the 3001st part is the one refused"
    assert "3000 task parts in flight" in errors[0][1]["error"] and "take results" in errors[0][1]["error"]
    assert sum(h["type"] == _core.MSG_RESULT for h, _ in got) == 3000
    assert first in {h["reply_to"] for h, _ in got}
    s.close()


def test_the_controller_refuses_a_payload_past_its_limit_before_hashing_it(tmp_path):
    ctl = Controller(tmp_path / "home", extra=("--max-payload", str(1 << 20)))
    try:
        s = ctl.socket()
        mid = s.send(_core.MSG_QUERY, [b"{}", bytes(1 << 20)])
        hdr, payload, _, _ = s.recv(timeout=5)
        assert hdr["type"] == _core.MSG_ERROR and "too large" in json.loads(bytes(payload[0]))["error"]
        # Buffers (unhashed) are held to --max-frame, not to the payload's limit.
        kind, _ = ctl.ask(s, _core.MSG_QUERY, {})
        assert kind == _core.MSG_QUERY_REPLY
        mid = s.send(_core.MSG_QUERY, [b"{}"], [bytes(2 << 20)])
        hdr, _, _, _ = s.recv(timeout=5)
        assert hdr["type"] == _core.MSG_QUERY_REPLY and hdr["reply_to"] == mid
        info = json.loads(ctl.conn.read_text())
        assert info["max_payload"] == 1 << 20 and info["max_frame"] == 1 << 30
        assert status(ctl)["refused"]["from_clients"]["oversized"] == 1
    finally:
        ctl.stop()
