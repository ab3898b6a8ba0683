"""ipyparallel's view and client surface beyond apply and map: abort on a
view, outstanding, clear, imap over endless iterators, the load-balanced
executor, module-level remote/parallel, importer, require(name=obj),
Reference anywhere, dotted push/pull, queue_status's shape, get_result,
results and metadata as ipyparallel 9 keeps them, broadcast_view -
against a real cluster, through lanes and through the controller."""

import concurrent.futures as cf
import itertools
import os
import time

import pytest

import shoal

pytestmark = pytest.mark.usefixtures("my_ids")  # each engine's id as my_id (conftest)
from shoal import Reference


@shoal.interactive
def nap_then(seconds, value):
    import time
    time.sleep(seconds)
    return value


def test_view_abort_and_outstanding(rc):
    v = rc[-1]
    busy = v.apply_async(nap_then, 0.5, "busy")
    queued = v.apply_async(lambda: 2)
    assert {busy.msg_id, queued.msg_id} <= v.outstanding and {busy.msg_id, queued.msg_id} <= rc.outstanding
    v.abort(queued)
    with pytest.raises(shoal.TaskAborted):
        queued.get(10)
    many = [v.apply_async(nap_then, 0.05, i) for i in range(6)]
    v.abort()  # every outstanding task of the view that has not started
    assert v.wait(timeout=10)
    assert busy.get() == "busy"
    aborted = [ar for ar in many if not ar.successful()]
    assert aborted and all(isinstance(ar.exception(), shoal.TaskAborted) for ar in aborted)
    assert not v.outstanding and busy.msg_id not in rc.outstanding


def test_client_clear(rc):
    rc[:].push(dict(cleared=5), block=True)
    last = rc.ids[-1]
    rc.clear(targets=last, block=True)
    assert rc[:-1].pull("cleared", block=True) == [5, 5]
    with pytest.raises(shoal.RemoteError, match="NameError"):
        rc[last].pull("cleared", block=True)
    rc.clear(block=True)
    with pytest.raises(shoal.CompositeError):
        rc[:].pull("cleared", block=True)


def test_imap_of_an_endless_iterator_keeps_max_outstanding(rc):
    lview = rc.load_balanced_view()
    gen = lview.imap(nap_then, itertools.repeat(0.05), itertools.count(), max_outstanding=4)
    assert next(gen) == 0 and 4 <= len(lview.history) <= 5
    assert next(gen) == 1 and len(lview.history) <= 6, "one more task for each result taken"
    gen.cancel()
    assert rc.wait(timeout=10)
    assert list(lview.imap(lambda n: 1 / (n % 2), range(4), max_outstanding=2, return_exceptions=True))[1::2] \
        == [1.0, 1.0]
    got = list(lview.imap(nap_then, [0.3, 0.0, 0.0], "abc", ordered=False, max_outstanding=3))
    assert got[-1] == "a" and sorted(got) == ["a", "b", "c"]
    with pytest.raises(shoal.RemoteError, match="ZeroDivisionError"):
        list(lview.imap(lambda n: 1 / n, iter([1, 0])))


def test_load_balanced_executor_len_and_module_decorators(rc):
    lview = rc.load_balanced_view()
    assert len(lview) == 3 and len(rc.load_balanced_view([0, 1])) == 2
    assert rc.load_balanced_view(-1).targets == [rc.ids[-1]]
    with lview.executor as ex:
        assert ex.submit(nap_then, 0, 3).result(10) == 3

    @shoal.remote(rc[:], block=True)
    def pid():
        import os
        return os.getpid()
    assert len(set(pid())) == 3

    @shoal.parallel(lview, block=True)
    def double(x):
        return 2 * x
    assert double.map(range(5)) == [0, 2, 4, 6, 8]


def test_importer_and_require_with_names(rc):
    v = rc[-1]
    with v.importer:
        import colorsys  # noqa: F401
    assert v.apply_sync(shoal.interactive(lambda: "colorsys" in globals()))

    @shoal.require(offset=40)
    @shoal.interactive
    def add_offset(x):
        return x + offset  # noqa: F821 (put there by require)
    assert rc[:].apply_sync(add_offset, 2) == [42] * 3


def test_apply_takes_a_keyword_named_f(rc):
    assert rc[:].apply_sync(lambda f: f * 2, f=5) == [10] * 3
    assert rc.load_balanced_view().apply_sync(lambda f: f + 1, f=5) == 6


