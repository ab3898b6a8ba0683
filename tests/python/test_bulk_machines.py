"""The bulk path across machines (docs/machines.md, "The bulk path"): large
task data for other nodes goes from the client straight to their agents,
along a chain, on the bulk channel; the controller gets only the TASK.

Three hosts as in test_machines.py (its helpers are reused), each with an
agent and 2 engines, the agents on each event-loop backend in turn.
"""

import json
import time

import pytest

import hosts
import test_machines as tm
from test_machines import client, copy_connection, join, registry, shoal, tcp_streams

topo = hosts.fixture(3)

MiB = 1 << 20
WAIT_MS = 3000  # how long an agent waits for a task's data (SHOAL_AGENT_BULK_WAIT_MS)


@pytest.fixture(scope="module", params=["io_uring", "epoll"])
def cluster(request, topo):
    tm._backend.clear()
    tm._backend["SHOAL_AGENT_BULK_WAIT_MS"] = str(WAIT_MS)
    if request.param == "epoll":
        tm._backend["SHOAL_NO_URING"] = "1"
    h0 = topo[0]
    shoal(h0, "start", "-n", str(tm.ENGINES), "--ip", h0.addr, "--daemonize", "--heartbeat-ms",
          str(tm.HEARTBEAT_MS), "--node-timeout-ms", str(tm.NODE_TIMEOUT_MS))
    try:
        for h in topo[1], topo[2]:
            copy_connection(topo, h)
            join(h)
        client(topo[0], "rc.wait_for_engines(6, timeout=30)")
        yield topo
    finally:
        shoal(h0, "stop", check=False, timeout=60)
        tm._backend.clear()


def test_the_registry_lists_each_nodes_bulk_server(cluster):
    nodes = [n for n in registry(cluster[0])["nodes"] if n["alive"]]
    by_host = {n["host"]: n for n in nodes}
    for h in cluster:
        ep = by_host[h.hostname].get("bulk")
        assert ep and ep.startswith(f"tcp://{h.addr}:"), by_host[h.hostname]


def test_a_push_crosses_each_link_once(cluster):
    """64 MiB pushed from host 0 to all 6 engines arrives everywhere; it
    leaves host 0 once (the controller's host used to send it once per
    other host) and enters each other host once."""
    topo = cluster
    size = 64 * MiB
    before = [h.link_bytes() for h in topo]
    out = client(topo[0], """
        a = np.arange(size // 8, dtype=np.int64)
        sent = rc._routes.controller.bulk.sent
        rc[:].push({"a": a}, block=True)
        out = {"bulk": rc._routes.controller.bulk.sent - sent,
               "ok": rc[:].apply_sync(lambda n: bool(a.shape == (n,) and (a == np.arange(n)).all()), size // 8),
               "where": rc[:].apply_sync(socket.gethostname)}
    """, size=size, timeout=180)
    after = [h.link_bytes() for h in topo]
    rx = [a[0] - b[0] for a, b in zip(after, before)]
    tx = [a[1] - b[1] for a, b in zip(after, before)]
    assert out["bulk"] == 1, out
    assert out["ok"] == [True] * 6 and sorted(set(out["where"])) == sorted(h.hostname for h in topo)
    assert tx[0] < 1.2 * size, f"host 0 sent {tx[0] / size:.2f}x the array"
    for i in (1, 2):
        assert 0.95 * size < rx[i] < 1.1 * size, f"host {i} received {rx[i] / size:.2f}x the array"
    assert tx[1] + tx[2] < 1.2 * size  # one of them passed it on


