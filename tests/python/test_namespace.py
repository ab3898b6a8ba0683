"""ipyparallel's rules for where a function runs and which engines a view
names: functions of __main__ see the engine's namespace (from a script and
from IPython, through every way of calling), the serializer is chosen per
view, negative engine ids count from the end, and Client.ids follows
engines that stop or join. Against a real cluster."""

import json
import os
import subprocess
import sys
import time

import pytest

import shoal

from procs import Agent, Controller


# A user's script, run as __main__: every function below is a function of
# __main__, as in ipyparallel's documentation. It prints one JSON line.
SCRIPT = """
import json, math, sys
from math import sqrt
import shoal as ipp

rc = ipp.Client(url_file=sys.argv[1], lanes=sys.argv[2] == "lanes")
dv = rc[:]
dv.clear(block=True)
lview = rc.load_balanced_view()
out = {}
N = 10                      # data the engines never got: not sent with functions

def helper(x):              # code: travels with the functions that use it
    return 2 * x

dv.execute("zz = 41", block=True)
out["lambda"] = dv.apply_sync(lambda: zz + 1)
dv.push(dict(w=5), block=True)

def f(x=0):
    return w + helper(x) + sqrt(4) + math.floor(1.5)

out["def"] = dv.apply_sync(f, 1)
out["direct_map"] = dv.map_sync(lambda x: x + w, range(6))
out["lb_apply"] = lview.apply_sync(f, 2)
out["lb_map"] = lview.map_sync(lambda x: x * w, range(6))

@dv.remote(block=True)
def remote_w():
    return w + zz

@lview.parallel(block=True)
def par(x):
    return x + w

out["remote"] = remote_w()
out["parallel"] = par.map(range(4))
with rc.executor() as ex:
    out["executor"] = ex.submit(f, 3).result()

def set_global(v):
    global gg
    gg = v

dv.apply_sync(set_global, 7)
out["global"] = dv.pull("gg", block=True)

def outer():
    def inner():
        return zz + w
    return inner()

out["closure"] = dv.apply_sync(outer)

class Acc:
    def value(self):
        return w * 10

out["method"] = dv.apply_sync(lambda a: a.value(), Acc())
try:
    dv.apply_sync(lambda: N)
    out["data"] = "sent"
except ipp.CompositeError as e:
    out["data"] = [x.ename for x in e.elist]
dv.execute("N = 3", block=True)
out["data_engine"] = dv.apply_sync(lambda: N)

def helper(x):              # edited: the engines use the new one
    return 3 * x

out["helper_edited"] = dv.apply_sync(f, 1)

# A plain function sent again and again is unpickled once on each engine
# (the same function object each time), and still binds what it names.
def floor_of(x):
    return math.floor(x)

def count_calls(f):         # marks the engine's function object: it counts if it is the same one
    f.calls = getattr(f, "calls", 0) + 1
    return f.calls

out["same_function"] = [dv.apply_sync(count_calls, floor_of) for _ in range(3)]
out["plain_again"] = [dv.apply_sync(floor_of, 2.5) for _ in range(3)]
dv.clear(block=True)        # math is gone from the engines' namespaces...
out["after_clear"] = dv.apply_sync(floor_of, 3.5)   # ...and comes back with the function
dv.execute("math = None", block=True)
out["rebound"] = dv.apply_sync(floor_of, 4.5)
def floor_of(x):            # redefined: the new one runs
    return math.floor(x) + 100

out["redefined"] = dv.apply_sync(floor_of, 4.5)

# A function that names a method of an object goes with the object's state
# of the moment, every time: it is not plain, and not pickled once.
import collections
letters = collections.Counter("aab")
top = letters.most_common
def top_letter():
    return top(1)[0][0]

out["method_then"] = dv.apply_sync(top_letter)
letters.update("bbbb")
out["method_now"] = dv.apply_sync(top_letter)
rc.close()
print(json.dumps(out))
"""


