"""Direct tasks on one machine (docs/machines.md, "Direct tasks"): two
nodes (two agents) on this machine; a client attaches to the arena of one,
and sends its tasks for the other's engines to that agent's bulk server on
loopback, the replies coming back there, as a client does to the nodes of
other machines across the network (test_machines.py and
test_bulk_machines.py, which need root for their hosts). Here in both
builds, on both event-loop backends: values, output, errors, large
results, aborts, and what the agent does with bad direct tasks."""

import json
import time

import numpy as np
import pytest

import shoal
from shoal import _core

from procs import Agent, Controller

MiB = 1 << 20


@pytest.fixture(scope="module", params=["io_uring", "epoll"])
def node(tmp_path_factory, request):
    root = tmp_path_factory.mktemp(f"direct-{request.param}")
    env = {"SHOAL_NO_URING": "1"} if request.param == "epoll" else {}
    ctl = Controller(root / "home", heartbeat_ms=200)
    first = Agent(ctl, root / "run", engines=1, env=env)
    agent = Agent(ctl, root / "run2", engines=2, env=env)
    third = Agent(ctl, root / "run3", engines=1, env=env)
    ctl.third = third  # for the chain's test
    yield ctl, agent
    third.stop()
    agent.stop()
    first.stop()
    ctl.stop()


def away(rc, agent):
    """A view of agent's engines, which the client reaches directly (it is attached to the other node)."""
    assert rc._local_node is not None and rc._local_node != agent.node["id"], "attached to the first node"
    return rc[[e["id"] for e in agent.engines]]


def status(ctl):
    return ctl.ask(ctl.socket(), _core.MSG_QUERY, {"what": "status"})[1]


def test_tasks_go_to_the_agent_not_through_the_controller(node):
    ctl, agent = node
    with shoal.Client(url_file=str(ctl.conn)) as rc:
        dv = away(rc, agent)
        route = rc._routes.controller
        ar = dv.apply_async(lambda: __import__("time").sleep(0.6) or __import__("os").getpid())
        time.sleep(0.3)
        assert len(route.direct) == 1, "one direct task, to the one node"
        assert status(ctl)["tasks_pending"] == 0, "the controller never saw it"
        mine = rc.cluster_status()
        assert mine["direct_tasks_pending"] == 2 and mine["tasks_pending"] == 2, mine
        assert [mine["queue"][e] for e in dv.targets] == [1, 1], mine
        assert sorted(ar.get(10)) == sorted(e["pid"] for e in agent.engines)
        assert not route.direct and route.parts == 0
        # Output printed while it runs, and the reply's.
        ex = dv.execute("print('hello', flush=True); import time; time.sleep(0.3); print('bye')")
        ex.get(10)
        assert ex.stdout == ["hello\nbye\n"] * 2
        # An error, a large result (on the connection too), a push and a pull.
        with pytest.raises(shoal.CompositeError, match="ZeroDivisionError"):
            dv.apply_sync(lambda: 1 / 0)
        big = dv.apply_sync(lambda: __import__("numpy").arange(2 * MiB // 8))
        assert all((b == np.arange(2 * MiB // 8)).all() for b in big)
        dv.push({"a": np.arange(3 * MiB // 8)}, block=True)
        assert [int(x.sum()) for x in dv.pull("a", block=True)] == [int(np.arange(3 * MiB // 8).sum())] * 2
        assert not route.direct and status(ctl)["tasks_pending"] == 0


def test_direct_tasks_keep_their_order_and_one_can_be_aborted(node):
    ctl, agent = node
    with shoal.Client(url_file=str(ctl.conn)) as rc:
        e = rc[away(rc, agent).targets[0]]
        e.execute("seen = []", block=True)
        first = e.execute("import time; time.sleep(0.5); seen.append(1)")
        second = e.execute("seen.append(2)")
        third = e.execute("seen.append(3)")
        rc.abort(second)
        first.get(10)
        with pytest.raises(shoal.TaskAborted):
            second.get(10)
        third.get(10)
        assert e.pull("seen", block=True) == [1, 3]


def test_the_agent_answers_bad_direct_tasks_and_goes_on(node):
    """Direct tasks a client's code would never send, on a connection of
    our own: malformed metadata is refused (the connection goes on), an
    engine that does not run gets an EngineError reply, an abort of an
    unknown task is ignored; then a client's tasks run as ever."""
    ctl, agent = node
    ep, e0 = agent.node["bulk"], agent.engines[0]["id"]
    conn = _core.Bulk(ep, ctl.key, False, 5000, 10000)
    try:
        conn.send_record(128, (0xFEED).to_bytes(8, "little"))  # our token
        for meta in ({"task": "x", "targets": [0]}, {"task": 1, "targets": []}, {"task": 1},
                     {"task": 2, "targets": [0], "xid": "not hex at all!"}, {"task": -3, "targets": [0]},
                     {"task": 4, "targets": [e0], "chain": ["tcp://127.0.0.1:1"]}):
            conn.send(1, json.dumps(meta).encode(), [b"junk"], 1)
        conn.send_record(129, (12345).to_bytes(8, "little"))  # abort of no task
        conn.send(2, json.dumps({"task": 7, "targets": [4000]}).encode(), [b"{}", b""], 2)
        replies = {}
        deadline = time.monotonic() + 10
        while len(replies) < 2 and time.monotonic() < deadline:
            try:
                _, block, meta = conn.recv_transfer(lambda xid, n: bytearray(n), 1000)
            except TimeoutError:
                continue
            meta = json.loads(meta)
            replies[meta["task"]] = (meta, json.loads(bytes(_core.unpack_frames(memoryview(block))[0][0])))
        assert sorted(replies) == [4, 7], replies
        # Task 4 is well formed (its "chain" is not a direct task's, and is
        # ignored) but its block is junk: its engine says so, and goes on.
        meta, reply = replies[4]
        assert meta == {"task": 4, "engine": e0, "type": _core.MSG_RESULT} and reply["status"] == "error", replies
        meta, err = replies[7]
        assert meta == {"task": 7, "engine": 4000, "type": _core.MSG_RESULT}, meta
        assert err["status"] == "error" and "engine 4000" in err["evalue"] and "not running" in err["evalue"], err
    finally:
        conn.close()
    assert agent.proc.poll() is None
    with shoal.Client(url_file=str(ctl.conn)) as rc:
        assert away(rc, agent).apply_sync(lambda: 5) == [5, 5]


def test_a_large_push_to_two_other_nodes_goes_along_a_chain(node):
    """A push of 4 MiB to the engines of the two nodes the client is not
    attached to: one transfer, to the first of their agents, which passes
    it on to the other as it comes (docs/machines.md, "The bulk path"), and
    a direct task to each naming it; every engine has the array, and a
    large value comes back from each."""
    ctl, agent = node
    n = 4 * MiB // 8
    with shoal.Client(url_file=str(ctl.conn)) as rc:
        engines = [e["id"] for e in agent.engines + ctl.third.engines]
        dv = rc[engines]
        bulk = rc._routes.controller.bulk
        sent = bulk.sent
        dv.push({"chained": np.arange(n)}, block=True)
        assert bulk.sent - sent == 1, "one transfer, along the chain"
        dv.execute("total = int(chained.sum()); doubled = chained * 2", block=True)
        assert dv.pull("total", block=True) == [int(np.arange(n).sum())] * 3
        assert all((b == 2 * np.arange(n)).all() for b in dv.pull("doubled", block=True))
