"""AsyncResult as ipyparallel has it: a concurrent.futures.Future for every
kind of result (wait, as_completed, callbacks, asyncio, await), and its
surface (len, split/join, metadata as attributes and items, iteration,
return_exceptions, FIRST_EXCEPTION, get_dict), against a real cluster,
through lanes and through the controller."""

import asyncio
import concurrent.futures as cf
import os
import threading
import time

import pytest

import shoal

pytestmark = pytest.mark.usefixtures("my_ids")  # each engine's id as my_id (conftest)


# Functions of "__main__" (this module is not importable on the engines).
@shoal.interactive
def sleep_then(seconds, value):
    import time
    time.sleep(seconds)
    return value


@shoal.interactive
def fail_if(x, bad):
    import time
    time.sleep(0.05 * x)
    if x == bad:
        raise ValueError(f"bad {x}")
    return x


def every_kind(rc):
    """One result of each kind a user meets."""
    lview = rc.load_balanced_view()
    with lview.temp_flags(retries=1):
        task = lview.apply_async(sleep_then, 0.05, "retried")  # a TaskResult (client-held)
    return {
        "one engine": (rc[0].apply_async(sleep_then, 0.1, 1), 1),
        "several": (rc[:].apply_async(sleep_then, 0.1, 2), [2, 2, 2]),
        "direct map": (rc[:].map_async(lambda x: x * 2, range(6)), [0, 2, 4, 6, 8, 10]),
        "load-balanced apply": (lview.apply_async(sleep_then, 0.1, 3), 3),
        "load-balanced map": (lview.map_async(lambda x: x + 1, range(20)), list(range(1, 21))),
        "task with flags": (task, "retried"),
        "execute": (rc[:].execute("import time; time.sleep(0.1)"), None),
    }


def test_every_kind_of_result_is_a_future_that_wait_completes(rc):
    kinds = every_kind(rc)
    for name, (ar, _) in kinds.items():
        assert isinstance(ar, cf.Future), name
    # Nobody calls get(): concurrent.futures.wait's waiter alone must see them finish.
    done, pending = cf.wait([ar for ar, _ in kinds.values()], timeout=30)
    assert not pending, [n for n, (ar, _) in kinds.items() if ar in pending]
    for name, (ar, want) in kinds.items():
        assert ar.done() and not ar.cancelled() and ar.exception() is None, name
        if want is not None:
            assert ar.result() == want, name


def test_as_completed_yields_in_finishing_order(rc):
    ars = [rc[e].apply_async(sleep_then, 0.3 * (2 - i), i) for i, e in enumerate(rc.ids)]
    order = [f.result() for f in cf.as_completed(ars, timeout=30)]
    assert order == [2, 1, 0]


def test_add_done_callback_runs_without_anyone_waiting(rc):
    fired = threading.Event()
    got = []
    ar = rc[0].apply_async(sleep_then, 0.2, "called back")
    ar.add_done_callback(lambda f: (got.append((f is ar, f.result())), fired.set()))
    assert fired.wait(10), "the callback never ran"
    assert got == [(True, "called back")]
    late = []
    ar.add_done_callback(late.append)  # already done: at once
    assert late == [ar]
    m = rc.load_balanced_view().map_async(lambda x: x, range(50))
    mfired = threading.Event()
    m.add_done_callback(lambda f: mfired.set())
    assert mfired.wait(10) and m.result() == list(range(50))


def test_asyncio_await_and_wrap_future(rc):
    async def main():
        one = await rc[0].apply_async(sleep_then, 0.1, "awaited")
        many = await asyncio.wrap_future(rc[:].apply_async(sleep_then, 0.1, "wrapped"))
        lb = await rc.load_balanced_view().map_async(lambda x: -x, range(5))
        with pytest.raises(shoal.RemoteError, match="bad 0"):
            await rc[0].apply_async(fail_if, 0, 0)
        return one, many, lb
    assert asyncio.run(main()) == ("awaited", ["wrapped"] * 3, [0, -1, -2, -3, -4])


def test_exception_and_result_as_a_futures(rc):
    ar = rc[:].apply_async(fail_if, 0, 0)
    assert isinstance(ar.exception(10), shoal.CompositeError)
    with pytest.raises(shoal.CompositeError):
        ar.result()
    slow = rc[0].apply_async(sleep_then, 1, 0)
    with pytest.raises(TimeoutError):
        slow.result(timeout=0.05)
    assert not slow.cancel() and slow.running() and not slow.done()
    assert slow.result(10) == 0