@pytest.mark.parametrize("path", ["lanes", "controller"])
def test_functions_of_a_script_see_the_engine_namespace(cluster, tmp_path, path):
    script = tmp_path / "user_script.py"
    script.write_text(SCRIPT)
    p = subprocess.run([sys.executable, str(script), str(cluster[0].conn), path], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["lambda"] == [42] * 3
    assert out["def"] == [5 + 2 + 2.0 + 1] * 3
    assert out["direct_map"] == [x + 5 for x in range(6)]
    assert out["lb_apply"] == 5 + 4 + 2.0 + 1
    assert out["lb_map"] == [x * 5 for x in range(6)]
    assert out["remote"] == [46] * 3
    assert out["parallel"] == [x + 5 for x in range(4)]
    assert out["executor"] == 5 + 6 + 2.0 + 1
    assert out["global"] == [7] * 3, "global in a function sets the engine's name"
    assert out["closure"] == [46] * 3
    assert out["method"] == [50] * 3, "a class of __main__: its methods see the engine's namespace"
    assert out["data"] == ["NameError"] * 3, "data the client never pushed is not sent with the function"
    assert out["data_engine"] == [3] * 3, "the engine's value of a name, not the client's"
    assert out["helper_edited"] == [5 + 3 + 2.0 + 1] * 3, "a helper redefined on the client is the new one"
    first = out["same_function"][0]
    assert out["same_function"] == [first, [n + 1 for n in first], [n + 2 for n in first]], \
        "one function object on each engine"
    assert out["plain_again"] == [[2] * 3] * 3
    assert out["after_clear"] == [3] * 3, "a function sent again binds its modules again, after a clear"
    assert out["rebound"] == [4] * 3, "...and over what the engine bound to the name"
    assert out["redefined"] == [104] * 3, "a function redefined on the client is the new one"
    assert out["method_then"] == ["a"] * 3 and out["method_now"] == ["b"] * 3, \
        "a method named by the function goes with its object's state of the moment"


@pytest.fixture(scope="module")
def ip():
    import IPython
    from IPython.testing.globalipapp import start_ipython
    shell = start_ipython() or IPython.get_ipython()  # None if another module of the run started it
    shell.colors = "nocolor"
    return shell


def test_functions_of_ipython_see_the_engine_namespace(cluster, ip):
    ip.user_ns["conn"] = str(cluster[0].conn)
    ip.run_cell("import shoal as ipp\nrc = ipp.Client(url_file=conn)\ndv = rc[:]", store_history=False)
    try:
        ip.run_cell("dv.push(dict(a=2), block=True)\ndef double_a(x):\n    return a * x\n"
                    "res = dv.apply_sync(double_a, 21)\nlb = rc.load_balanced_view().map_sync(double_a, [1, 2])",
                    store_history=False).raise_error()
        assert ip.user_ns["res"] == [42] * 3
        assert ip.user_ns["lb"] == [2, 4]
    finally:
        ip.run_cell("rc.close()", store_history=False)


def test_interactive_is_ipyparallels(rc):
    def g():
        return zz  # noqa: F821 (the engine's)
    assert g.__module__ == __name__
    ig = shoal.interactive(g)
    assert ig.__module__ == "__main__" and ig.__name__ == "g"
    rc[:].execute("zz = 'engine'", block=True)
    assert rc[:].apply_sync(ig) == ["engine"] * 3
    with pytest.raises(shoal.CompositeError):
        rc[:].apply_sync(g)  # a function of an importable module: its own module's globals


def test_use_cloudpickle_sends_globals_and_use_pickle_restores(rc):
    dv = rc[:]
    dv.execute("zz = 'engine'", block=True)
    # A function of __main__ (as a script's would be), whose global the client has.
    g = shoal.interactive(lambda: zz)  # noqa: F821
    import __main__
    __main__.zz = "client"
    try:
        assert dv.apply_sync(g) == ["engine"] * 3
        ar = dv.use_cloudpickle()
        assert ar.get(10) == [None] * 3, "use_cloudpickle runs on the view's engines"
        assert dv.apply_sync(g) == ["client"] * 3, "plain cloudpickle: the function carries its globals"
        assert rc.load_balanced_view().use_pickle() is not None
        assert dv.apply_sync(g) == ["engine"] * 3
    finally:
        del __main__.zz


def test_use_dill_without_dill_says_so(rc):
    pytest.importorskip("numpy")
    try:
        import dill  # noqa: F401
        pytest.skip("dill is installed here")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="needs dill"):
        rc[:].use_dill()
    with pytest.raises(ImportError, match="needs dill"):
        shoal.use_dill()


