"""IPython on the engines, against a real cluster: one namespace before and
after display() (the shell's user_ns is the engine's), and IPython's syntax
in execute and %px (magics, !cmd, the inline matplotlib backend), while
apply and plain Python never make the shell."""

import base64
import json
import subprocess
import sys

import pytest

import shoal

from procs import Agent, Controller, evaluate

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
    """A finished task's stdout: one engine's text (AsyncResult.stdout of a task of one engine)."""
    return ar.stdout


# On an engine: its IPython shell, if it has made one (asking makes none).
SHELL = "__import__('IPython').get_ipython()"


def one_namespace(view):
    """On each engine: is there one namespace (__main__'s, the engine's,
    the shell's if any, an execute cell's globals)?"""
    return evaluate(view, f"__import__('sys').modules['__main__'].__dict__ is globals() is {ENGINE}.ns and "
                          f"({SHELL} is None or {SHELL}.user_ns is globals())")


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
    assert evaluate(dv, "__import__('sys').modules['__main__'].colorsys.__name__") == ["colorsys"] * 2
    assert one_namespace(dv) == [True, True], "display() made a shell with a namespace of its own"


def test_whos_and_help(rc):
    ar = run(rc[0], "shown_here = 12345\n%whos")
    out = stdout(ar)
    assert "shown_here" in out and "12345" in out and "get_ipython" not in out, out
    ar = run(rc[0], "shown_here?")
    assert "Type:" in stdout(ar) and "int" in stdout(ar), ar.stdout


def test_shell_commands_print_into_the_tasks_stdout(rc):
    ar = run(rc[:], "!echo hi from the engine")
    assert all("hi from the engine" in out for out in ar.stdout), ar.stdout
    ar = run(rc[0], "x = !echo hi there\nx")
    assert rc[0].pull("x", block=True) == ["hi there"]
    assert ar.get().execute_result["data"]["text/plain"] == "['hi there']"
    assert rc[0].pull("x", block=True) == ["hi there"]
    assert evaluate(rc[0], "_exit_code") == 0, "!cmd keeps its exit code, as in IPython"
    run(rc[0], "!exit 3")
    assert evaluate(rc[0], "_exit_code") == 3


def test_time_and_timeit(rc):
    ar = run(rc[0], "%time y = sum(range(10))")
    assert "Wall time" in stdout(ar) and rc[0].pull("y", block=True) == 45
    ar = run(rc[0], "%time 6 * 7")
    assert ar.get().execute_result["data"] == {"text/plain": "42"}
    assert ar.metadata["execute_result"]["data"] == {"text/plain": "42"}
    ar = run(rc[0], "%%timeit -n1 -r1\nz = 1")
    assert "per loop" in stdout(ar)
    ar = run(rc[0], "import math\n%time r = math.sqrt(16)\nr + 1")  # Python and magics mixed in one cell
    assert ar.get().execute_result["data"]["text/plain"] == "5.0"


def figures(ar):
    """The PNGs among a finished task's display outputs (one engine)."""
    return [base64.b64decode(o["data"]["image/png"]) for o in ar.outputs if "image/png" in o["data"]]


def test_matplotlib_inline_sends_figures_to_the_client(rc):
    pytest.importorskip("matplotlib_inline")
    e = rc[0]
    ar = run(e, "%matplotlib inline\nimport matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()")
    pngs = figures(ar)
    assert len(pngs) == 1 and pngs[0].startswith(b"\x89PNG"), ar.outputs
    ar = run(e, "plt.plot([3, 1])")  # shown at the end of the cell, as by a kernel
    assert len(figures(ar)) == 1
    ar = run(e, "x = 1")
    assert figures(ar) == [], "a figure is shown once"
    ar = run(e, "%matplotlib")  # a kernel's default: inline
    assert "backend: inline" in stdout(ar)


