"""Twenty-five idioms from ipyparallel's documentation, as a plain script.

Each idiom is written as ipyparallel's documentation writes it, after
`import shoal as ipp`; each checks its own result. Run it against a
running cluster (`shoal start -n 2 --daemonize`, then
`python examples/idioms.py`), or on a cluster of its own
(`python examples/idioms.py --own-cluster`). Prints one line per idiom,
then "N passed, N failed"; exits 1 if any failed.

Every function here is a function of __main__, as in a user's script: it
runs with the engine's namespace as its globals, as in ipyparallel.
"""

import argparse
import asyncio
import concurrent.futures
import math
import sys
import traceback

import shoal as ipp

IDIOMS = []


def idiom(f):
    IDIOMS.append(f)
    return f


@idiom
def client_ids_and_views(rc):
    assert len(rc.ids) >= 2 and rc[:].targets == rc.ids
    assert rc[-1].targets == rc.ids[-1]


@idiom
def execute_then_use(rc):
    dv = rc[:]
    dv.execute("import numpy as np\nzz = 41", block=True)
    assert dv.apply_sync(lambda: zz + 1) == [42] * len(rc)  # noqa: F821 (the engines')


@idiom
def push_then_use(rc):
    dv = rc[:]
    dv.push(dict(w=5), block=True)

    def add_w(x):
        return x + w  # noqa: F821 (the engines')
    assert dv.apply_sync(add_w, 1) == [6] * len(rc)


@idiom
def pull_and_dict_access(rc):
    dv = rc[:]
    dv["b"] = 2
    assert dv["b"] == [2] * len(rc) and dv.pull("b", block=True) == [2] * len(rc)


@idiom
def sync_imports(rc):
    dv = rc[:]
    with dv.sync_imports(quiet=True):
        import math  # noqa: F401, F811

    def root(x):
        return math.sqrt(x)
    assert dv.apply_sync(root, 16) == [4.0] * len(rc)


@idiom
def direct_map(rc):
    assert rc[:].map_sync(lambda x: x ** 2, range(8)) == [x ** 2 for x in range(8)]


@idiom
def scatter_gather(rc):
    dv = rc[:]
    dv.scatter("part", list(range(16)), block=True)
    dv.execute("part = [x * 10 for x in part]", block=True)
    assert list(dv.gather("part", block=True)) == [x * 10 for x in range(16)]


@idiom
def remote_decorator(rc):
    @rc[:].remote(block=True)
    def getpid():
        import os
        return os.getpid()
    assert len(set(getpid())) == len(rc)


@idiom
def parallel_decorator(rc):
    @rc[:].parallel(block=True)
    def double(xs):
        return [2 * x for x in xs]
    assert double(range(10)) == [2 * x for x in range(10)]


@idiom
def load_balanced_map(rc):
    lview = rc.load_balanced_view()
    assert lview.map_sync(lambda x: x + 1, range(20)) == list(range(1, 21))


@idiom
def async_results(rc):
    ar = rc.load_balanced_view().apply_async(lambda: 7)
    assert ar.get(10) == 7 and ar.ready() and ar.successful()
    assert ar.metadata["status"] == "ok" and ar.engine_id in rc.ids


@idiom
def wait_for_many(rc):
    lview = rc.load_balanced_view()
    ars = [lview.apply_async(lambda i: i * i, i) for i in range(10)]
    assert rc.wait(ars, timeout=10) and [ar.get() for ar in ars] == [i * i for i in range(10)]


@idiom
def interactive_decorator(rc):
    rc[:].push(dict(scale=3), block=True)

    @ipp.interactive
    def scaled(x):
        return scale * x  # noqa: F821 (the engines')
    assert rc[:].apply_sync(scaled, 2) == [6] * len(rc)


@idiom
def reference_argument(rc):
    rc[:].push(dict(data=[1, 2, 3]), block=True)
    assert rc[:].apply_sync(len, ipp.Reference("data")) == [3] * len(rc)