def test_negative_engine_ids_count_from_the_end(rc):
    ids = rc.ids
    pid_last = rc[ids[-1]].apply_sync(os.getpid)
    assert rc[-1].targets == ids[-1]
    assert rc[-1].apply_sync(os.getpid) == pid_last
    assert rc.direct_view(-1).targets == ids[-1]
    assert rc.direct_view(-2).targets == ids[-2]
    assert rc.load_balanced_view(-1).apply_sync(os.getpid) == pid_last
    with pytest.raises(IndexError, match="no engine -4"):
        rc[-4]
    with pytest.raises(IndexError):
        rc.direct_view(-4)


def test_activate_a_negative_id(rc, ip):
    view = rc.activate(-1, suffix="last")
    assert view.targets == rc.ids[-1]
    ip.run_cell("%pxlast last_one = 1", store_history=False)
    assert rc[:].apply_sync(shoal.interactive(lambda: "last_one" in globals())) == [False, False, True]


@pytest.fixture
def own_cluster(tmp_path):
    ctl = Controller(tmp_path / "home", heartbeat_ms=200)
    agents = [Agent(ctl, tmp_path / "run", engines=3)]
    yield ctl, agents
    for a in agents:
        a.stop()
    ctl.stop()


def test_ids_follow_engines_that_stop_and_join(own_cluster, tmp_path):
    ctl, agents = own_cluster
    c = shoal.Client(url_file=str(ctl.conn), timeout=10)
    try:
        ids = c.ids
        assert len(ids) == 3
        every = c.direct_view()
        assert every.targets == "all" and len(every) == 3
        c.shutdown(targets=[ids[-1]], block=True)
        deadline = time.monotonic() + 5
        while ids[-1] in c.ids:  # no refresh(): ids follows the registry
            assert time.monotonic() < deadline, "a stopped engine stayed in ids"
            time.sleep(0.01)
        assert len(every.apply_sync(os.getpid)) == 2
        agents.append(Agent(ctl, tmp_path / "run2", engines=1))  # an engine joins
        deadline = time.monotonic() + 5
        while len(c.ids) < 3:
            assert time.monotonic() < deadline, "an engine that joined never entered ids"
            time.sleep(0.05)
        pids = every.apply_sync(os.getpid)
        assert len(pids) == 3 and len(set(pids)) == 3, "a view of 'all' follows engines that join"
    finally:
        c.close()


def test_an_ipython_session_of_ipyparallel_idioms(cluster, ip):
    """The same idioms typed in IPython: the last engine by -1, a
    function of the session on pushed data, top-level await of a result,
    a blocking execute's AsyncResult, a Reference, use_cloudpickle."""
    ip.user_ns["conn"] = str(cluster[0].conn)
    cells = [
        "import shoal as ipp\nrc = ipp.Client(url_file=conn)\ndv = rc[:]\ndv.clear(block=True)",
        "last = rc[-1].apply_sync(lambda: 'last')",
        "dv.push(dict(offset=100), block=True)\ndef shifted(x):\n    return x + offset\n"
        "lb = rc.load_balanced_view().map_sync(shifted, range(3))",
        "awaited = await rc.load_balanced_view().apply_async(shifted, 1)",
        "reply = dv.execute('offset * 2', silent=False, block=True)",
        "ref = dv.apply_sync(lambda x: x, ipp.Reference('offset'))",
        "dv.use_cloudpickle()\nhere = 7\ncarried = dv.apply_sync(lambda: here)\ndv.use_pickle()",
    ]
    try:
        for cell in cells:
            ip.run_cell(cell, store_history=False).raise_error()
        ns = ip.user_ns
        assert ns["last"] == "last" and ns["lb"] == [100, 101, 102] and ns["awaited"] == 101
        assert isinstance(ns["reply"], shoal.AsyncResult)
        assert [r.execute_result["data"]["text/plain"] for r in ns["reply"].get()] == ["200"] * 3
        assert ns["ref"] == [100] * 3 and ns["carried"] == [7] * 3
    finally:
        ip.run_cell("rc.close()", store_history=False)