def test_a_task_whose_data_never_comes_fails_with_a_clear_error(cluster):
    """A TASK with the bulk flag whose transfer never came: its targets
    fail within the agent's wait, saying why, and the cluster goes on."""
    topo = cluster
    reg = registry(topo[0])
    node1 = next(n["id"] for n in reg["nodes"] if n["alive"] and n["host"] == topo[1].hostname)
    targets = [e["id"] for e in reg["engines"] if e["alive"] and e["node"] == node1]
    out = client(topo[0], """
        import struct
        from shoal import _core
        info = json.load(open(path))
        s = _core.Socket("dealer", bytes.fromhex(info["key"]), connect=info["client"], curve=info.get("curve"))
        t0 = time.monotonic()
        s.send(_core.MSG_TASK, [struct.pack(f"<{len(targets)}I", *targets), struct.pack("<QQ", 0x5eed, 0)],
               flags=_core.TASK_BULK)
        errs = {}
        while len(errs) < len(targets) and time.monotonic() - t0 < 30:
            try:
                hdr, payload, buffers, _ = s.recv(timeout=1)
            except TimeoutError:
                continue
            if hdr["type"] == _core.MSG_RESULT:
                errs[hdr["sender"]] = bytes(payload[0]).decode()
        s.close()
        out = {"errs": errs, "took": time.monotonic() - t0,
               "after": rc[targets].apply_sync(lambda: 5)}
    """, path=tm.PROFILE_FILE, targets=targets)
    assert sorted(map(int, out["errs"])) == sorted(targets), out
    for text in out["errs"].values():
        assert "did not arrive over the bulk channel" in text and f"within {WAIT_MS} ms" in text, text
    assert out["took"] < WAIT_MS / 1000 + 5
    assert out["after"] == [5] * len(targets)


def test_an_unreachable_bulk_server_falls_back_to_the_controller(cluster):
    """A node whose bulk server cannot be reached: the push goes through
    the controller instead (warned), and arrives all the same."""
    topo = cluster
    out = client(topo[0], """
        import warnings
        reg = rc._control(ipp._core.MSG_REGISTER)
        node1 = next(n["id"] for n in reg["nodes"] if n["alive"] and n["host"] == host1)
        rc._bulk_at[node1] = f"tcp://{addr1}:1"  # nothing listens there
        a = np.arange(2 * (1 << 20), dtype=np.float64)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            rc[:].push({"b": a}, block=True)
        out = {"warned": [str(x.message) for x in w],
               "ok": rc[:].apply_sync(lambda: bool((b == np.arange(2 * (1 << 20))).all()))}
    """, host1=topo[1].hostname, addr1=topo[1].addr)
    assert out["ok"] == [True] * 6
    assert any("bulk channel" in m for m in out["warned"]), out


def test_a_bulk_push_is_encrypted_on_the_wire(cluster):
    """Curve is on (the cluster listens beyond loopback): the bulk channel
    encrypts, and a capture on the bridge during a bulk push of a marker
    array finds the bytes but not the marker."""
    topo = cluster
    info = json.loads(topo[0].path(tm.PROFILE_FILE).read_text())
    assert info.get("curve")
    reps = 60000  # 1.5 MiB: past the bulk threshold
    sent = topo[1].link_bytes()[1]
    with topo.capture() as cap:
        out = client(topo[1], """
            a = np.frombuffer((marker * reps).encode(), dtype=np.uint8)
            sent = rc._routes.controller.bulk.sent
            rc[:].push({"m": a}, block=True)
            out = {"bulk": rc._routes.controller.bulk.sent - sent,
                   "cipher": [c.cipher for c in rc._routes.controller.bulk.conns.values()],
                   "seen": rc[:].apply_sync(lambda k: bytes(m).count(k), marker.encode())}
        """, marker=tm.MARKER, reps=reps)
    assert out["bulk"] == 1 and out["seen"] == [reps] * 6
    assert out["cipher"] and "none" not in out["cipher"], out
    # It crossed host 1's link (the counters say so: a capture on a loaded
    # machine misses frames, and cuts 64 KiB GSO frames at its snap length).
    assert topo[1].link_bytes()[1] - sent > reps * len(tm.MARKER)
    assert sum(map(len, tcp_streams(cap.data).values())) > reps * len(tm.MARKER) / 4
    assert tm.MARKER.encode() not in cap.data


# ---- results on the bulk channel --------------------------------------------------------------


def _engines_of(topo, host):
    reg = registry(topo[0])
    node = next(n["id"] for n in reg["nodes"] if n["alive"] and n["host"] == host.hostname)
    return node, [e["id"] for e in reg["engines"] if e["alive"] and e["node"] == node]


