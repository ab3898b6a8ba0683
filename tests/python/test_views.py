"""DirectView's ipyparallel surface: scatter, gather, map, run, clear, flags,
sync_imports - against a real cluster of three engines, through lanes and
through the controller."""

import os
import sys

import numpy as np
import pytest

import shoal

from procs import Agent, Controller, evaluate

MiB = 1 << 20


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("views")
    ctl = Controller(root / "home", heartbeat_ms=500)
    agent = Agent(ctl, root / "run", engines=3, arena_size=2 << 30)
    yield ctl, agent
    agent.stop()
    ctl.stop()


@pytest.fixture(params=["lanes", "controller"])
def rc(request, cluster):
    c = shoal.Client(url_file=str(cluster[0].conn), timeout=10, lanes=request.param == "lanes")
    yield c
    c.close()


@pytest.fixture
def dv(rc):
    view = rc[:]
    view.clear(block=True)
    return view


@pytest.mark.parametrize("seq", [list(range(1000)), tuple("abcdefghij"), range(7), list(range(2))])
@pytest.mark.parametrize("dist", ["b", "r"])
def test_scatter_then_gather_gives_the_sequence_back(dv, seq, dist):
    assert dv.scatter("part", seq, dist=dist, block=True) is None
    parts = dv.pull("part", block=True)
    n = len(seq)
    if dist == "b":  # contiguous blocks, the first ones one longer when n does not divide
        sizes = [n // 3 + (1 if i < n % 3 else 0) for i in range(3)]
        assert [len(p) for p in parts] == sizes
        assert list(parts[0]) == list(seq[:sizes[0]])
    else:
        assert [list(p) for p in parts] == [list(seq[i::3]) for i in range(3)]
    assert list(dv.gather("part", dist=dist, block=True)) == list(seq)


def test_scatter_is_asynchronous_and_reads_like_ipyparallel(dv):
    dv.execute("import time; time.sleep(0.5)")  # the engines are busy: the scatter waits behind it
    ar = dv.scatter("user_id_chunk", list(range(1000)))
    assert repr(ar) == "<AsyncResult: scatter>"
    assert ar.get(10) == [None, None, None]
    assert repr(ar) == "<AsyncResult: finished>"
    assert evaluate(dv, "len(user_id_chunk), max(user_id_chunk)") == [(334, 333), (333, 666), (333, 999)]
    ar = dv.gather("user_id_chunk")
    assert isinstance(ar, shoal.AsyncMapResult) and ar.get(10) == list(range(1000))


def test_scatter_flatten_pushes_single_items(dv):
    dv.scatter("x", [10, 20, 30], flatten=True, block=True)
    assert dv["x"] == [10, 20, 30]
    dv.scatter("x", [10, 20, 30], block=True)
    assert dv["x"] == [[10], [20], [30]]


def test_an_array_is_scattered_as_views_of_one_arena_block(dv, rc):
    a = np.arange(8 * MiB // 8 * 3, dtype=np.float64).reshape(-1, 8)  # 24 MiB, rows split between engines
    import gc
    gc.collect()  # what earlier tests' clients still held goes back first
    used = rc.arena.stats()["used_bytes"] if rc.arena else None
    dv.scatter("a", a, block=True)
    got = evaluate(dv, "import shoal.serialize as s\n"
                       "o = s._owner_block(a)\n"
                       "(a.shape, float(a.sum()), a.flags.writeable, o and o.handle)")
    rows = [len(p) for p in np.array_split(np.arange(len(a)), 3)]
    assert [g[0] for g in got] == [(r, 8) for r in rows]
    assert sum(g[1] for g in got) == float(a.sum())
    assert not any(g[2] for g in got), "the parts are read-only views"
    if rc.arena is not None:
        assert len({g[3] for g in got}) == 1 and got[0][3] is not None, "all parts live in one arena block"
        grew = rc.arena.stats()["used_bytes"] - used
        assert 0.9 * a.nbytes < grew < 1.5 * a.nbytes, f"one copy of the array in the arena, not one per engine ({grew})"
    back = dv.gather("a", block=True)
    assert back.shape == a.shape and np.array_equal(back, a)
    b = np.arange(100).reshape(10, 10)[:, ::3]  # not contiguous
    dv.scatter("b", b, block=True)
    assert np.array_equal(dv.gather("b", block=True), b)


def test_a_large_gather_lands_in_the_arena_a_small_one_does_not(dv, rc):
    from shoal import serialize
    a = np.arange(3 * MiB // 8 * 2, dtype=np.float64).reshape(-1, 2)  # 6 MiB, 2 columns
    dv.scatter("a", a, block=True)
    back = dv.gather("a", block=True)
    assert back.shape == a.shape and back.dtype == a.dtype and np.array_equal(back, a)
    in_arena = serialize._owner_block(back) is not None
    assert in_arena == (rc.arena is not None), "joined into an arena block when the client has an arena"
    back[0, 0] = -1.0  # the caller's own array: writable, and no engine sees the write
    assert evaluate(dv.client[0], "float(a[0, 0])") == 0.0
    # Parts of different dtypes join as np.concatenate would.
    kinds = ["int32", "float32", "int32"]
    dv.scatter("kind", kinds, flatten=True, block=True)
    dv.execute("import numpy as np\npart = np.arange(40000, dtype=kind)", block=True)
    want = np.concatenate([np.arange(40000, dtype=k) for k in kinds])
    got = dv.gather("part", block=True)
    assert got.dtype == want.dtype == np.float64 and np.array_equal(got, want)
    dv.scatter("s", np.arange(30), block=True)
    s = dv.gather("s", block=True)
    assert np.array_equal(s, np.arange(30)) and serialize._owner_block(s) is None, "small: plain memory"
    # A parallel function's array results join the same way.
    @dv.parallel(block=True)
    def doubled(x):
        return x * 2
    assert np.array_equal(doubled(np.arange(MiB)), np.arange(MiB) * 2)


def test_map_splits_between_engines_and_keeps_order(dv):
    assert dv.map_sync(lambda x: x * x, range(10)) == [x * x for x in range(10)]
    assert dv.map_sync(lambda x, y: x + y, [1, 2, 3, 4], [10, 20, 30, 40]) == [11, 22, 33, 44]
    assert dv.map_sync(os.getpid, []) == []
    pids = dv.map_sync(lambda _: os.getpid(), range(6))
    assert len(set(pids)) == 3 and pids == sorted(pids, key=pids.index), "one block per engine, in order"
    assert dv.map_sync(abs, [-1]) == [1], "fewer items than engines"
    ar = dv.map_async(str, range(5))
    assert isinstance(ar, shoal.AsyncMapResult) and list(ar) == ["0", "1", "2", "3", "4"]
    with pytest.raises(shoal.RemoteError, match="ZeroDivisionError"):
        dv.map_sync(lambda x: 1 / x, [1, 0, 2])


def test_update_get_run_and_clear(dv, tmp_path):
    dv.update({"u": 5})
    assert dv.get("u") == [5, 5, 5]
    script = tmp_path / "script.py"
    script.write_text("import os\nran_here = os.getpid()\n")
    dv.run(str(script), block=True)
    assert len(set(dv.get("ran_here"))) == 3
    dv.clear(block=True)
    with pytest.raises(shoal.RemoteError, match="NameError"):
        dv.get("u")
    assert dv.apply_sync(lambda: 1) == [1, 1, 1], "the engines work after a clear"


def test_flags(dv, rc):
    assert dv.block is False and dv.targets == rc.ids
    with dv.temp_flags(block=True, targets=[0, 1]):
        assert dv.apply(lambda: 7) == [7, 7]
    assert dv.block is False and dv.targets == rc.ids, "temp_flags restores the flags"
    dv.set_flags(block=True)
    assert dv.apply(lambda: 8) == [8, 8, 8]
    with pytest.raises(KeyError, match="invalid flag"):
        dv.set_flags(colour="blue")
    one = rc[1]
    assert one.targets == 1 and repr(one) == "<DirectView 1>" and one.apply_sync(lambda: 9) == 9


def test_sync_imports(dv, capsys):
    sys.modules.pop("colorsys", None)
    with dv.sync_imports():
        import colorsys  # noqa: F401
        from fractions import Fraction  # noqa: F401
    out = capsys.readouterr().out
    assert "importing colorsys on engine(s)" in out and "importing Fraction from fractions on engine(s)" in out
    assert "colorsys" in sys.modules, "imported here too"
    assert dv.apply_sync(lambda: colorsys.rgb_to_hsv(1, 0, 0)[2]) == [1.0] * 3
    assert dv.apply_sync(lambda: str(Fraction(1, 3))) == ["1/3"] * 3
    with dv.sync_imports(local=False, quiet=True):
        import wave  # noqa: F401
    assert capsys.readouterr().out == ""
    assert evaluate(dv, "wave.__name__") == ["wave"] * 3


# ---- LoadBalancedView ---------------------------------------------------------------

def test_load_balanced_apply_and_map(rc):
    lview = rc.load_balanced_view()
    assert repr(lview) == "<LoadBalancedView None>"
    assert lview.apply_sync(lambda x: x + 1, 41) == 42
    ar = lview.apply_async(os.getpid)
    assert rc.history[-1] == ar.msg_id, "a load-balanced task is in the history once"
    assert ar.get(10) in rc[:].apply_sync(os.getpid)
    assert lview.map_sync(lambda x: x * x, range(20)) == [x * x for x in range(20)]
    assert lview.map_sync(lambda x, y: x - y, [5, 6, 7], [1, 1, 1], chunksize=2) == [4, 5, 6]
    assert sorted(lview.imap(abs, [-3, -1, -2], ordered=False)) == [1, 2, 3]
    assert list(lview.imap(str, range(5))) == ["0", "1", "2", "3", "4"]
    assert lview.map_sync(abs, []) == []
    with pytest.raises(ValueError, match="chunksize"):
        lview.map(abs, [1], chunksize=0)
    with pytest.raises(shoal.RemoteError, match="ZeroDivisionError"):
        lview.map_sync(lambda x: 1 / x, [1, 2, 0, 4])
    only = rc.load_balanced_view(targets=[2])
    assert set(only.map_sync(lambda _: os.getpid(), range(6))) == {rc[2].apply_sync(os.getpid)}


def test_a_long_task_does_not_hold_up_the_others(rc):
    import time
    lview = rc.load_balanced_view()
    # One long task, then many short ones: the engine with the long one takes
    # only the one task waiting behind it; the others take everything else.
    pids = lview.map_sync(lambda d: (time.sleep(d), os.getpid())[1], [1.5] + [0.01] * 40)
    counts = {p: pids.count(p) for p in set(pids)}
    assert counts[pids[0]] <= lview.IN_FLIGHT, counts
    assert len(counts) == 3


def test_idle_engines_take_tasks_from_the_pool(rc):
    """Individual submissions, not a map: the long task's engine takes no
    other task, because engines take from the pool only when idle."""
    import time
    lview = rc.load_balanced_view()
    long = lview.apply_async(lambda: (time.sleep(1.5), os.getpid())[1])
    short = [lview.apply_async(lambda: (time.sleep(0.02), os.getpid())[1]) for _ in range(30)]
    if rc._routes.lane.lanes.get(0) is not None:
        assert rc._routes.pool.pools, "the view's engines are all on this node: it has a pool"
        status = rc.cluster_status()
        assert status["unassigned"] + sum(status["queue"]) >= 1
        done = [ar.get(10) for ar in short]
        assert not long.ready(), "every short task finished while the long one ran"
        assert long.get(10) not in done, "the long task's engine took none of them"
        assert len(set(done)) == 2
        assert long.metadata["engine_id"] == rc.ids[[rc[e].apply_sync(os.getpid) for e in rc.ids].index(long.get())]
        # Two tasks put while the two idle engines sleep wake one each (a
        # woken engine is not counted twice), though the first could take both.
        long = lview.apply_async(time.sleep, 1.5)
        time.sleep(0.3)
        pair = [lview.apply_async(lambda: (time.sleep(0.5), os.getpid())[1]) for _ in range(2)]
        assert len({ar.get(10) for ar in pair}) == 2, "each ran on an engine of its own"
        long.get(10)
    else:
        assert not rc._routes.pool.pools, "through the controller there is no pool"
        assert len({ar.get(10) for ar in short} | {long.get(10)}) == 3


def _assert_grown_from_evidence(ar):
    """Each task of map ar has at most GROWTH times the items of the
    largest task that had come back when it was sent (one item while none
    had)."""
    sizes = [high - low for low, high in ar._chunks]
    ran = sorted(ar._ran)  # the chunks whose task ran; ar.metadata has one per such chunk, in this order
    meta = dict(zip(ran, ar.metadata))
    for k in ran:
        known = [sizes[j] for j in ran if j < k and meta[j]["received"] <= meta[k]["submitted"]]
        limit = shoal.LoadBalancedView.GROWTH * max(known) if known else 1
        assert sizes[k] <= limit, f"task {k} of {sizes[k]} items, sent when the largest back had {known}: {sizes}"


def test_a_map_of_tiny_items_puts_many_in_a_task(rc):
    lview = rc.load_balanced_view()
    n = 20_000
    ar = lview.map_async(lambda x: x + 1, range(n))
    assert ar.get(60) == list(range(1, n + 1))
    assert ar.progress == n, "progress counts items"
    sizes = [high - low for low, high in ar._chunks]
    assert sum(sizes) == n and sizes[:len(rc.ids)] == [1] * len(rc.ids), \
        "one item a task, one task an engine, while nothing is known of their cost"
    assert len(ar.metadata) == len(sizes) < n // 20, f"tiny items share tasks: {len(sizes)} tasks"
    assert max(sizes) <= -(-n // (2 * len(rc.ids))), "never more than half an engine's share"
    _assert_grown_from_evidence(ar)
    # Engines measure an item's cost: a map that has known it from its own
    # tasks does not take several rounds to reach large ones.
    assert len(sizes) <= 80, sizes
    # Given, the size holds: one item per task as in ipyparallel.
    one = lview.map_async(lambda x: x, range(50), chunksize=1)
    assert one.get(30) == list(range(50)) and len(one.metadata) == 50


def test_a_map_of_long_items_keeps_one_per_task(rc):
    import time
    lview = rc.load_balanced_view()
    ar = lview.map_async(lambda x: (time.sleep(0.05), x)[1], range(24))
    assert ar.get(30) == list(range(24))
    assert len(ar.metadata) == 24, "an item of 50 ms is a task of its own"


def test_a_map_of_cheap_items_then_dear_ones_grows_its_tasks_from_evidence(rc):
    import time
    lview = rc.load_balanced_view()
    # The first items cost nothing, the rest 5 ms each. Judged from the
    # first tasks alone, the items would go a hundred or more a task; but a
    # task is never more than GROWTH (8) times the largest that had
    # finished when it was handed out: 1, 8, 64, and by then the dear items
    # are measured. No engine gets hundreds of them in one task.
    n = 1000
    t0 = time.monotonic()
    ar = lview.map_async(lambda x: (x >= 40 and time.sleep(0.005), x)[1], range(n))
    assert ar.get(120) == list(range(n))
    sizes = [high - low for low, high in ar._chunks]
    _assert_grown_from_evidence(ar)
    assert max(sizes) <= 8 * 64, sizes
    # The dear items once measured: the last tasks are of one item each.
    assert sizes[-len(rc.ids):] == [1] * len(rc.ids), sizes
    assert time.monotonic() - t0 < 0.005 * (n - 40) / len(rc.ids) * 1.6 + 2


def test_a_blocking_map_hands_out_from_the_waiting_thread_and_goes_on_if_cut_short(rc):
    import sys
    import time
    lview = rc.load_balanced_view()
    assert lview.map_sync(lambda x: -x, range(5000)) == [-x for x in range(5000)]
    assert rc._routes.driver is None, "nobody but the caller handed out a blocking map's tasks"

    class Cut(Exception):
        pass

    cut_at = time.monotonic() + 0.3

    def cut(frame, event, _):
        # As a Ctrl-C would, 0.3 s in; but only in the wait, between two
        # receivings (not in the middle of taking a reply, which is not what
        # this test is about): when the wait asks whether the map is done.
        if event == "call" and frame.f_code.co_name == "_done" and frame.f_back is not None \
                and frame.f_back.f_code is shoal.AsyncResult.wait.__code__ and time.monotonic() > cut_at:
            raise Cut()

    sys.settrace(cut)  # a trace function's exception is raised where it was called, and ends the tracing
    try:
        with pytest.raises(Cut):
            lview.map_sync(lambda x: (time.sleep(0.01), x)[1], range(200), chunksize=1)
    finally:
        sys.settrace(None)
    driven = [w for w in rc._routes.driven if isinstance(w, shoal.view.LoadBalancedMapResult)]
    assert len(driven) == 1, "the map cut short is still being handed out"
    ar = driven[0]
    assert ar.get(60) == list(range(200)), "and every item of it ran"


def test_a_blocking_map_cut_short_while_taking_a_result_still_ends(rc):
    import sys
    import time
    lview = rc.load_balanced_view()

    class Cut(BaseException):  # as KeyboardInterrupt: not taken for a callback's failure
        pass

    cut_at = time.monotonic() + 0.3

    def cut(frame, event, _):
        # A Ctrl-C at the worst point: as the client starts on a chunk's
        # result, whose callback is then lost (it was taken off the list).
        if event == "call" and frame.f_code.co_name == "_chunk_done" and time.monotonic() > cut_at:
            raise Cut()

    sys.settrace(cut)
    try:
        with pytest.raises(Cut):
            lview.map_sync(lambda x: (time.sleep(0.01), x)[1], range(200), chunksize=1)
    finally:
        sys.settrace(None)
    ar = [w for w in rc._routes.driven if isinstance(w, shoal.view.LoadBalancedMapResult)][0]
    assert ar.get(60) == list(range(200)), "the client's thread took the result whose callback was lost"
    assert not ar._attempts and ar._pooled == 0 and not any(ar._inflight.values())


def test_a_callback_cut_short_leaves_the_others_to_run(rc):
    import time
    ar = rc[rc.ids[0]].apply_async(time.sleep, 0.2)
    seen = []

    def cut(_):
        raise KeyboardInterrupt

    ar.add_done_callback(lambda _: seen.append(1))
    ar.add_done_callback(cut)
    ar.add_done_callback(lambda _: seen.append(3))
    with pytest.raises(KeyboardInterrupt):
        ar.get(10)
    assert seen == [1]
    assert rc[rc.ids[0]].apply_sync(abs, -2) == 2  # receiving again runs what is left
    assert seen == [1, 3]


def test_abort_from_another_thread_reaches_a_blocking_map(rc):
    import threading
    import time
    lview = rc.load_balanced_view()
    before = len(rc.history)
    # 600 items of 10 ms: 2 s of work for 3 engines; the abort comes after 0.3 s.
    timer = threading.Timer(0.3, rc.abort)
    timer.start()
    try:
        with pytest.raises(shoal.TaskAborted):
            lview.map_sync(lambda x: (time.sleep(0.01), x)[1], range(600), chunksize=1)
    finally:
        timer.cancel()
    sent = len(rc.history) - before
    assert sent < 400, f"the abort stopped the map handing out its items: {sent} of 600 were sent"
    assert lview.map_sync(abs, [-1, -2]) == [1, 2]


def test_a_map_takes_any_iterables_and_stops_at_the_shortest(rc):
    lview = rc.load_balanced_view()
    gen = (x for x in range(3000))
    assert lview.map_sync(lambda x, y: x * y, gen, [2] * 2500) == [2 * x for x in range(2500)]
    a = np.arange(5000, dtype=np.int64)
    assert lview.map_sync(lambda x: int(x) % 7, a) == [x % 7 for x in range(5000)]
    got = lview.map_async(lambda x: -x, range(4000), ordered=False).get(30)
    assert sorted(got) == sorted(-x for x in range(4000))
    for bad in (0, -1, 1.5, "2", True):
        with pytest.raises(ValueError, match="chunksize must be an int"):
            lview.map(abs, [1], chunksize=bad)


def test_aborting_tasks_that_wait_in_the_pool(rc):
    import time
    lview = rc.load_balanced_view()
    busy = [lview.apply_async(time.sleep, 0.5) for _ in rc.ids]
    waiting = [lview.apply_async(abs, -i) for i in range(5)]
    if rc._routes.lane.lanes.get(0) is None:
        pytest.skip("through the controller: see test_abort")
    t0 = time.monotonic()
    rc.abort(waiting[:3])
    for ar in waiting[:3]:
        with pytest.raises(shoal.TaskAborted, match="aborted before it started"):
            ar.get(10)
    assert time.monotonic() - t0 < 0.4, "taken back from the pool: no engine had to get to them"
    assert [ar.get(10) for ar in waiting[3:]] == [3, 4]
    assert [b.get(10) for b in busy] == [None] * len(busy)
    assert lview.apply_sync(abs, -9) == 9


def test_a_load_balanced_map_goes_on_while_nobody_waits(rc):
    import time
    lview = rc.load_balanced_view()
    ar = lview.map_async(lambda x: (time.sleep(0.01), x)[1], range(60))
    deadline = time.monotonic() + 30
    while ar._has_work() and time.monotonic() < deadline:
        time.sleep(0.05)  # this thread never touches the client meanwhile
    assert not ar._has_work(), "every task was handed out without anybody waiting"
    assert ar.get(30) == list(range(60))


def test_decorators_parallel_remote_require(rc):
    lview = rc.load_balanced_view()

    @lview.parallel()
    @shoal.require("colorsys", "fractions")
    def hue(rgb):
        return colorsys.rgb_to_hsv(*rgb)[0] + float(fractions.Fraction(0))  # noqa: F821 - required

    assert hue.__name__ == "hue"
    assert hue.map([(1, 0, 0), (0, 1, 0)]).get(10) == [0.0, 1 / 3]

    @lview.parallel(chunksize=2)
    def total(xs):  # f(seq) calls f with parts of seq, as ipyparallel does
        return sum(xs)

    assert total(range(5)).get(10) == [1, 5, 4]

    @lview.parallel(chunksize=3)
    def doubled(xs):
        return [2 * x for x in xs]

    assert doubled(range(7)).get(10) == [0, 2, 4, 6, 8, 10, 12], "list parts are joined"

    import math

    @lview.remote(block=True)
    @shoal.require(math.hypot)  # an object: made available under its name
    def uses_hypot(x):
        return hypot(x, 4)  # noqa: F821 - made available by require

    assert uses_hypot(3) == 5.0
    with pytest.raises(TypeError):
        shoal.require(5)


def test_closing_a_client_with_a_map_in_flight_is_clean(cluster):
    import threading
    import time
    c = shoal.Client(url_file=str(cluster[0].conn), timeout=10)
    ar = c.load_balanced_view().map_async(lambda x: (time.sleep(0.02), x)[1], range(200))
    time.sleep(0.1)
    errors = []
    threading.excepthook, old = (lambda args: errors.append(args)), threading.excepthook
    try:
        c.close()
        deadline = time.monotonic() + 5
        while c._routes.driver is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert c._routes.driver is None, "the load balancer's thread ended"
        assert errors == [], errors
    finally:
        threading.excepthook = old
    assert ar._done(), "the map ends: what ran is there, the rest failed"
    with pytest.raises((shoal.EngineError, shoal.TaskAborted), match="client was closed|aborted"):
        ar.get(1)
    again = shoal.Client(url_file=str(cluster[0].conn), timeout=10)
    try:
        assert again[:].apply_sync(lambda: 1) == [1, 1, 1], "the engines finished or dropped its tasks and go on"
    finally:
        again.close()


def test_async_result_metadata_and_timings(rc, capsys):
    import datetime
    import time
    dv = rc[:]
    ar = dv.execute("import time; time.sleep(0.2); print('out'); 6 * 7", silent=False)
    assert ar.progress == 0 and ar.elapsed >= 0
    with pytest.raises(shoal.TimeoutError, match="not ready"):
        ar.serial_time
    assert [r.execute_result["data"]["text/plain"] for r in ar.get(10)] == ["42"] * 3 and ar.progress == 3
    md = ar.metadata
    assert [m["engine_id"] for m in md] == [0, 1, 2] and all(m["status"] == "ok" for m in md)
    for m in md:
        assert m["submitted"] <= m["started"] <= m["completed"] <= m["received"]
        assert isinstance(m["started"], datetime.datetime)
        assert m["execute_result"]["data"] == {"text/plain": "42"} and m["stdout"] == "out\n"
        assert m["execution_count"] >= 1
    assert ar.serial_time >= 3 * 0.2 * 0.9, "the engines' times added up"
    assert ar.wall_time >= 0.2 and ar.elapsed == ar.wall_time
    assert {e: r.execution_count for e, r in ar.get_dict().items()} == {m["engine_id"]: m["execution_count"] for m in md}
    ar.display_outputs()
    assert capsys.readouterr().out.splitlines() == ["[stdout:0] ", "out", "[stdout:1] ", "out", "[stdout:2] ",
                                                    "out"] + [f"Out[{e}:{md[e]['execution_count']}]: 42"
                                                              for e in range(3)]
    one = rc[1].apply_async(time.sleep, 0.3)
    assert one.wait_interactive(interval=0.05) is True
    bar = capsys.readouterr().out
    assert "1/1 tasks finished" in bar and bar.endswith("\n") and "\r" in bar
    failed = rc[0].apply_async(lambda: 1 / 0)
    with pytest.raises(shoal.RemoteError):
        failed.get(10)
    assert failed.metadata["status"] == "error" and failed.metadata["ename"] == "ZeroDivisionError"


# ---- Client helpers -----------------------------------------------------------------

def test_history_results_and_purge(rc):
    ar = rc[:].apply_async(lambda: 5)
    one = rc[0].apply_async(lambda: 1 / 0)
    assert rc.wait([ar, one.msg_id], timeout=10)
    assert rc.history[-2:] == [ar.msg_id, one.msg_id]
    # As ipyparallel 9: the AsyncResults hold results and metadata, not the client.
    assert ar.msg_id not in rc.results and ar.msg_id not in rc.metadata
    assert [m["status"] for m in ar.metadata] == ["ok"] * 3
    slow = [rc[e].apply_async(__import__("time").sleep, 0.2) for e in rc.ids]
    assert rc.wait(timeout=10) and all(s.ready() for s in slow), "wait() waits for every outstanding task"
    rc.results[ar.msg_id] = "kept by hand"
    rc.purge_results(jobs=[ar])
    assert ar.msg_id not in rc.results and ar.msg_id not in rc._ended
    rc.purge_results(targets=[0])
    assert one.msg_id not in rc._ended, "a purged task no longer counts for dependencies"
    rc.purge_results("all")
    assert rc.results == {} and rc.metadata == {} and rc._ended == {}


def test_wait_for_engines(rc):
    rc.wait_for_engines(3, timeout=5)
    with pytest.raises(shoal.TimeoutError, match="4 engines"):
        rc.wait_for_engines(4, timeout=0.2)


def test_executor(rc):
    import concurrent.futures
    with rc.executor() as ex:
        assert isinstance(ex, concurrent.futures.Executor)
        futures = [ex.submit(pow, 2, i) for i in range(10)]
        assert [f.result(timeout=10) for f in futures] == [2 ** i for i in range(10)]
        assert list(ex.map(abs, [-1, -2, -3], timeout=10)) == [1, 2, 3]
        bad = ex.submit(lambda: 1 / 0)
        with pytest.raises(shoal.RemoteError, match="ZeroDivisionError"):
            bad.result(timeout=10)
        done, _ = concurrent.futures.wait([ex.submit(os.getpid) for _ in range(6)], timeout=10)
        assert len(done) == 6
    with pytest.raises(RuntimeError):
        ex.submit(abs, 1)


def test_cluster_starts_connects_and_leaves_nothing(tmp_path, monkeypatch):
    from pathlib import Path
    monkeypatch.setenv("SHOAL_DIR", str(tmp_path / "home"))
    cluster = shoal.Cluster(n=2)
    with cluster as c:
        assert c.ids == [0, 1] and "running" in repr(cluster)
        pids = c[:].apply_sync(os.getpid)
        agent = c.cluster_status()["nodes"][0]["pid"]
    assert "stopped" in repr(cluster)
    for pid in pids + [agent]:
        assert not os.path.exists(f"/proc/{pid}") or \
            open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z", f"process {pid} outlived its cluster"
    assert not (tmp_path / "home" / f"profile_{cluster.profile}").exists(), "its own profile is removed"
    with pytest.raises(TypeError):
        shoal.Cluster(n=2, engines="mpi")
    bad = shoal.Cluster(n=1, profile="x/y")
    with pytest.raises(RuntimeError, match="did not start"):
        bad.start_cluster_sync()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue  # gone meanwhile
        assert cluster.profile.encode() not in args, f"a process of the cluster remains: {args}"


def test_a_cluster_start_cut_short_by_ctrl_c_leaves_nothing(tmp_path):
    """Ctrl-C while Cluster.start_cluster_sync waits for the engines: the
    controller and the agent that `shoal start` had already started (in a
    session of their own) are stopped too, and the profile removed."""
    import signal
    import subprocess
    import time
    from pathlib import Path
    home = tmp_path / "home"
    code = ("import shoal\nc = shoal.Cluster(n=4)\nprint(c.profile, flush=True)\n"
            "c.start_cluster_sync()\nprint('started', flush=True)\nc.stop_cluster_sync()\n")
    env = dict(os.environ, SHOAL_DIR=str(home))
    p = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        profile = p.stdout.readline().strip()
        conn = home / f"profile_{profile}" / "connection.json"
        deadline = time.monotonic() + 30
        while not conn.exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        assert conn.exists(), "the controller never started"
        p.send_signal(signal.SIGINT)  # the controller is up; the engines are still starting
        out, err = p.communicate(timeout=90)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    if "started" in out:
        pytest.skip("the cluster was up before the Ctrl-C arrived")
    assert "KeyboardInterrupt" in err, err

    def left():
        found = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                if profile.encode() in cmdline.read_bytes().split(b"\0"):
                    found.append(cmdline.parent.name)
            except OSError:
                continue
        return found
    deadline = time.monotonic() + 10
    while left() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left(), "a process of the cluster outlived the interrupted start"
    assert not (home / f"profile_{profile}").exists()


def test_direct_view_decorators_interactive_reference_and_return_exceptions(rc):
    dv = rc[:]

    @dv.parallel(block=True)
    def doubled(xs):
        return [2 * x for x in xs]

    assert doubled(range(7)) == [0, 2, 4, 6, 8, 10, 12]
    assert dv.parallel(block=True)(abs).map([-1, -2, -3, -4]) == [1, 2, 3, 4]

    @dv.remote(block=True)
    def where():
        return os.getpid()

    assert len(set(where())) == 3

    dv.push({"scale": 10}, block=True)

    @shoal.interactive
    def scaled(x):
        return x * scale  # noqa: F821 - the engine's own variable

    assert dv.apply_sync(scaled, 2) == [20, 20, 20]
    dv.execute("data = list(range(5))", block=True)
    assert dv.apply_sync(len, shoal.Reference("data")) == [5, 5, 5]
    assert rc[0].apply_sync(lambda n=None: n, n=shoal.Reference("scale")) == 10
    with pytest.raises(shoal.RemoteError, match="NameError: name 'missing' is not defined"):
        rc[0].apply_sync(len, shoal.Reference("missing"))
    with pytest.raises(SyntaxError):
        shoal.Reference("not a name")

    got = dv.map_sync(lambda x: 1 / x, [1, 0, 2, 4, 5, 8], return_exceptions=True)
    # Engine 0's block [1, 0] fails as a whole: its error stands for both items.
    assert isinstance(got[0], shoal.RemoteError) and got[1] is got[0] and got[0].ename == "ZeroDivisionError"
    assert got[2:] == [0.5, 0.25, 0.2, 0.125]
    lview = rc.load_balanced_view()
    got = lview.map_sync(lambda x: 1 / x, [1, 0, 4], return_exceptions=True)
    assert got[0] == 1.0 and isinstance(got[1], shoal.RemoteError) and got[2] == 0.25


# ---- dependencies, retries, timeouts, abort ------------------------------------------

def test_after_and_follow(rc):
    import time
    lview = rc.load_balanced_view()
    first = lview.apply_async(time.sleep, 0.3)
    with lview.temp_flags(after=[first]):
        then = lview.apply_async(time.time)
    assert not then.ready(), "held by the client until what it follows has finished"
    assert then.get(10) >= first.metadata["completed"].timestamp()
    here = lview.apply_async(os.getpid)
    with lview.temp_flags(follow=shoal.Dependency([here])):
        there = [lview.apply_async(os.getpid) for _ in range(5)]
    assert {t.get(10) for t in there} == {here.get(10)}, "follow runs where the task it follows ran"
    failed = lview.apply_async(lambda: 1 / 0)
    with lview.temp_flags(after=[failed]):
        never = lview.apply_async(abs, 1)
    with pytest.raises(shoal.ImpossibleDependency):
        never.get(10)
    with lview.temp_flags(after=shoal.Dependency([failed], success=False, failure=True)):
        assert lview.apply_sync(abs, -2) == 2, "a dependency on failure is met by a failure"
    with lview.temp_flags(after=shoal.Dependency([failed, first], all=False)):
        assert lview.apply_sync(abs, -3) == 3, "any one of them will do"


def test_timeout_of_a_dependency(rc):
    import time
    lview = rc.load_balanced_view()
    slow = lview.apply_async(time.sleep, 3)
    with lview.temp_flags(after=[slow], timeout=0.2):
        late = lview.apply_async(abs, 1)
    with pytest.raises(shoal.TaskTimeout, match="within 0.2 s"):
        late.get(10)
    rc.abort([slow])


def test_depend_and_retries(rc, tmp_path):
    lview = rc.load_balanced_view()
    pid = rc[1].apply_sync(os.getpid)

    def on(p):
        import os
        return os.getpid() == p

    @shoal.depend(on, pid)
    def mine():
        import os
        return os.getpid()

    assert [lview.apply_sync(mine) for _ in range(4)] == [pid] * 4, "only where the condition holds"

    @shoal.depend(lambda: False)
    def nowhere():
        return 1

    with pytest.raises(shoal.ImpossibleDependency, match="no engine can run it"):
        lview.apply_sync(nowhere)

    log = tmp_path / "attempts"
    log.write_text("")

    def flaky(path):
        import os
        with open(path) as f:
            first = f.read() == ""
        with open(path, "a") as f:
            f.write(f"{os.getpid()}\n")
        if first:
            raise ValueError("not yet")
        return os.getpid()

    with lview.temp_flags(retries=2):
        pid = lview.apply_sync(flaky, str(log))
    attempts = [int(x) for x in log.read_text().split()]
    assert len(attempts) == 2 and attempts[1] == pid and attempts[0] != pid, "retried once, on another engine"
    log.write_text("")
    with pytest.raises(shoal.RemoteError, match="not yet"):
        lview.apply_sync(flaky, str(log))


def test_abort(rc):
    import time
    busy = [rc[e].apply_async(time.sleep, 0.5) for e in rc.ids]
    queued = rc[0].apply_async(abs, -5)
    both = rc[[1, 2]].apply_async(abs, -6)
    queued.abort()
    rc.abort(both)
    # On a lane the client marks the task itself; through the controller the
    # agent marks it, on the controller's word.
    with pytest.raises(shoal.TaskAborted, match="aborted before it started"):
        queued.get(10)
    with pytest.raises(shoal.CompositeError) as e:
        both.get(10)
    assert [type(x) for x in e.value.elist] == [shoal.TaskAborted] * 2
    lview = rc.load_balanced_view()
    m = lview.map_async(lambda x: (__import__("time").sleep(0.05), x)[1], range(100))
    rc.abort()
    with pytest.raises(shoal.TaskAborted):
        m.get(20)
    for b in busy:
        assert b.get(10) is None, "running tasks finish"
    with pytest.raises(RuntimeError, match="already done"):
        busy[0].abort()
    assert rc[:].apply_sync(abs, -1) == [1, 1, 1]


def test_send_signal(rc):
    import signal
    import time
    sleeping = rc[0].apply_async(time.sleep, 30)
    other = rc[1].apply_async(lambda: (__import__("time").sleep(0.5), "done")[1])
    time.sleep(0.3)
    t0 = time.monotonic()
    rc.send_signal("SIGINT", targets=0)
    with pytest.raises(shoal.RemoteError) as e:
        sleeping.get(10)
    assert e.value.ename == "KeyboardInterrupt"
    assert time.monotonic() - t0 < 5, "the sleep was interrupted"
    assert other.get(10) == "done", "the engine not signalled went on"
    rc.send_signal(signal.SIGINT)  # idle engines: nothing happens to them
    assert rc[:].apply_sync(lambda: 2) == [2, 2, 2]
    with pytest.raises(ValueError, match="no signal named"):
        rc.send_signal("SIGNOPE")
    with pytest.raises(ValueError, match="not a signal"):
        rc.send_signal(True)
    with pytest.raises(shoal.EngineError, match=r"engines \[99\] are not running"):
        rc.send_signal("INT", targets=[99])


def test_a_result_that_cannot_be_rebuilt_here_fails_alone(rc, tmp_path):
    dv = rc[:]
    (tmp_path / "onlythere.py").write_text("class OnlyThere:\n    pass\n")
    # A module only the engines can import: its objects travel by reference.
    dv.execute(f"import sys\nsys.path.insert(0, {str(tmp_path)!r})\nimport onlythere\nthing = onlythere.OnlyThere()",
               block=True)
    base = rc.arena.stats()["used_blocks"] if rc.arena else None
    bad = dv.pull("thing")
    good = dv.apply_async(abs, -3)
    with pytest.raises(shoal.CompositeError) as e:
        bad.get(10)
    assert all(x.ename == "ModuleNotFoundError" and "cannot be rebuilt here" in x.evalue for x in e.value.elist)
    assert good.get(10) == [3, 3, 3], "the results that came with it are not lost"
    if base is not None:
        dv.apply_sync(abs, 1)
        assert rc.arena.stats()["used_blocks"] <= base + 3, "its reply blocks were released all the same"


def test_closing_a_client_fails_what_it_waited_for(cluster):
    import time
    c = shoal.Client(url_file=str(cluster[0].conn), timeout=10)
    ar = c[0].apply_async(time.sleep, 1)
    c.close()
    with pytest.raises(shoal.EngineError, match="client was closed"):
        ar.get(5)
    with pytest.raises(RuntimeError, match="closed"):
        c[0].apply_async(abs, 1)


def test_the_agent_answers_requests_it_does_not_know(rc):
    if rc.local is None:
        pytest.skip("no local agent")
    assert "error" in rc.local.ask({"what": "is this"})
    assert "error" in rc.local.ask({"lane": 0, "padding": "x" * 600}), "too long a line: an answer all the same"
    assert rc[:].apply_sync(abs, -1) == [1, 1, 1]
