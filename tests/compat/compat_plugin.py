"""pytest plugin of the compat run: one JSON line per test (and per module
that could not be collected) to $COMPAT_RESULTS, with its node id, outcome
(passed, failed, error, skipped) and the failure's one-line message.
tests/compat/report.py reads them."""

import json
import os
import signal
import threading

import pytest

_outcomes = {}  # nodeid -> [outcome, message]

# A test that outlives this (seconds) is interrupted, and again every
# WATCHDOG_AGAIN seconds until it ends. ipyparallel's ClusterTestCase bounds
# a test with its own SIGALRM (30 s), which takes pytest-timeout's timer
# over; when that one alarm's TimeoutError is raised inside a weakref
# callback, Python prints and drops it, and a test that loops
# (test_lbview's test_impossible_dependency) ran until the module's 300 s
# were up. The watchdog's signal is its own (SIGUSR2) and comes again.
WATCHDOG_AFTER, WATCHDOG_AGAIN = 45.0, 2.0
_armed = threading.Event()


def _time_is_up(signum, frame):
    if _armed.is_set():
        raise TimeoutError(f"the compat watchdog: the test ran over {WATCHDOG_AFTER:.0f} s")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    done = threading.Event()
    main = threading.main_thread().ident

    def watch():
        if done.wait(WATCHDOG_AFTER):
            return
        while not done.is_set():
            signal.pthread_kill(main, signal.SIGUSR2)
            done.wait(WATCHDOG_AGAIN)

    _armed.set()
    watcher = threading.Thread(target=watch, name="compat-watchdog", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        _armed.clear()  # a signal still on its way after this is ignored
        done.set()
        watcher.join()


def pytest_configure(config):
    # The runner's `timeout` ends a module that overran with SIGTERM: as a
    # Ctrl-C, pytest then still tears the cluster fixture down and
    # pytest_sessionfinish writes what ran.
    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}: the module's time is up")

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGUSR2, _time_is_up)


def _message(report):
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:
        text = crash.message
    elif isinstance(report.longrepr, tuple):  # a skip: (file, line, reason)
        text = report.longrepr[2]
    else:
        text = str(report.longrepr or "")
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[0][:300] if lines else ""


def _set(nodeid, outcome, message):
    have = _outcomes.get(nodeid)
    # The first failure of a test stands (a teardown error after a failed call adds nothing).
    if have is None or have[0] in ("passed",) or (have[0] == "skipped" and outcome != "passed"):
        _outcomes[nodeid] = [outcome, message]


def pytest_runtest_logreport(report):
    if report.when == "call":
        if report.passed:
            _set(report.nodeid, "passed", "")
        elif report.skipped:
            _set(report.nodeid, "skipped", _message(report))
        else:
            xfail = hasattr(report, "wasxfail")
            _set(report.nodeid, "skipped" if xfail else "failed", _message(report))
    elif report.failed:  # setup or teardown
        _set(report.nodeid, "error", f"[{report.when}] {_message(report)}")
    elif report.skipped and report.when == "setup":
        _set(report.nodeid, "skipped", _message(report))
    elif report.skipped and report.when == "teardown":
        # pytest.skip() in teardown (test_view_broadcast's "No broadcast view
        # used"): the test did not test what it is for, so it counts as skipped.
        if _outcomes.get(report.nodeid, ["passed"])[0] == "passed":
            _outcomes[report.nodeid] = ["skipped", f"[teardown] {_message(report)}"]


def pytest_collectreport(report):
    if report.failed:
        _set(report.nodeid, "error", f"[collect] {_message(report)}")


def pytest_sessionfinish(session):
    path = os.environ.get("COMPAT_RESULTS")
    if not path:
        return
    with open(path, "a") as f:
        for nodeid, (outcome, message) in _outcomes.items():
            f.write(json.dumps({"nodeid": nodeid, "outcome": outcome, "message": message}) + "\n")
