"""IPython on the engines, against a real cluster: one namespace before and
after display() (the shell's user_ns is the engine's)."""

import pytest

import shoal

from procs import Agent, Controller

# On an engine: the Engine object (its SIGINT handler is a bound method of it).
ENGINE = "__import__('signal').getsignal(__import__('signal').SIGINT).__self__"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine_ipython")
    ctl = Controller(root / "home", heartbeat_ms=500)
    agent = Agent(ctl, root / "run", engines=2)
    yield ctl, agent
    agent.stop()
    ctl.stop()


@pytest.fixture
def rc(cluster):
    c = shoal.Client(url_file=str(cluster[0].conn), timeout=10)
    c[:].clear(block=True)
    yield c
    c.close()


def run(view, code):
    """execute code, as %px does; the AsyncResult once it has finished."""
    ar = view.execute(code, silent=False, block=False)
    ar.get(30)
    return ar


def stdout(ar):
    """A finished task's stdout: one engine's text (AsyncResult.stdout is {engine id: text})."""
    (text,) = ar.stdout.values()
    return text


# On an engine: its IPython shell, if it has made one (asking makes none).
SHELL = "__import__('IPython').get_ipython()"


def one_namespace(view):
    """On each engine: is there one namespace (__main__'s, the engine's,
    the shell's if any, an execute cell's globals)?"""
    return view.execute(f"__import__('sys').modules['__main__'].__dict__ is globals() is {ENGINE}.ns and "
                        f"({SHELL} is None or {SHELL}.user_ns is globals())", block=True)


# Module-level, so that their names are globals, not closures: on the
# engine, the engine's namespace.
@shoal.interactive
def set_c():
    global c
    c = a * 10  # noqa: F821 - the engine's


@shoal.interactive
def read():
    return a, b, c  # noqa: F821


@shoal.interactive
def uses_the_import():
    return colorsys.rgb_to_hsv(1, 0, 0)  # noqa: F821 - imported there by sync_imports


def test_display_keeps_one_namespace_for_push_execute_interactive_and_sync_imports(rc):
    dv = rc[:]
    assert one_namespace(dv) == [True, True]
    ar = run(dv, "from IPython.display import display, HTML\ndisplay(HTML('<i>shown</i>'))")
    assert [o[0]["data"]["text/html"] for o in ar.outputs] == ["<i>shown</i>"] * 2
    dv.push({"a": 5}, block=True)
    dv.execute("b = a + 1", block=True)
    dv.apply_sync(set_c)
    assert dv.pull("c", block=True) == [50, 50]
    assert dv.apply_sync(read) == [(5, 6, 50)] * 2
    with dv.sync_imports(quiet=True):
        import colorsys  # noqa: F401
    assert dv.apply_sync(uses_the_import) == [(0.0, 1.0, 1)] * 2
    assert dv.execute("__import__('sys').modules['__main__'].colorsys.__name__", block=True) == ["colorsys"] * 2
    assert one_namespace(dv) == [True, True], "display() made a shell with a namespace of its own"
