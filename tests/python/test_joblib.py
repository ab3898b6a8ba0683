"""joblib.Parallel on a shoal cluster (view.register_joblib_backend,
shoal.register_joblib_backend): results computed on the engines, errors
re-raised, the rest aborted - against a real cluster of three engines,
through lanes and through the controller."""

import os
import time

import pytest

import shoal

joblib = pytest.importorskip("joblib", reason="joblib is not installed (requirements.txt pins it)")
from joblib import Parallel, delayed  # noqa: E402

@pytest.fixture
def pids(rc):
    """engine id -> the pid of its process."""
    return dict(zip(rc.ids, rc[:].apply_sync(os.getpid)))


@pytest.fixture
def name(request):
    """A backend name of this test's own; the registration is left in
    joblib's table (joblib has no unregister), under a name nobody reuses."""
    return f"shoal-{request.node.name}"


@shoal.interactive
def square_where(x):
    import os
    return x * x, os.getpid()


@shoal.interactive
def fails_at(x, bad):
    if x == bad:
        raise ValueError(f"bad item {x}")
    return x


@shoal.interactive
def mark_then_sleep(i, folder):
    import os
    import time
    if i == 0:
        raise KeyError("the first item fails")
    open(os.path.join(folder, str(i)), "w").close()
    time.sleep(0.2)
    return i


def test_parallel_runs_on_the_engines_of_a_load_balanced_view(rc, pids, name):
    view = rc.load_balanced_view()
    view.register_joblib_backend(name)
    with joblib.parallel_config(backend=name):
        # n_jobs=1 too: the view says how wide it is (else joblib would run them here, one by one)
        out = Parallel(n_jobs=1)(delayed(square_where)(i) for i in range(40))
    assert [v for v, _ in out] == [i * i for i in range(40)]
    where = {pid for _, pid in out}
    assert where <= set(pids.values()) and os.getpid() not in where


def test_a_direct_view_runs_on_its_own_engines(rc, pids, name):
    two = rc.ids[:2]
    rc[two].register_joblib_backend(name)
    with joblib.parallel_config(backend=name):
        out = Parallel(batch_size=1)(delayed(square_where)(i) for i in range(20))
    assert [v for v, _ in out] == [i * i for i in range(20)]
    assert {pid for _, pid in out} <= {pids[e] for e in two}


def test_the_backend_runs_on_the_view_it_was_registered_from(rc, name):
    lview = rc.load_balanced_view()
    lview.register_joblib_backend(name)
    assert Parallel(backend=name)._backend._view is lview
    dview = rc[rc.ids[:2]]
    dview.register_joblib_backend(name + "-direct")
    made = Parallel(backend=name + "-direct")._backend._view
    assert isinstance(made, shoal.LoadBalancedView) and made.client is rc and list(made.targets) == rc.ids[:2]


def test_effective_n_jobs_is_the_number_of_engines(rc, name):
    rc.load_balanced_view().register_joblib_backend(name)
    rc[rc.ids[0]].register_joblib_backend(name + "-one")
    with joblib.parallel_config(backend=name):
        assert joblib.effective_n_jobs() == 3
        assert joblib.effective_n_jobs(n_jobs=-1) == 3
        with pytest.raises(ValueError):
            joblib.effective_n_jobs(n_jobs=0)
    with joblib.parallel_config(backend=name + "-one"):
        assert joblib.effective_n_jobs() == 1


def test_make_default_makes_it_joblibs_default(rc, pids, name, monkeypatch):
    monkeypatch.setattr(joblib.parallel, "DEFAULT_BACKEND", joblib.parallel.DEFAULT_BACKEND)  # put back after
    rc.load_balanced_view().register_joblib_backend(name, make_default=True)
    assert joblib.parallel.DEFAULT_BACKEND == name
    out = Parallel(n_jobs=2)(delayed(square_where)(i) for i in range(10))
    assert [v for v, _ in out] == [i * i for i in range(10)]
    assert {pid for _, pid in out} <= set(pids.values())


def test_a_remote_error_is_raised_in_the_caller(rc, name):
    rc.load_balanced_view().register_joblib_backend(name)
    with joblib.parallel_config(backend=name):
        with pytest.raises(shoal.RemoteError) as info:
            Parallel(n_jobs=3)(delayed(fails_at)(i, 7) for i in range(20))
    err = info.value
    assert err.ename == "ValueError" and err.evalue == "bad item 7"
    assert err.engine_id in rc.ids and "bad item 7" in err.traceback
    with joblib.parallel_config(backend=name):  # the backend is still usable
        assert Parallel()(delayed(fails_at)(i, -1) for i in range(5)) == list(range(5))


def test_an_error_aborts_the_tasks_not_started(rc, name, tmp_path):
    rc.load_balanced_view().register_joblib_backend(name)
    n = 30
    with joblib.parallel_config(backend=name):
        with pytest.raises(shoal.RemoteError, match="the first item fails"):
            # every item sent at once, one task each: the rest wait while item 0 fails
            Parallel(batch_size=1, pre_dispatch="all")(delayed(mark_then_sleep)(i, str(tmp_path)) for i in range(n))
    # Without the abort the 29 others would all run (about 2 s on three
    # engines); with it, those the engines had started when item 0 failed.
    ran, deadline = -1, time.monotonic() + 10
    while ran != len(os.listdir(tmp_path)) and time.monotonic() < deadline:  # until no item starts for 0.5 s
        ran = len(os.listdir(tmp_path))
        time.sleep(0.5)
    assert ran <= 10, f"{ran} of the {n - 1} items after the failed one ran: they were not aborted"


def test_results_come_as_a_generator(rc, name):
    rc.load_balanced_view().register_joblib_backend(name)
    with joblib.parallel_config(backend=name):
        gen = Parallel(return_as="generator_unordered")(delayed(square_where)(i) for i in range(12))
        assert sorted(v for v, _ in gen) == [i * i for i in range(12)]


def test_the_module_level_function_uses_the_default_profile(cluster, pids, name, monkeypatch):
    ctl = cluster[0]
    monkeypatch.setenv("SHOAL_DIR", str(ctl.root))  # where shoal.Client() finds the default profile
    shoal.register_joblib_backend(name)
    p = Parallel(backend=name, n_jobs=-1)
    assert p._backend._view.client is not None
    out = p(delayed(square_where)(i) for i in range(10))
    assert [v for v, _ in out] == [i * i for i in range(10)]
    assert {pid for _, pid in out} <= set(pids.values())
    assert p._backend._client is None  # the client it made was closed at the end of the call