def test_a_pull_comes_on_the_bulk_channel_not_through_the_controller(cluster):
    """A 64 MiB pull by a client on host 1 from an engine on host 2 equals
    the original, comes as one result transfer into the client's arena, and
    host 0 (the controller's) carries almost none of it."""
    topo = cluster
    size = 64 * MiB
    _, targets = _engines_of(topo, topo[2])
    client(topo[1], """
        rc[e].execute(f"a = np.arange({size // 8}, dtype=np.int64)", block=True)
    """, e=targets[0], size=size)
    before = [h.link_bytes() for h in topo]
    out = client(topo[1], """
        bulk = rc._routes.controller.bulk
        a = rc[e].pull("a", block=True)
        out = {"ok": bool((a == np.arange(size // 8)).all()), "received": bulk.received,
               "in_arena": type(a.base).__name__ if a.base is not None else None}
    """, e=targets[0], size=size, timeout=180)
    after = [h.link_bytes() for h in topo]
    rx = [a[0] - b[0] for a, b in zip(after, before)]
    tx = [a[1] - b[1] for a, b in zip(after, before)]
    assert out["ok"] and out["received"] == 1, out
    assert rx[0] + tx[0] < 0.05 * size, f"host 0 carried {(rx[0] + tx[0]) / size:.2f}x the array"
    assert tx[2] < 1.1 * size and rx[1] < 1.1 * size, (rx, tx)


def test_a_gather_comes_on_the_bulk_channel(cluster):
    """64 MiB scattered over all 6 engines and gathered back by a client on
    host 0 equals the original; the parts of other hosts' engines came as
    result transfers."""
    out = client(cluster[0], """
        a = np.arange(size // 8, dtype=np.float64)
        rc[:].scatter("g", a, block=True)
        bulk = rc._routes.controller.bulk
        got = rc[:].gather("g", block=True)
        out = {"ok": bool(np.array_equal(got, a)), "received": bulk.received}
    """, size=64 * MiB, timeout=180)
    assert out["ok"] and out["received"] >= 4, out


def test_a_large_return_value_and_a_small_one_arrive_right(cluster):
    topo = cluster
    _, targets = _engines_of(topo, topo[2])
    out = client(topo[0], """
        bulk = rc._routes.controller.bulk
        big = rc[e].apply_sync(lambda: np.ones(8 << 20))
        n = bulk.received
        small = rc[e].apply_sync(lambda: np.ones(1000))
        out = {"big": [big.shape[0], float(big.sum())], "small": float(small.sum()), "received": n,
               "after": bulk.received}
    """, e=targets[0])
    assert out["big"] == [8 << 20, float(8 << 20)] and out["small"] == 1000.0
    assert out["received"] == 1 and out["after"] == 1, out


def test_a_client_without_an_arena_takes_results_into_its_own_memory(cluster):
    topo = cluster
    _, targets = _engines_of(topo, topo[2])
    out = client(topo[0], """
        type(rc).arena = property(lambda self: None)  # as a client on a host without an agent
        bulk = rc._routes.controller.bulk
        a = rc[e].apply_sync(lambda: np.arange(4 << 20))
        out = {"ok": bool((a == np.arange(4 << 20)).all()), "received": bulk.received}
    """, e=targets[0])
    assert out["ok"] and out["received"] == 1, out


# ---- direct tasks: straight to another node's agent -----------------------------------------


def test_a_task_for_another_node_goes_straight_to_its_agent(cluster):
    """A task for an engine of another host goes on the client's bulk
    connection to that host's agent, not through the controller (which has
    no task pending while it runs); its value, its output printed while it
    runs, and its error come back the same way."""
    topo = cluster
    _, targets = _engines_of(topo, topo[2])
    out = client(topo[0], """
        import sys
        from shoal import _core
        route = rc._routes.controller
        def talk(n):
            print("started", n, flush=True)
            time.sleep(1.5)
            return socket.gethostname(), n * 2
        ar = rc[e].apply_async(talk, 21)
        time.sleep(0.7)
        direct = len(route.direct)
        pending = rc._control(_core.MSG_QUERY, {"what": "status"})["tasks_pending"]
        printed = ar.stdout
        value = ar.get(timeout=30)
        try:
            rc[e].apply_sync(lambda: 1 / 0)
            err = None
        except ipp.RemoteError as x:
            err = type(x).__name__ + ": " + str(x)
        out = {"direct": direct, "pending": pending, "printed": printed, "value": list(value),
               "err": err, "left": len(route.direct), "parts": route.parts}
    """, e=targets[0])
    assert out["direct"] == 1 and out["pending"] == 0, out
    assert "started 21" in out["printed"], out
    assert out["value"] == [topo[2].hostname, 42]
    assert out["err"] and "ZeroDivisionError" in out["err"], out
    assert out["left"] == 0 and out["parts"] == 0, out