def test_wait_and_get_first_exception(rc):
    # The first engine fails at once; the others answer after 2 s.
    ar = rc[:].apply_async(shoal.interactive(
        lambda: 1 / 0 if my_id == 0 else __import__("time").sleep(2)))  # noqa: F821
    t = time.monotonic()
    with pytest.raises(shoal.RemoteError, match="ZeroDivisionError"):
        ar.get(10, return_when=shoal.FIRST_EXCEPTION)
    assert time.monotonic() - t < 1.5, "FIRST_EXCEPTION waited for every engine"
    done, pending = ar.wait(10, return_when=shoal.FIRST_EXCEPTION)
    assert [p.engine_id for p in done] == [0] and len(pending) == 2
    assert ar.wait(10) is True
    with pytest.raises(shoal.CompositeError):
        ar.get(0, return_when=shoal.FIRST_EXCEPTION)  # done: every error, as get()
    m = rc.load_balanced_view().map_async(
        shoal.interactive(lambda x: 1 / 0 if x == 0 else __import__("time").sleep(2)), range(3), chunksize=1)
    t = time.monotonic()
    with pytest.raises(shoal.RemoteError, match="ZeroDivisionError"):
        m.get(10, return_when=shoal.FIRST_EXCEPTION)
    assert time.monotonic() - t < 1.5
    m.wait(10)


def test_return_exceptions_in_get(rc):
    ar = rc[:].apply_async(shoal.interactive(lambda: 1 / my_id))  # noqa: F821
    values = ar.get(10, return_exceptions=True)
    assert isinstance(values[0], shoal.RemoteError) and values[0].ename == "ZeroDivisionError"
    assert values[1:] == [1.0, 0.5]
    with pytest.raises(shoal.CompositeError):
        ar.get(0)
    m = rc.load_balanced_view().map_async(lambda x: 1 / x, [1, 0, 2], chunksize=1)
    got = m.get(10, return_exceptions=True)
    assert got[0] == 1.0 and isinstance(got[1], shoal.RemoteError) and got[2] == 0.5


def test_split_and_join(rc):
    ar = rc[:].apply_async(shoal.interactive(lambda: (__import__("time").sleep(0.2 * my_id), my_id)[1]))  # noqa: F821
    parts = ar.split()
    assert len(parts) == 3 and all(isinstance(p, shoal.AsyncResult) for p in parts)
    assert [p.get(10) for p in parts] == rc.ids
    assert [p.engine_id for p in parts] == rc.ids
    assert shoal.AsyncResult.join(*parts).get(10) == rc.ids
    one = rc[0].apply_async(lambda: 1)
    assert one.split() == (one,)
    done, pending = ar.wait(10, return_when=shoal.FIRST_COMPLETED)
    assert done and set(done) | set(pending) == set(parts)


def test_metadata_as_attributes_and_items(rc):
    ar = rc[:].apply_async(os.getpid)
    pids = ar.get(10)
    assert ar.engine_id == rc.ids and ar["engine_id"] == rc.ids
    assert ar.status == ["ok"] * 3 and all(s is not None for s in ar.started)
    assert ar[0] == pids[0] and ar[1:] == pids[1:]
    one = rc[1].apply_async(os.getpid)
    one.get(10)
    assert one.engine_id == 1 and one["status"] == "ok" and one.completed >= one.started
    assert ar.msg_ids == [ar.msg_id]
    with pytest.raises(AttributeError):
        ar.no_such_field
    assert one.timedelta("submitted", "received") >= 0


def test_len_and_iteration(rc):
    lview = rc.load_balanced_view()
    assert len(lview.map_async(lambda x: x, range(10))) == 10
    assert len(lview.apply_async(lambda x: x, 10)) == 1
    assert len(rc[:].apply_async(lambda: 0)) == 3
    assert len(rc[:].map_async(lambda x: x, range(7))) == 7
    ar = rc[:].apply_async(shoal.interactive(lambda: my_id))  # noqa: F821
    assert list(ar) == rc.ids
    with pytest.raises(TypeError):
        iter(rc[0].apply_async(lambda: 0))


def test_direct_map_of_an_iterator(rc):
    assert rc[:].map_sync(lambda x: x * 3, iter(range(7))) == [x * 3 for x in range(7)]
    assert rc[:].map_sync(lambda x: x, (x for x in "abc")) == ["a", "b", "c"]