def test_reference_anywhere(rc):
    dv = rc[:]
    dv.push(dict(a=128, g=[5, 6], fn=len), block=True)
    assert dv.apply_sync(lambda x: x, [Reference("a")]) == [[128]] * 3
    assert dv.apply_sync(lambda d: d["k"], {"k": Reference("a")}) == [128] * 3
    assert dv.apply_sync(lambda x=None: x, x=(Reference("a"),)) == [(128,)] * 3
    assert dv.apply_sync(Reference("fn"), Reference("g")) == [2] * 3, "a Reference as the function"
    assert dv.apply_sync(lambda x: x, Reference("g[0]")) == [5] * 3, "an expression"
    assert rc.load_balanced_view().map_sync(lambda x: x + 1, [Reference("a")] * 2) == [129, 129]
    dv.push(dict(b=Reference("a")), block=True)
    assert dv.pull("b", block=True) == [128] * 3
    with pytest.raises(SyntaxError):
        Reference("not an expression (")
    with pytest.raises(shoal.CompositeError, match="NameError"):
        dv.apply_sync(lambda x: x, Reference("nothing_here"))


def test_dotted_names_in_push_pull_and_items(rc):
    v = rc[-1]
    v.execute("class A: pass\na = A()\na.b = 128\nl = [1, 2]", block=True)
    assert v["a.b"] == 128 and v["l[1]"] == 2
    v["a.b"] = 0
    assert v.apply_sync(lambda x: x.b, Reference("a")) == 0 and v["a.b"] == 0
    v.push({"l[0]": 7}, block=True)
    assert v.pull("l", block=True) == [7, 2]


def test_queue_status_in_ipyparallels_shape(rc):
    qs = rc.queue_status()
    assert sorted(k for k in qs if k != "unassigned") == rc.ids and qs["unassigned"] == 0
    slow = [rc[0].apply_async(nap_then, 0.3, i) for i in range(3)]
    one = rc.queue_status(targets=0)
    assert sorted(one) == ["completed", "queue", "tasks"] and one["queue"] == 3
    verbose = rc.queue_status(targets=0, verbose=True)
    assert sorted(verbose["queue"]) == sorted(ar.msg_id for ar in slow)
    done_before = one["completed"]
    for ar in slow:
        ar.get(10)
    after = rc.queue_status(targets=0)
    assert after["queue"] == 0 and after["completed"] == done_before + 3
    assert "nodes" in rc.cluster_status(), "shoal's own status keeps the registry"


def test_get_result_of_own_tasks(rc):
    ar = rc[0].apply_async(nap_then, 0.1, "mine")
    assert rc.get_result(ar.msg_id) is ar and rc.get_result(ar) is ar and rc.get_result([ar]) is ar
    assert rc.get_result().get(10) == "mine", "the last task by default"
    v = rc[1]
    v.apply_async(lambda: "from the view")
    assert v.get_result().get(10) == "from the view"
    with pytest.raises(KeyError, match="no record of finished tasks"):
        rc.get_result(123456789)


def test_results_and_metadata_as_ipyparallel_9_keeps_them(rc):
    ar = rc[0].apply_async(lambda: 1)
    ar.get(10)
    assert ar.msg_id not in rc.results and ar.msg_id not in rc.metadata, "the AsyncResult holds them"
    rc.results["asdf"] = 5
    assert rc.metadata["asdf"]["status"] is None, "metadata of any msg_id, as a defaultdict"
    assert len(rc.results) == len(rc.metadata) == 1
    rc.purge_local_results("asdf")
    assert len(rc.results) == len(rc.metadata) == 0
    slow = rc[0].apply_async(nap_then, 0.5, 0)
    with pytest.raises(RuntimeError, match="not finished"):
        rc.purge_local_results(slow)
    with pytest.raises(RuntimeError, match="outstanding"):
        rc.purge_local_results("all")
    slow.get(10)
    rc.purge_local_results("all")


def test_dependency_check_and_invalid_dependency(rc):
    dep = shoal.Dependency(["a", "b"], success=True, failure=False)
    assert dep.check({"a", "b"}, set()) and not dep.check({"a"}, {"b"}) and dep.unreachable({"a"}, {"b"})
    anyone = shoal.Dependency(["a", "b"], all=False, success=False, failure=True)
    assert anyone.check(set(), {"b"}) and not anyone.check({"a", "b"}, set())
    lview = rc.load_balanced_view()
    with lview.temp_flags(after=[987654321]):
        ar = lview.apply_async(lambda: 1)
    with pytest.raises(shoal.error.InvalidDependency):
        ar.get(10)