def test_direct_tasks_keep_their_order_and_can_be_aborted(cluster):
    """Tasks to one engine of another host run in the order sent; one
    aborted before its engine starts it ends in TaskAborted, and the next
    runs."""
    topo = cluster
    _, targets = _engines_of(topo, topo[2])
    out = client(topo[0], """
        e = rc[eid]
        e.execute("seen = []", block=True)
        first = e.apply_async(lambda: (time.sleep(1.0), seen.append(1)))
        second = e.apply_async(lambda: seen.append(2))
        third = e.apply_async(lambda: seen.append(3))
        rc.abort(second)
        first.get(timeout=30)
        try:
            second.get(timeout=30)
            aborted = None
        except ipp.TaskAborted as x:
            aborted = str(x)
        third.get(timeout=30)
        out = {"aborted": aborted, "seen": e.pull("seen", block=True)}
    """, eid=targets[0])
    assert out["aborted"] is not None, out
    assert out["seen"] == [1, 3], out


def test_a_direct_task_whose_engine_dies_fails_naming_it(cluster):
    """The engine of a direct task dies under it: the agent says so on the
    client's connection (EngineError naming the engine), and the other
    engines go on. (The agents here do not restart engines: one fewer after.)"""
    topo = cluster
    _, targets = _engines_of(topo, topo[1])
    out = client(topo[0], """
        try:
            rc[eid].apply_sync(lambda: os._exit(3))
            err = None
        except ipp.EngineError as x:
            err = str(x)
        deadline = time.monotonic() + 30
        after = None
        while after is None and time.monotonic() < deadline:
            try:
                after = rc[[i for i in rc.ids if i != eid][0]].apply_sync(lambda: 7)
            except ipp.EngineError:
                time.sleep(0.2)
        out = {"err": err, "after": after}
    """, eid=targets[0])
    assert out["err"] and f"engine {targets[0]}" in out["err"], out
    assert out["after"] == 7


def test_a_direct_task_longer_than_the_node_timeout_and_one_after_a_long_quiet_run(cluster):
    """A direct task that runs longer than the node timeout ends well (the
    agent's keepalives tell the client it is there), and so does one sent
    after the connection was quiet for longer than that (its silence while
    nothing was due counts for nothing)."""
    topo = cluster
    _, targets = _engines_of(topo, topo[1])
    out = client(topo[0], """
        e = rc[eid]
        long = e.apply_sync(lambda s: time.sleep(s) or "slept", wait)
        time.sleep(wait)
        out = [long, e.apply_sync(lambda: 2)]
    """, eid=targets[0], wait=tm.NODE_TIMEOUT_MS / 1000 + 2)
    assert out == ["slept", 2]


