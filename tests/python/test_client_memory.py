"""What a client keeps per task: bounded history and endings
(Client.history_limit), compact records of finished tasks
(docs/ipyparallel.md, "Memory"). Bytes are counted with tracemalloc, which
counts the same objects whatever the timing; the bounds are a few times
what the records cost now, and several times under what they cost before
(~400 bytes a dropped task, ~3 KiB a kept one, ~3.5 KiB an item of a
chunksize=1 map)."""

import gc
import tracemalloc

import pytest

import shoal


# Builtins: a function of this module would not be found on the engines.
neg = abs


@pytest.fixture
def traced():
    """tracemalloc on for the test: a function giving the bytes traced now."""
    tracemalloc.start()

    def now():
        gc.collect()
        return tracemalloc.get_traced_memory()[0]
    yield now
    tracemalloc.stop()


def test_history_is_bounded(rc):
    """history (the client's and a view's) and the endings kept for
    dependencies hold the latest history_limit tasks, not every one."""
    rc.history_limit = 100
    lv, dv = rc.load_balanced_view(), rc[rc.ids[0]]
    last = None
    for i in range(300):
        last = lv.apply_async(neg, -i)
        dv.apply_async(neg, -i)
    assert rc.wait(timeout=60)
    limit = 100 + 100 // 8  # older ones leave in batches of an eighth
    assert 100 <= len(rc.history) <= limit and rc.history[-2] == last.msg_id
    assert 100 <= len(lv.history) <= limit and lv.history[-1] == last.msg_id
    assert 100 <= len(dv.history) <= limit
    assert rc.get_result(-2) is last
    assert len(rc._ended) <= limit  # in the order they finished: the latest to finish
    latest = lv.apply_async(neg, -1)
    assert latest.get(10) == 1 and latest.msg_id in rc._ended
    with pytest.raises(ValueError, match="history_limit"):
        rc.history_limit = -1
    rc.history_limit = None  # as ipyparallel: every one
    for i in range(200):
        lv.apply_async(neg, -i)
    assert rc.wait(timeout=60) and len(rc.history) >= 300


def test_a_dependency_on_a_task_past_the_limit(rc):
    """A task whose ending the client no longer remembers is still known
    by its AsyncResult while that is held; once let go too, depending on
    it is an InvalidDependency (never taken as met)."""
    rc.history_limit = 10
    lv = rc.load_balanced_view()
    held = lv.apply_async(neg, -1)
    dropped = lv.apply_async(neg, -2).msg_id
    assert held.get(10) == 1
    for i in range(40):
        lv.apply_async(neg, -i)
    assert rc.wait(timeout=30)
    assert held.msg_id not in rc._ended and dropped not in rc._ended
    with lv.temp_flags(after=[held.msg_id]):
        assert lv.apply_async(neg, -3).get(10) == 3
    with lv.temp_flags(follow=[held]):
        ar = lv.apply_async(neg, -4)
        assert ar.get(10) == 4 and ar.engine_id == held.engine_id
    gc.collect()
    with lv.temp_flags(after=[dropped]):
        with pytest.raises(shoal.error.InvalidDependency, match="history_limit"):
            lv.apply_async(neg, -5).get(10)


def test_dropped_tasks_cost_nothing_past_the_limit(rc, traced):
    """Past history_limit, tasks whose AsyncResults the user dropped leave
    nothing behind (before: ~400 bytes each, for ever)."""
    rc.history_limit = 500
    lv, dvs = rc.load_balanced_view(), [rc[e] for e in rc.ids]
    n = 2000
    # The records fill up to the limit, and the client's tables of tasks
    # in flight grow to what this loop needs (dicts keep their size).
    for i in range(2 * n):
        lv.apply_async(neg, -i)
        dvs[i % len(dvs)].apply_async(neg, -i)
    assert rc.wait(timeout=60)
    before = traced()
    for i in range(n):
        lv.apply_async(neg, -i)
        dvs[i % len(dvs)].apply_async(neg, -i)
    assert rc.wait(timeout=60)
    grew = traced() - before
    assert grew / (2 * n) < 100, f"{grew / (2 * n):.0f} bytes a dropped task"


def test_a_kept_task_is_compact(rc, traced):
    """An AsyncResult the user keeps holds its result and metadata, as in
    ipyparallel, in well under 2 KiB (before: 3-5 KiB)."""
    lv, dv = rc.load_balanced_view(), rc[rc.ids[0]]
    [lv.apply_async(neg, -i) for i in range(200)]
    assert rc.wait(timeout=30)
    before = traced()
    n = 1000
    kept = [lv.apply_async(neg, -i) for i in range(n)] + [dv.apply_async(neg, -i) for i in range(n)]
    assert rc.wait(timeout=60)
    assert sum(ar.get() for ar in kept) == 2 * sum(range(n))
    grew = traced() - before
    assert grew / len(kept) < 2000, f"{grew / len(kept):.0f} bytes a kept task"
    md = kept[0].metadata
    assert md["status"] == "ok" and md["completed"] >= md["started"] and md["received"] and md["stdout"] == ""


def test_a_map_of_one_item_a_task_is_compact(rc, traced):
    """LoadBalancedView.map(chunksize=1), held: under 1.5 KiB an item (its
    value and its task's metadata; before: 2.6-3.7 KiB), and nothing past
    the limit once let go."""
    lv = rc.load_balanced_view()
    lv.map_sync(abs, range(200), chunksize=1)
    before = traced()
    n = 2000
    ar = lv.map(abs, range(n), chunksize=1, block=False)
    assert sum(ar.get(60)) == sum(range(n))
    grew = traced() - before
    assert grew / n < 1500, f"{grew / n:.0f} bytes an item"
    md = ar.metadata
    assert len(md) == n and md[-1]["status"] == "ok" and md[-1]["msg_id"] == ar.msg_ids[-1]
    assert ar.wall_time > 0 and ar.serial_time > 0 and len(ar.stdout) == n