def test_broadcast_view_and_waiting_for_engines(rc):
    bv = rc.broadcast_view()
    assert isinstance(bv, shoal.DirectView) and bv.targets == "all" and not bv.is_coalescing
    assert len(set(bv.apply_sync(os.getpid))) == 3
    assert rc.broadcast_view([0, 1], is_coalescing=True).apply_sync(lambda: 1) == [1, 1]
    f = rc.wait_for_engines(3, block=False)
    assert isinstance(f, cf.Future) and f.done() and f.result() is None
    f = rc.wait_for_engines(4, timeout=0.2, block=False)
    with pytest.raises(TimeoutError):
        f.result(5)
    plain = cf.Future()
    plain.set_result(1)
    assert rc.wait([plain, rc[0].apply_async(lambda: 1)], timeout=10)
    started = time.monotonic()
    rc.wait_interactive(timeout=10, file=open(os.devnull, "w"))
    assert time.monotonic() - started < 10 and not rc.outstanding


def test_a_failed_cell_aborts_what_is_queued_behind_it(rc):
    v = rc[-1]
    cells = ["a = 5\nb = 10\nc = 0", "import time; time.sleep(0.2)", "b / c", "b *= 2"]
    ars = [v.execute(cell, silent=False) for cell in cells]
    ars[1].get(10)
    with pytest.raises(shoal.RemoteError, match="ZeroDivisionError"):
        ars[2].get(10)
    with pytest.raises(shoal.TaskAborted, match="a cell before it failed"):
        ars[3].get(10)
    assert v["b"] == 10, "the cell behind the failed one did not run"
    v.execute("b *= 3", silent=False, block=True)
    assert v["b"] == 30, "what comes after the failure was answered runs"
    quiet = [v.execute("1 / 0"), v.execute("b += 1")]  # silent (execute's default): nothing is aborted
    with pytest.raises(shoal.RemoteError):
        quiet[0].get(10)
    quiet[1].get(10)
    assert v["b"] == 31


def test_retries_go_to_other_engines_and_scheduler_errors_are_remote_errors(rc):
    lview = rc.load_balanced_view()

    @shoal.interactive
    def fail():
        import os
        raise ValueError(f"failed on {os.getpid()}")
    with lview.temp_flags(retries=2):
        with pytest.raises(shoal.RemoteError, match="ValueError") as e:
            lview.apply_sync(fail)
    with lview.temp_flags(retries=3, timeout=0.2):  # three engines failed it: none is left in time
        with pytest.raises(shoal.TaskTimeout) as e:
            lview.apply_sync(fail)
    assert isinstance(e.value, shoal.RemoteError) and e.value.ename == "TaskTimeout"
    assert "failed on every engine" in str(e.value)
    with lview.temp_flags(retries=5):  # without a timeout: its last error, not a wait for ever
        with pytest.raises(shoal.RemoteError, match="ValueError"):
            lview.apply_sync(fail)
    with lview.temp_flags(after=["no such task"]):
        with pytest.raises(shoal.RemoteError) as e:
            lview.apply_sync(lambda: 1)
    assert e.value.ename == "InvalidDependency" and isinstance(e.value, shoal.error.InvalidDependency)


def test_error_tracebacks_print_and_wrappers_say_what_they_are(rc, capsys):
    with pytest.raises(shoal.CompositeError) as e:
        rc[:].apply_sync(lambda: 1 / 0)
    e.value.print_traceback()
    assert capsys.readouterr().out.count("ZeroDivisionError") >= 3
    e.value.print_traceback(1)
    assert "ZeroDivisionError" in capsys.readouterr().out

    @rc[:].remote()
    def multiply(x, y):
        """multiply x * y"""
        return x * y
    assert "RemoteFunction" in multiply.__doc__ and "multiply x" in multiply.__doc__
    assert "ParallelFunction" in rc[:].parallel()(multiply.func).__doc__


def test_progress_counts_items_and_wait_interactive_stops_at_the_first_error(rc):
    amr = rc[:].map_async(nap_then, [0.1] * 6, range(6))
    assert len(amr) == 6 and amr.progress == 0
    amr.wait_interactive(file=open(os.devnull, "w"))
    assert amr.progress == len(amr) == 6
    failing = rc[:].apply_async(shoal.interactive(lambda: 1 / 0 if my_id == 0 else __import__("time").sleep(2)))  # noqa: F821
    started = time.monotonic()
    assert failing.wait_interactive(timeout=5, return_when=shoal.FIRST_EXCEPTION, file=open(os.devnull, "w")) \
        is False
    assert time.monotonic() - started < 1.5
    failing.wait(10)


def test_client_new_survives_being_patched(cluster):
    from unittest import mock
    c = shoal.Client(url_file=str(cluster[0].conn), timeout=10)
    try:
        with mock.patch.object(shoal.Client, "__new__", lambda *a, **kw: c):
            pass
        again = shoal.Client(url_file=str(cluster[0].conn), timeout=10)  # arguments still reach __init__
        again.close()
    finally:
        c.close()
