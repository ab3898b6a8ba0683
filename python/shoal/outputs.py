"""How an AsyncResult's outputs are shown, as ipyparallel shows them: each
engine's stdout and stderr in ``[stdout:0]`` blocks, display data through
IPython's publisher (or as text without IPython), then ``Out[0:1]: value``
for each engine's cell value. Used by ``AsyncResult.display_outputs`` and
by the %px magics (shoal.magics); it needs neither a client nor IPython.
"""

import sys

from .error import AlreadyDisplayedError, CompositeError

GROUPBY = ("type", "engine", "order")


def _publisher():
    """IPython's publish_display_data while an IPython runs, else None
    (display outputs are then printed as text)."""
    try:
        from IPython import get_ipython
        if get_ipython() is not None:
            from IPython.display import publish_display_data
            return publish_display_data
    except ImportError:
        pass
    return None


def _print_stream(ar, name, engine, text, file):
    """One engine's stdout or stderr, under "[stdout:0] " (no prefix for a
    view of one engine)."""
    if not text:
        return
    prefix = "" if ar._single else f"[{name}:{engine}] \n"
    print(prefix + text, end="" if text.endswith("\n") else "\n", file=file)


def _print_output(output, engine, label=True):
    """One display() output of an engine, under "[output:0]" (label=False:
    without): shown richly in IPython, as text elsewhere."""
    if label:
        print(f"[output:{engine}]")
    publish = _publisher()
    if publish is not None:
        publish(data=output["data"], metadata=dict(output.get("metadata") or {}, engine=engine))
    else:
        print(output["data"].get("text/plain", ""))


def _outputs(ar, engine):
    return ar._meta.get(engine, {}).get("outputs") or []


def _result(ar, engine):
    return ar._meta.get(engine, {}).get("execute_result")


def _print_result(ar, engine):
    """The engine's cell value as "Out[0:1]: value" (engine 0, its cell 1);
    in IPython, with the value's other representations (HTML, ...) beside
    that text, as ipyparallel displays it."""
    md = ar._meta.get(engine, {})
    result = md.get("execute_result")
    if not result:
        return
    data = dict(result.get("data") or {})
    text = data.get("text/plain", "")
    if "\n" in text and not text.startswith("\n"):
        text = "\n" + text
    data["text/plain"] = f"Out[{engine}:{md.get('execution_count')}]: {text}"
    publish = _publisher()
    if publish is not None:
        publish(data=data, metadata=result.get("metadata") or {})
    else:
        print(data["text/plain"])


def display_outputs(ar, groupby="type"):
    """Prints what a finished (or failed) execute printed, displayed and
    returned, per engine, as ipyparallel's AsyncResult.display_outputs:

    - "type": every engine's stdout, then every stderr, then each engine's
      display outputs under one "[output:0]", then the values;
    - "engine": all of engine 0's (its "[output:0]" before its display
      outputs and its value), then engine 1's, ...;
    - "order": as "type", but the display outputs collated: the first of
      each engine (each under its "[output:N]"), then the second of each...

    A view of one engine shows its outputs without the "[stdout:0]" /
    "[output:0]" labels."""
    if groupby not in GROUPBY:
        raise ValueError(f"groupby must be one of {', '.join(map(repr, GROUPBY))}, not {groupby!r}")
    engines = [e for e in ar._targets if e in ar._meta]
    label = not ar._single
    if groupby == "engine":
        for e in engines:
            _print_stream(ar, "stdout", e, ar._stdout.get(e, ""), sys.stdout)
            _print_stream(ar, "stderr", e, ar._stderr.get(e, ""), sys.stderr)
            if label and (_outputs(ar, e) or _result(ar, e)):
                print(f"[output:{e}]")
            for out in _outputs(ar, e):
                _print_output(out, e, label=False)
            _print_result(ar, e)
        return
    for e in engines:
        _print_stream(ar, "stdout", e, ar._stdout.get(e, ""), sys.stdout)
    for e in engines:
        _print_stream(ar, "stderr", e, ar._stderr.get(e, ""), sys.stderr)
    if groupby == "order":
        for i in range(max((len(_outputs(ar, e)) for e in engines), default=0)):
            for e in engines:
                if i < len(_outputs(ar, e)):
                    _print_output(_outputs(ar, e)[i], e, label)
    else:
        for e in engines:
            if label and _outputs(ar, e):
                print(f"[output:{e}]")
            for out in _outputs(ar, e):
                _print_output(out, e, label=False)
    for e in engines:
        _print_result(ar, e)


def stream_outputs(ar):
    """Prints what the engines print while ar runs, as it arrives (each
    piece under its engine's "[stdout:0] " line, repeated when the engine
    changes); as each engine finishes, its display outputs (each under
    "[output:0]") and its value, or its error's traceback on stderr (the
    first CompositeError.tb_limit in full, the others in one line each),
    as ipyparallel streams them."""
    shown = {}
    finished = set()
    # The last prefix shown (on either stream), and whether each stream's
    # last line is complete.
    state = {"prefix": None, "errors": 0}
    complete = {"stdout": True, "stderr": True}
    files = {"stdout": sys.stdout, "stderr": sys.stderr}

    def end_line(name):
        if not complete[name]:
            print(file=files[name])
            complete[name] = True

    def emit(name, engine, text):
        prefix = f"[{name}:{engine}] "
        if state["prefix"] != prefix:
            end_line(name)
            print(prefix, file=files[name])
            state["prefix"] = prefix
        print(text, end="", file=files[name], flush=True)
        complete[name] = text.endswith("\n")

    def show_error(engine, err):
        end_line("stderr")
        state["prefix"] = None
        state["errors"] += 1
        if state["errors"] <= CompositeError.tb_limit and hasattr(err, "render_traceback"):
            print("\n".join([f"[{engine}:execute]"] + err.render_traceback()), file=sys.stderr)
        else:
            print(err, file=sys.stderr)

    def catch_up():
        for e in ar._targets:
            for name, store in (("stdout", ar._stdout), ("stderr", ar._stderr)):
                text = store.get(e, "")
                if len(text) > shown.get((name, e), 0):
                    emit(name, e, text[shown.get((name, e), 0):])
                    shown[(name, e)] = len(text)
            if e in ar._results and e not in finished:
                finished.add(e)
                ok, value = ar._results[e]
                outputs, result = _outputs(ar, e), _result(ar, e)
                if outputs or result:
                    end_line("stdout")
                    state["prefix"] = None
                for out in outputs:
                    _print_output(out, e)
                if result:
                    _print_result(ar, e)
                if not ok:
                    show_error(e, value)

    while not ar.wait(0.05):
        catch_up()
    catch_up()
    end_line("stdout")
    end_line("stderr")


__all__ = ["GROUPBY", "display_outputs", "stream_outputs"]