def test_load_balanced_map_is_an_async_map_result_with_get_dict(rc):
    lview = rc.load_balanced_view()
    m = lview.map_async(lambda x: x, range(len(rc.ids) * 2), chunksize=1)
    assert isinstance(m, shoal.AsyncMapResult)
    with pytest.raises(ValueError, match="more than one"):
        m.get_dict(10)
    one = lview.map_async(lambda x: x, [7], chunksize=1)
    d = one.get_dict(10)
    assert list(d.values()) == [7] and list(d) == one.engine_id
    ar = rc[1].apply_async(lambda: "x")
    assert ar.get_dict(10) == {1: "x"}


def test_executor_futures_are_async_results(rc):
    with rc.executor() as ex:
        f = ex.submit(sleep_then, 0.1, 5)
        assert isinstance(f, shoal.AsyncResult)
        assert list(ex.map(lambda x: x + 1, range(4))) == [1, 2, 3, 4]
        assert cf.wait([f], 10).done == {f} and f.result() == 5


def test_wait_for_output_and_sent(rc):
    ar = rc[0].execute("print('hello')", block=False)
    assert ar.wait_for_output(10) and ar.stdout == "hello\n" and ar.sent


def test_execute_returns_its_async_result_of_execute_replies(rc):
    e0 = rc[rc.ids[0]]
    e0.block = True
    ar = e0.execute("5", silent=False)
    assert isinstance(ar, shoal.AsyncResult), "blocking execute returns the finished AsyncResult"
    er = ar.get()
    assert str(er) == f"<ExecuteReply[{er.execution_count}]: 5>"
    assert er.execute_result["data"]["text/plain"] == "5" and er["execution_count"] == er.execution_count
    e0.execute("from IPython.display import Image, HTML")
    er = e0.execute("Image(data=b'garbage', format='png', width=10)", silent=False).get()
    assert er._repr_png_() == ("Z2FyYmFnZQ==", {"width": 10})
    assert e0.execute("HTML('<b>bold</b>')", silent=False).get()._repr_html_() == "<b>bold</b>"
    assert e0.execute("print(5)", silent=False).get().stdout == "5\n"
    view = rc[:]
    assert [r["data"] for r in view.execute("5", silent=False, block=True).execute_result] == [{"text/plain": "5"}] * 3
    assert view.execute("5", block=True).execute_result == [None] * 3, "silent: nothing shown"
    with pytest.raises(shoal.CompositeError):
        view.execute("1 / 0", block=True)
    ar = view.execute("import time; time.sleep(0.1)", block=False)
    assert not ar.ready() and ar.get(10) is not None


def test_published_data_reaches_the_client_while_the_task_runs(rc):
    ar = rc[0].execute("import time\nfrom shoal.datapub import publish_data\nfor i in range(5):\n"
                       "    publish_data(dict(i=i))\n    time.sleep(0.1)", block=False)
    seen = set()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and 4 not in seen:
        if ar.data:
            seen.add(ar.data["i"])
        time.sleep(0.03)
    ar.get(10)
    assert 4 in seen and len(seen) > 1, f"seen only {seen}: not while it ran"
    assert ar.data == {"i": 4}
    many = rc[:].apply_async(shoal.interactive(lambda: __import__("shoal.datapub").datapub.publish_data({"x": 1})))
    many.get(10)
    assert many.data == [{"x": 1}] * 3
    with pytest.raises(RuntimeError, match="on an engine"):
        __import__("shoal.datapub").datapub.publish_data({"x": 1})


def test_review_findings_empty_map_joins_and_no_cycles(rc):
    import gc
    import weakref
    empty = rc[:].map_async(lambda x: x, [])
    assert cf.wait([empty], timeout=5).done == {empty} and not empty.running(), "a map of nothing is finished"
    a, b = rc[0].apply_async(lambda: 1), rc[1].apply_async(lambda: 2)
    joined = shoal.AsyncResult.join(a, b)
    assert cf.wait([joined], timeout=10).done == {joined} and joined.get() == [1, 2]
    assert [m["status"] for m in joined.metadata] == ["ok", "ok"] and joined.stdout == ["", ""]
    assert shoal.AsyncResult.join(joined, rc[2].apply_async(lambda: 3)).get(10) == [1, 2, 3]
    waited = rc[0].apply_async(lambda: 4)
    assert cf.wait([waited], timeout=10).done == {waited}
    gone = weakref.ref(waited)
    del waited
    deadline = time.monotonic() + 2
    gc.disable()  # freed by its reference count, not left to the cyclic collector
    try:
        while gone() is not None and time.monotonic() < deadline:
            time.sleep(0.01)  # the client's thread lets go of it within its next turn
        assert gone() is None
    finally:
        gc.enable()