@idiom
def require_decorator(rc):
    @ipp.require("math")
    def floor_it(x):
        return math.floor(x)
    assert rc.load_balanced_view().apply_sync(floor_it, 2.5) == 2


@idiom
def depend_decorator(rc):
    def on_engine(eid):
        return engine_id == eid  # noqa: F821 (the engines')
    rc[:].scatter("engine_id", rc.ids, flatten=True, block=True)
    target = rc.ids[-1]

    @ipp.depend(on_engine, target)
    def where():
        return engine_id  # noqa: F821 (the engines')
    assert rc.load_balanced_view().apply_sync(where) == target


@idiom
def after_dependency(rc):
    lview = rc.load_balanced_view()
    first = lview.apply_async(lambda: "first")
    with lview.temp_flags(after=[first]):
        second = lview.apply_async(lambda: "second")
    assert second.get(10) == "second" and first.ready()


@idiom
def composite_error(rc):
    try:
        rc[:].apply_sync(lambda: 1 / 0)
    except ipp.CompositeError as e:
        try:
            e.raise_exception()
        except ipp.RemoteError as one:
            assert one.ename == "ZeroDivisionError"
    else:
        raise AssertionError("no error raised")


@idiom
def executor(rc):
    with rc.executor() as ex:
        assert list(ex.map(lambda x: -x, range(5))) == [0, -1, -2, -3, -4]
        assert ex.submit(pow, 2, 10).result() == 1024


@idiom
def futures_and_asyncio(rc):
    ar = rc[0].apply_async(lambda: "done")
    done, _ = concurrent.futures.wait([ar], timeout=10)
    assert done == {ar}

    async def main():
        return await rc.load_balanced_view().apply_async(lambda: "awaited")
    assert asyncio.run(main()) == "awaited"


@idiom
def execute_outputs(rc):
    ar = rc[:].execute("print('hello'); 6 * 7", silent=False, block=True)
    assert ar.stdout == ["hello\n"] * len(rc)
    assert [r.execute_result["data"]["text/plain"] for r in ar.get()] == ["42"] * len(rc)


@idiom
def ipython_syntax_on_engines(rc):
    ar = rc[:].execute("%whos", block=True)
    assert all("Variable" in out or "Interactive namespace is empty" in out for out in ar.stdout)


@idiom
def use_cloudpickle(rc):
    dv = rc[:]
    dv.use_cloudpickle()
    try:
        local_only = 17  # sent along with the function under cloudpickle
        assert dv.apply_sync(lambda: local_only) == [17] * len(rc)
    finally:
        dv.use_pickle()


@idiom
def joblib_backend(rc):
    try:
        from joblib import Parallel, delayed, parallel_config
    except ImportError:
        raise AssertionError("joblib is not installed")
    rc.load_balanced_view().register_joblib_backend("shoal-idioms")
    with parallel_config(backend="shoal-idioms"):
        assert Parallel()(delayed(abs)(-i) for i in range(6)) == list(range(6))


@idiom
def shutdown_one_engine(rc):
    import time
    last = rc.ids[-1]
    rc.shutdown(targets=[last], block=True)
    deadline = time.monotonic() + 10
    while last in rc.ids:
        assert time.monotonic() < deadline, "the engine that stopped stayed in rc.ids"
        time.sleep(0.05)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", default="default")
    p.add_argument("--url-file", default=None)
    p.add_argument("--own-cluster", action="store_true", help="start (and stop) a cluster of 3 engines")
    args = p.parse_args()
    cluster = ipp.Cluster(n=3) if args.own_cluster else None
    rc = cluster.start_and_connect_sync() if cluster else ipp.Client(url_file=args.url_file, profile=args.profile)
    passed = failed = 0
    try:
        for f in IDIOMS:  # shutdown_one_engine last: it stops an engine
            try:
                f(rc)
            except Exception:
                failed += 1
                print(f"FAIL {f.__name__}:\n{traceback.format_exc()}", flush=True)
            else:
                passed += 1
                print(f"ok   {f.__name__}", flush=True)
    finally:
        rc.close()
        if cluster:
            cluster.stop_cluster_sync()
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
