"""The %px magics in IPython's InteractiveShell, and the walk-through that uses them."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import shoal

from procs import Agent, Controller, evaluate

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("magics")
    ctl = Controller(root / "home", heartbeat_ms=500)
    agent = Agent(ctl, root / "run", engines=2)
    yield ctl, agent
    agent.stop()
    ctl.stop()


@pytest.fixture(scope="module")
def ip():
    import IPython
    from IPython.testing.globalipapp import start_ipython
    shell = start_ipython() or IPython.get_ipython()  # None if another module of the run started it
    shell.colors = "nocolor"
    return shell


@pytest.fixture
def rc(cluster, ip):
    for name in [n for n in ip.magics_manager.magics["line"] if n.startswith(("px", "autopx", "pxresult"))]:
        del ip.magics_manager.magics["line"][name]
    ip.magics_manager.magics["cell"].pop("px", None)
    c = shoal.Client(url_file=str(cluster[0].conn), timeout=10)  # registers %px, as ipyparallel's client does
    c[:].clear(block=True)
    yield c
    c.close()


def run(ip, capsys, cell):
    result = ip.run_cell(cell)
    out, err = capsys.readouterr()
    return result, out, err


def test_px_shows_values_and_output_as_ipyparallel_does(ip, rc, capsys):
    pids = rc[:].apply_sync(os.getpid)
    _, out, _ = run(ip, capsys, "%%px\nimport os\nos.getpid()")
    assert out == f"Out[0:1]: {pids[0]}\nOut[1:1]: {pids[1]}\n"
    run(ip, capsys, "%%px\nfoo = 'bar on pid {}'.format(os.getpid())")
    _, out, _ = run(ip, capsys, "%%px\nfoo")
    assert out == f"Out[0:3]: 'bar on pid {pids[0]}'\nOut[1:3]: 'bar on pid {pids[1]}'\n", "cells counted per engine"
    _, out, err = run(ip, capsys, '%%px\nprint("Len", 2)\nprint("Max", 9)\nimport sys; print("oops", file=sys.stderr)')
    assert out == "[stdout:0] \nLen 2\nMax 9\n[stdout:1] \nLen 2\nMax 9\n"
    assert err == "[stderr:0] \noops\n[stderr:1] \noops\n"
    _, out, _ = run(ip, capsys, "%px x = 6 * 7")
    assert out == ""
    assert rc[:].pull("x", block=True) == [42, 42]


def test_px_options(ip, rc, capsys):
    _, out, _ = run(ip, capsys, "%%px --targets 1\nimport os\nos.getpid()")
    assert re.fullmatch(rf"Out\[1:\d+\]: {rc[1].apply_sync(os.getpid)}\n", out), out
    _, out, _ = run(ip, capsys, "%%px --targets [0] --verbose\n5")
    assert re.fullmatch(r"Parallel execution on engine\(s\): \[0\]\nOut\[0:\d+\]: 5\n", out), out
    result, out, _ = run(ip, capsys, "%%px --noblock -o saved\nimport time; time.sleep(0.1); 7")
    ar = ip.user_ns["saved"]
    assert isinstance(ar, shoal.AsyncResult) and result.result is ar
    assert out.endswith("<AsyncResult: %px>\n"), "the cell's value: the pending result"
    assert [r.execute_result["data"]["text/plain"] for r in ar.get(10)] == ["7", "7"]
    _, out, _ = run(ip, capsys, "%pxresult")
    assert out.count("]: 7\n") == 2
    _, out, _ = run(ip, capsys, "%%px --group-outputs=engine\nprint('hi')\n1")
    # ipyparallel's: each engine's "[output:N]" stands before its value (and its display outputs)
    assert re.fullmatch(r"\[stdout:0\] \nhi\n\[output:0\]\nOut\[0:\d+\]: 1\n"
                        r"\[stdout:1\] \nhi\n\[output:1\]\nOut\[1:\d+\]: 1\n", out), out
    _, out, _ = run(ip, capsys, "%%px --local\nshared_here = 11\nshared_here")
    assert ip.user_ns["shared_here"] == 11, "--local also runs the cell here"
    assert rc[:].pull("shared_here", block=True) == [11, 11]


def test_px_errors_show_the_engines_tracebacks(ip, rc, capsys):
    result, out, err = run(ip, capsys, "%px 1 / 0")
    assert isinstance(result.error_in_exec, shoal.CompositeError)
    text = out + err
    assert "[0:execute]:" in text and "[1:execute]:" in text and "ZeroDivisionError" in text
    assert "magics.py" not in text, "the engines' tracebacks, not the client's"
    e = result.error_in_exec
    assert len(e.elist) == 2 and str(e).startswith("one or more exceptions raised in: %px")
    with pytest.raises(shoal.RemoteError, match="ZeroDivisionError"):
        e.raise_exception(1)
    with pytest.raises(IndexError):
        e.raise_exception(5)
    result, out, err = run(ip, capsys, "%pxresult")
    assert isinstance(result.error_in_exec, shoal.CompositeError)


def test_autopx_runs_every_cell_on_the_engines(ip, rc, capsys):
    _, out, _ = run(ip, capsys, "%autopx")
    assert out == "%autopx enabled\n"
    run(ip, capsys, "only_there = 3")
    _, out, _ = run(ip, capsys, "only_there * 2")
    assert out.endswith("]: 6\n") and out.count("]: 6") == 2
    _, out, _ = run(ip, capsys, "%autopx")
    assert out == "%autopx disabled\n"
    assert "only_there" not in ip.user_ns
    assert rc[:].pull("only_there", block=True) == [3, 3]


def test_activate_with_a_suffix_and_pxconfig(ip, rc, capsys):
    view = rc.activate(targets=[1], suffix="_one")
    assert view.block is True
    _, out, _ = run(ip, capsys, "%px_one only_one = 1")
    assert out == ""  # a statement has no value to show
    assert evaluate(rc[1], "'only_one' in globals()") and not evaluate(rc[0], "'only_one' in globals()")
    _, out, _ = run(ip, capsys, "%%px_one\n'one'")
    assert out.startswith("Out[1:") and out.endswith("]: 'one'\n")
    run(ip, capsys, "%pxconfig --targets 0")
    _, out, _ = run(ip, capsys, "%%px\n'zero'")
    assert out.startswith("Out[0:") and "Out[1:" not in out
    run(ip, capsys, "%pxconfig --targets all")


def test_load_ext_connects_on_first_use(ip, cluster, capsys, monkeypatch):
    monkeypatch.setenv("SHOAL_DIR", str(cluster[0].root))
    for name in [n for n in ip.magics_manager.magics["line"] if n.startswith(("px", "autopx", "pxresult"))]:
        del ip.magics_manager.magics["line"][name]
    ip.magics_manager.magics["cell"].pop("px", None)
    ip.run_line_magic("load_ext", "shoal")
    _, out, _ = run(ip, capsys, "%px 40 + 2")
    assert out.count("]: 42\n") == 2


def test_the_walkthrough_notebook_holds_the_scripts_cells():
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import walkthrough
    finally:
        sys.path.pop(0)
    nb = json.loads((ROOT / "examples" / "walkthrough.ipynb").read_text())
    code = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    assert code == walkthrough.CELLS
    seed = "".join(walkthrough.CELLS)
    assert "import ipyparallel" not in seed and "ipcluster" not in seed


def test_the_walkthrough_runs_cell_by_cell(tmp_path):
    env = dict(os.environ, SHOAL_DIR=str(tmp_path / "home"), XDG_RUNTIME_DIR=str(tmp_path / "run"))
    (tmp_path / "run").mkdir(mode=0o700)
    try:
        p = subprocess.run([sys.executable, str(ROOT / "examples" / "walkthrough.py")], env=env,
                           capture_output=True, text=True, timeout=170)
    finally:
        subprocess.run([sys.executable, "-m", "shoal", "stop"], env=env, capture_output=True, timeout=60)
    out = p.stdout
    assert p.returncode == 0, out[-3000:] + p.stderr[-3000:]
    assert "walk-through: 28 cells, 0 failed" in out
    assert "Out[3]: [0, 1, 2, 3]" in out and "Out[4]: <DirectView [0, 1, 2, 3]>" in out
    assert "Out[0:1]: " in out and "Out[3:3]: 'bar on pid " in out
    assert "Out[11]: <AsyncResult: scatter>" in out and "Out[12]: [None, None, None, None]" in out
    assert "[stdout:0] \nLen 250\nMax 249\n[stdout:1] \nLen 250\nMax 499\n" in out
    assert "Out[15]: 'ID:3'" in out
    assert "1000\n['ID:0', 'ID:3', 'ID:6', 'ID:9', 'ID:12', 'ID:15', 'ID:18', 'ID:21', 'ID:24', 'ID:27']" in out
    assert "Out[22]: <LoadBalancedView None>" in out


def test_px_stream_prints_output_as_it_arrives(ip, rc, capsys, tmp_path):
    import threading
    import time
    go = tmp_path / "go"
    seen = []

    def watch():  # waits for "early" to be printed while the cell still runs, then lets it finish
        text, deadline = "", time.monotonic() + 30
        while "early" not in text and time.monotonic() < deadline:
            text += capsys.readouterr().out
            time.sleep(0.01)
        seen.append(text)
        go.touch()
    t = threading.Thread(target=watch)
    t.start()
    _, out, _ = run(ip, capsys, "%%px --stream --targets 0\nimport os, time\nprint('early', flush=True)\n"
                                f"while not os.path.exists({str(go)!r}): time.sleep(0.01)\nprint('late')\n5")
    t.join()
    assert seen == ["[stdout:0] \nearly\n"], "printed while the engine was still running"
    assert re.fullmatch(r"late\nOut\[0:\d+\]: 5\n", out), out


def test_map_results_arrive_in_order_as_they_come(rc, tmp_path):
    dv = rc[:]
    go = str(tmp_path / "go")
    first = 6 // len(dv)  # the items of engine 0's part

    def held(x, go=go, first=first):  # every engine but the first waits until told
        import os
        import time
        while x >= first and not os.path.exists(go):
            time.sleep(0.01)
        return x

    ar = dv.map_async(held, range(6))
    assert next(iter(ar)) == 0, "engine 0's part, while the others still run"
    assert not ar.ready()
    open(go, "w").close()
    assert list(ar) == list(range(6))
    lb = rc.load_balanced_view().map_async(lambda x: x * 2, range(8), chunksize=3)
    assert lb.get(10) == [0, 2, 4, 6, 8, 10, 12, 14]
    # progress counts items (their tasks finished); metadata, one per task
    assert lb.progress == 8 and len(lb.metadata) == 3 and lb.serial_time >= 0 and lb.wall_time >= 0


def test_display_outputs_of_the_engines(ip, rc, capsys):
    _, out, _ = run(ip, capsys, "%%px -o shown\nfrom IPython.display import display, HTML\n"
                                "display(HTML('<b>bold</b>'))\ndisplay({'k': 1})\n3")
    ar = ip.user_ns["shown"]
    assert len(ar.outputs) == 2
    for outputs in ar.outputs:
        assert [o["data"].get("text/html") for o in outputs] == ["<b>bold</b>", None]
        assert outputs[1]["data"]["text/plain"] == "{'k': 1}"
    assert out.startswith("[output:0]\n") and "[output:1]\n" in out and "{'k': 1}" in out
    assert re.search(r"Out\[1:\d+\]: 3\n$", out), out
    assert ar.metadata[0]["outputs"] == ar.outputs[0]
    one = rc[0].execute("display('again')", silent=False)
    one.get(10)
    assert one.outputs == [{"data": {"text/plain": "'again'"}, "metadata": {}}], "one engine: its list"


def test_ctrl_c_in_a_blocking_cell_interrupts_the_engines(ip, rc, capsys):
    import signal
    import threading
    import time
    # Ctrl-C while %%px blocks: SIGINT reaches this process's main thread.
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    t0 = time.monotonic()
    result, out, err = run(ip, capsys, "%%px\nimport time\nprint('started', flush=True)\ntime.sleep(30)")
    timer.join()
    assert time.monotonic() - t0 < 10, "the engines' code was interrupted"
    assert "Received Keyboard Interrupt. Sending signal SIGINT to engines..." in err
    assert out == "[stdout:0] \nstarted\n[stdout:1] \nstarted\n", "what they printed is shown"
    assert result.error_in_exec is None
    assert rc[:].apply_sync(lambda: 1) == [1, 1], "the engines go on"
    # Signal 0 (as kill -0) reaches no code: Ctrl-C stops the waiting only, and the engines
    # finish, as in ipyparallel (which says it sends signal 0, and raises nothing).
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    result, out, err = run(ip, capsys, "%%px --signal-on-interrupt 0\nimport time\ntime.sleep(3)\n'slept'")
    timer.join()
    assert result.error_in_exec is None
    assert "Received Keyboard Interrupt. Sending signal 0 to engines..." in err
    assert "'slept'" not in out, "the cell had not finished"
    assert ip.run_line_magic("pxresult", "") is None
    assert capsys.readouterr().out.count("'slept'") == 2, "the engines were not interrupted"


def test_progress_after(ip, rc, capsys):
    _, out, _ = run(ip, capsys, "%%px --progress-after 0.2\nimport time\ntime.sleep(0.8)\n7")
    assert re.search(r"%px: \[#+ *\] 2/2 tasks finished", out), out
    assert re.search(r"Out\[1:\d+\]: 7\n$", out), out
    _, out, _ = run(ip, capsys, "%%px\nimport time\ntime.sleep(0.3)\n8")
    assert "tasks finished" not in out, "no progress bar unless asked for"
    ip.run_line_magic("pxconfig", "--progress-after 0")
    try:
        _, out, _ = run(ip, capsys, "%px 9")
        assert "tasks finished" in out
    finally:
        ip.run_line_magic("pxconfig", "--progress-after -1")


def test_px_does_not_expand_the_clients_variables(ip, rc, capsys):
    # %px is ipyparallel's @no_var_expand: {x} and $x are the engines' code.
    ip.user_ns["x"] = "client"
    rc[:].push({"x": "engine"}, block=True)
    run(ip, capsys, '%px y = f"{x}"')
    assert rc[:].pull("y", block=True) == ["engine", "engine"]
    run(ip, capsys, "%px z = '$x'")
    assert rc[:].pull("z", block=True) == ["$x", "$x"]
    # %%px's options line is expanded as any magic's is; the cell is not.
    ip.user_ns["out_name"] = "the_output"
    run(ip, capsys, '%%px -o {out_name}\ny = f"{x}!"')
    assert isinstance(ip.user_ns["the_output"], shoal.AsyncResult)
    assert rc[:].pull("y", block=True) == ["engine!", "engine!"]


def test_group_outputs_order_collates_display_outputs(ip, rc, capsys):
    cell = ("from IPython.display import display\nprint('hi')\ndisplay('first')\ndisplay('second')\n1")
    _, out, _ = run(ip, capsys, "%%px --group-outputs=order\n" + cell)
    # stdout of every engine, then the first display output of each engine, then the second of each
    assert re.fullmatch(r"\[stdout:0\] \nhi\n\[stdout:1\] \nhi\n"
                        r"\[output:0\]\n'first'\n\[output:1\]\n'first'\n"
                        r"\[output:0\]\n'second'\n\[output:1\]\n'second'\n"
                        r"Out\[0:\d+\]: 1\nOut\[1:\d+\]: 1\n", out), out
    _, again, _ = run(ip, capsys, "%%px -r\n" + cell)
    assert re.sub(r"Out\[(\d):\d+\]", "", again) == re.sub(r"Out\[(\d):\d+\]", "", out), "-r is the same"
    _, out, _ = run(ip, capsys, "%%px --group-outputs=type\n" + cell)
    assert re.fullmatch(r"\[stdout:0\] \nhi\n\[stdout:1\] \nhi\n"
                        r"\[output:0\]\n'first'\n'second'\n\[output:1\]\n'first'\n'second'\n"
                        r"Out\[0:\d+\]: 1\nOut\[1:\d+\]: 1\n", out), out


def test_one_engines_view_shows_its_outputs_without_labels(ip, rc, capsys):
    _, out, _ = run(ip, capsys, "%%px --targets 0\nprint('hi')\ndisplay('shown')\n5")
    assert re.fullmatch(r"hi\n'shown'\nOut\[0:\d+\]: 5\n", out), out


def test_a_rich_value_is_displayed_with_its_label(ip, rc, capsys):
    from IPython.utils.capture import capture_output
    with capture_output() as io:
        ip.run_cell_magic("px", "", "from IPython.display import HTML\nHTML('<b>rich</b>')")
    values = [o.data for o in io.outputs if "text/html" in o.data]
    assert len(values) == 2, io.outputs
    for e, data in enumerate(values):
        assert data["text/html"] == "<b>rich</b>"
        assert re.fullmatch(rf"Out\[{e}:\d+\]: <IPython.core.display.HTML object>", data["text/plain"])


def test_nonblocking_px_prints_only_what_ipyparallel_prints(ip, rc, capsys):
    ip.run_line_magic("pxconfig", "--noblock --verbose")
    try:
        result, out, _ = run(ip, capsys, "%px print('quiet')")
        ar = result.result
        assert isinstance(ar, shoal.AsyncResult)
        assert out.startswith("Async parallel execution on engine(s): all\n"), out
        assert "[stdout:" not in out and "quiet" not in out
        ar.get(10)
        assert ar.stdout == ["quiet\n", "quiet\n"]
    finally:
        ip.run_line_magic("pxconfig", "--block --no-verbose")
    _, out, _ = run(ip, capsys, "%px 3")
    assert re.fullmatch(r"Out\[0:\d+\]: 3\nOut\[1:\d+\]: 3\n", out), out


def test_stream_errors_are_shown_once_then_raised_as_already_displayed(ip, rc, capsys, monkeypatch):
    result, out, err = run(ip, capsys, "%%px --stream\nraise RuntimeError(f'oops {2 * 21}')")
    e = result.error_in_exec
    assert isinstance(e, shoal.error.AlreadyDisplayedError) and isinstance(e, shoal.RemoteError)
    assert isinstance(e.original_error, shoal.CompositeError) and e.n == 2 and len(e.original_error.elist) == 2
    assert str(e) == "2 errors" and e.render_traceback() == ["2 errors"] and repr(e) == "<AlreadyDisplayedError(2 errors)>"
    assert "[0:execute]" in err and "[1:execute]" in err, "each engine's traceback, as it arrived"
    assert err.count("RuntimeError: oops 42") == 2
    assert "2 errors" in out + err, "IPython shows only the count"
    # After CompositeError.tb_limit tracebacks, one line per error.
    monkeypatch.setattr(shoal.CompositeError, "tb_limit", 1)
    with pytest.raises(shoal.error.AlreadyDisplayedError):
        ip.run_cell_magic("px", "--stream", "1 / 0")
    err = capsys.readouterr().err
    assert err.count("Traceback") == 1 and err.count("ZeroDivisionError") == 2, err
    # Without streaming, the CompositeError itself.
    with pytest.raises(shoal.CompositeError) as info:
        ip.run_cell_magic("px", "--no-stream", "1 / 0")
    assert not isinstance(info.value, shoal.error.AlreadyDisplayedError)
    capsys.readouterr()


def test_targets_as_ipyparallel_reads_them(ip, rc, capsys):
    view = rc.activate(targets=[1], suffix="_t")
    ids = rc.ids
    for text, want in ((":", ids), ("::2", ids[::2]), ("1::2", ids[1::2]), (":1", ids[:1]), ("-1:", ids[-1:]),
                       ("1", 1), ("[0,1]", [0, 1]), ("all", "all")):
        ip.run_line_magic("pxconfig_t", f"--targets={text}")
        assert view.targets == want, text
    ip.run_line_magic("pxconfig_t", "--targets 0 --verbose")
    _, out, _ = run(ip, capsys, "%%px_t --targets all\n4")
    assert re.fullmatch(r"Parallel execution on engine\(s\): all\nOut\[0:\d+\]: 4\nOut\[1:\d+\]: 4\n", out), out
    assert view.targets == 0, "--targets of one cell leaves the default alone"
    _, out, _ = run(ip, capsys, "%%px_t --targets ::-1\n4")
    assert out.startswith("Parallel execution on engine(s): [1, 0]\nOut[1:")
    _, out, _ = run(ip, capsys, "%px_t 5")
    assert re.fullmatch(r"Parallel execution on engine\(s\): 0\nOut\[0:\d+\]: 5\n", out), out
    result, _, _ = run(ip, capsys, "%pxconfig_t -t 1:2:3:4")
    assert "not a slice" in str(result.error_in_exec)
    # %result: ipyparallel's old name of %pxresult (of the magics without a suffix)
    run(ip, capsys, "%px 6")
    _, out, _ = run(ip, capsys, "%result")
    assert re.fullmatch(r"Out\[0:\d+\]: 6\nOut\[1:\d+\]: 6\n", out), out
