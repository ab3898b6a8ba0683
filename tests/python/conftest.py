"""Shared by every Python test."""

import signal

# A shell that starts the tests in the background (`./scripts/test.sh &`)
# starts them with SIGINT ignored, and every process they start would inherit
# that: the tests that deliver a Ctrl-C (to `shoal start`, to %%px, to
# `shoal bench tradeoff`) would see nothing happen. A handler of our own is
# reset to the default on exec, so the processes we start get SIGINT's
# normal behaviour again.
signal.signal(signal.SIGINT, signal.default_int_handler)


# ---- a cluster for a test module, and a client of it by either path ----------------------
# A module that needs another shape (more engines, a bigger arena) defines
# its own `cluster` and `rc`, which take the place of these.

import pytest  # noqa: E402

import shoal  # noqa: E402

from procs import Agent, Controller  # noqa: E402


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, request):
    """A controller and a node agent with three engines, for one test module."""
    root = tmp_path_factory.mktemp(request.module.__name__)
    ctl = Controller(root / "home", heartbeat_ms=500)
    try:
        agent = Agent(ctl, root / "run", engines=3)
    except BaseException:  # not left running when the fixture fails
        ctl.stop()
        raise
    yield ctl, agent
    agent.stop()
    ctl.stop()


@pytest.fixture(params=["lanes", "controller"])
def rc(request, cluster):
    """A client of the module's cluster, through lanes and through the
    controller; the engines' namespaces emptied first, the serializer
    chosen (use_*) put back after."""
    c = shoal.Client(url_file=str(cluster[0].conn), timeout=10, lanes=request.param == "lanes")
    c.clear(block=True)
    yield c
    shoal.use_pickle()
    c.close()


@pytest.fixture
def my_ids(rc):
    """Each engine's id as `my_id` in its namespace."""
    rc[:].scatter("my_id", rc.ids, flatten=True, block=True)