def test_a_host_dying_in_the_middle_of_a_push_fails_only_its_engines(cluster):
    """The last host of a push's chain loses its agent while the data
    crosses (links at 200 Mbit/s): the host before it stops passing it on
    and keeps its own, the push ends, the engines of the other hosts have
    the data and run, the dead host's fail with an EngineError each; then
    the host joins again."""
    import os
    import signal

    topo = cluster
    node, dead = _engines_of(topo, topo[2])
    reg = registry(topo[0])
    pid = next(n["pid"] for n in reg["nodes"] if n["id"] == node)
    alive = [e["id"] for e in reg["engines"] if e["alive"] and e["node"] != node]
    for h in topo:
        h.shape("200mbit")
    try:
        th, result = tm.client_submitted(topo[0], """
            a = np.ones(8 * (1 << 20))  # 64 MiB: 2.7 s a link at 200 Mbit/s
            open("/tmp/submitted", "w").close()
            t0 = time.monotonic()
            ar = rc[alive + dead].push({"mid": a}, block=False)
            try:
                ar.get(timeout=120)
                err = None
            except (ipp.EngineError, ipp.CompositeError) as x:
                err = str(x)
            out = {"err": err, "took": time.monotonic() - t0, "n": len(a),
                   "sums": rc[alive].apply_sync(lambda: float(mid.sum()))}
        """, alive=alive, dead=dead)
        time.sleep(1.0)
        os.kill(pid, signal.SIGKILL)
        th.join(180)
    finally:
        for h in topo:
            h.unshape()
    # Each of its engines fails: lost with its node, or not running (once
    # the controller knows, the part sent through it after the agent's
    # connection failed says so).
    assert result["err"], result
    for e in dead:
        assert f"[{e}:push]: EngineError: engine {e} " in result["err"], result
    assert len(alive) >= 3 and result["sums"] == [float(result["n"])] * len(alive), result
    join(topo[2])
    client(topo[0], "rc.wait_for_engines(n, timeout=30)", n=len(alive) + tm.ENGINES)


def test_killing_the_agent_while_a_result_is_in_flight_fails_it_clearly(cluster):
    """The agent of host 2 dies while its engine's 256 MiB result waits to
    be read from the bulk channel: the task fails with an EngineError that
    names the bulk connection, well within the node timeout; no hang.
    (Last: host 2 is gone after it.)"""
    import os
    import signal
    import threading

    topo = cluster
    node, targets = _engines_of(topo, topo[2])
    pid = next(n["pid"] for n in registry(topo[0])["nodes"] if n["id"] == node)
    code = """
        ar = rc[e].apply_async(lambda: np.ones(32 << 20))
        time.sleep(2)  # not reading: the agent's sender blocks on a full socket
        open("/tmp/submitted", "w").close()
        time.sleep(1)
        t0 = time.monotonic()
        try:
            ar.get(timeout=60)
            err = None
        except (ipp.EngineError, ipp.CompositeError) as x:
            err = str(x)
        out = {"err": err, "waited": time.monotonic() - t0}
    """
    result = {}
    topo[0].path("/tmp/submitted").unlink(missing_ok=True)
    th = threading.Thread(target=lambda: result.update(client(topo[0], code, e=targets[0])))
    th.start()
    deadline = time.monotonic() + 30
    while not topo[0].path("/tmp/submitted").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    th.join(120)
    assert result.get("err") and "bulk" in result["err"], result
    assert result["waited"] < tm.NODE_TIMEOUT_MS / 1000 + 5, result


def test_a_task_after_a_bulk_push_waits_for_its_data(cluster):
    """Tasks to an engine run in the order sent, across the two paths: a
    push whose data still crosses the links (sent without waiting for it),
    then at once a small task that uses it, on every engine. The push's
    TASK waits at each agent for its data; the task after it waits behind
    it, and does not run first (it did: the later hosts of the chain ran
    it before the data came, and raised NameError)."""
    topo = cluster
    for h in topo:
        h.shape("200mbit")
    try:
        out = client(topo[0], """
            a = np.ones(3 * (1 << 20), dtype=np.float64)  # 24 MiB: 1 s a link at 200 Mbit/s
            outs = []
            for k in range(2):
                pushed = rc[:].push({"ordered": a * k}, block=False)
                sums = rc[:].apply_async(lambda: float(ordered.sum()))
                outs.append(sums.get(timeout=120))
                pushed.get(timeout=10)
            rc[:].execute("del ordered", block=True)
            out = {"sums": outs, "bulk": rc._routes.controller.bulk.sent,
                   "hosts": len(set(rc[:].apply_sync(socket.gethostname)))}
        """, timeout=240)
    finally:
        for h in topo:
            h.unshape()
    n, k = 3 * (1 << 20), len(out["sums"][0])  # engines: those the module's earlier tests left running
    assert k >= 3 and out["hosts"] >= 2, out
    assert out["sums"] == [[0.0] * k, [float(n)] * k], out