def test_magics_that_cannot_work_on_an_engine_fail_the_task(rc):
    e = rc[0]
    for cell, words in [("%qtconsole", "not found"), ("%matplotlib qt", "inline"), ("%gui tk", "GUI event loop"),
                        ("%nonesuch_magic", "not found")]:
        with pytest.raises(shoal.RemoteError) as info:
            e.execute(cell, block=True)
        assert info.value.ename == "UsageError" and words in info.value.evalue, info.value
    with pytest.raises(shoal.RemoteError) as info:
        e.execute("%time 1 / 0", block=True)
    assert info.value.ename == "ZeroDivisionError"
    assert not any("shoal/_engine.py" in line for line in info.value.traceback)
    with pytest.raises(shoal.RemoteError) as info:
        e.execute("x = = 1", block=True)
    assert info.value.ename == "SyntaxError" and "<shoal-cell>" in "".join(info.value.traceback)
    assert evaluate(e, "1 + 1") == 2, "the engine goes on"


def test_clear_keeps_the_shell_working(rc):
    e = rc[0]
    run(e, "%whos")
    e.clear(block=True)
    assert evaluate(e, "'get_ipython' in globals()") is True
    ar = run(e, "after_clear = 1\n%who")
    assert stdout(ar).split() == ["after_clear"]


# A client's IPython, in a process of its own: IPython's test shell can be
# started once per process, and the other test modules start it too.
PX_SESSION = r"""
import json, sys
from IPython.testing.globalipapp import start_ipython
from IPython.utils.capture import capture_output
import shoal

ip = start_ipython()
ip.colors = "nocolor"
rc = shoal.Client(url_file=sys.argv[1], timeout=10)  # registers %px, as ipyparallel's client does
cells = ["%px %matplotlib inline", "%%px\nparked = 7\n%who",
         "%%px --targets 0\nimport matplotlib.pyplot as plt\nplt.plot([1, 2])", "%px %qtconsole"]
report = []
for cell in cells:
    with capture_output() as cap:
        result = ip.run_cell(cell)
    report.append({"ok": result.success, "error": repr(result.error_in_exec), "stdout": cap.stdout,
                   "mime": [sorted(o.data) for o in cap.outputs]})
rc.close()
print(json.dumps(report))
"""


def test_px_runs_line_magics_on_the_engines(cluster, rc):
    p = subprocess.run([sys.executable, "-c", PX_SESSION, str(cluster[0].conn)], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    inline, who, plot, qtconsole = json.loads(p.stdout.splitlines()[-1])
    assert inline["ok"] and who["ok"], (inline, who)
    assert who["stdout"].count("parked") == 2, who
    assert plot["ok"] and ["image/png", "text/plain"] in plot["mime"], "the engine's figure, shown richly here"
    assert not qtconsole["ok"] and "CompositeError" in qtconsole["error"], qtconsole
    assert qtconsole["stdout"].count("UsageError: Line magic function `%qtconsole` not found.") == 2, qtconsole


def test_apply_and_plain_python_never_make_the_shell(tmp_path):
    """A cluster of its own: its engine has run nothing else."""
    ctl = Controller(tmp_path / "home", heartbeat_ms=500)
    try:
        agent = Agent(ctl, tmp_path / "run", engines=1)
        try:
            c = shoal.Client(url_file=str(ctl.conn), timeout=10)
            try:
                e = c[0]
                shell_made = f"{SHELL} is not None"
                e.apply_sync(lambda: None)
                e.execute("x = 1\nx + 1", block=True)
                e.push({"y": 2}, block=True)
                assert evaluate(e, shell_made) is False
                assert evaluate(e, "%who_ls") == ["x", "y"], "a magic makes it"
                assert evaluate(e, shell_made) is True
                # Once made, its execute events fire for cells, not for apply.
                e.execute("fired = []\nget_ipython().events.register('pre_execute', lambda: fired.append(1))",
                          block=True)
                e.apply_sync(lambda: None)
                assert e.pull("fired", block=True) == []
                e.execute("pass", block=True)
                assert e.pull("fired", block=True) == [1]
            finally:
                c.close()
        finally:
            agent.stop()
    finally:
        ctl.stop()

