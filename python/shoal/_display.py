"""IPython on an engine: one shell, made the first time a task needs it.

ipyparallel's engines are IPython kernels. A shoal engine starts IPython
only when user code needs it, so that plain Python and `apply` pay nothing
for it:

- the first time the user's code imports IPython.core.display_functions
  (which IPython.display does), display() is wrapped so that its first call
  makes the shell, whose display publisher keeps each output with the
  running task's reply (AsyncResult.outputs);
- a cell of `execute` that is not plain Python (`%magic`, `!cmd`, `x?`)
  makes it to translate the cell (see _engine.run_cell).

There is one shell, and its user_ns IS the engine's namespace: the module
that is `sys.modules["__main__"]` when it is made (IPython's own would put
a new `__main__` in sys.modules, and functions of the client's `__main__`,
whose globals are `sys.modules["__main__"].__dict__` on the engine, would
no longer see what execute and push put in the engine's namespace).
"""

import functools
import importlib.abc
import importlib.util
import os
import sys

_sink = None  # where outputs go: a list of {"data", "metadata"} of the running task
_shell = None  # the engine's InteractiveShell, once made


class _Publisher:
    """IPython's display publisher, keeping what it is given."""

    def publish(self, data, metadata=None, source=None, *, transient=None, update=False, **kwargs):
        if _sink is not None:
            _sink.append({"data": _jsonable(data), "metadata": _jsonable(metadata or {})})

    def clear_output(self, wait=False):
        pass

    def set_parent(self, parent):
        pass


def _jsonable(d):
    """Output data as JSON takes it, however deep: bytes become base64 text,
    anything else JSON has no type for becomes its str()."""
    import base64
    import json

    def default(v):
        return base64.b64encode(v).decode() if isinstance(v, bytes) else str(v)
    return json.loads(json.dumps(d, default=default))


def _print_page(data, start=0, screen_lines=0, pager_cmd=None):
    """IPython's pager on an engine (`x?`, `%pinfo`): the text goes to the
    task's stdout; a terminal pager there would wait for a key nobody presses."""
    if isinstance(data, dict):
        data = data.get("text/plain", "")
    print("\n".join(str(data).splitlines()[start:]))


def _engine_shell_class():
    from IPython.core import pylabtools
    from IPython.core.error import UsageError
    from IPython.core.interactiveshell import InteractiveShell

    class EngineShell(InteractiveShell):
        """InteractiveShell as an engine needs it: no GUI event loop (an
        engine has none to run), matplotlib inline by default (as on an
        IPython kernel), and no virtualenv guessing (the engine already runs
        its environment's Python)."""

        def init_virtualenv(self):
            pass

        def init_magics(self):
            super().init_magics()
            # IPython's %gui logs enable_gui's error and succeeds; on an engine
            # the task fails with it instead.
            self.register_magic_function(lambda line: self.enable_gui(line.strip() or None), "line", "gui")

        def enable_gui(self, gui=None):
            if gui is not None:
                raise UsageError(f"%gui {gui}: a shoal engine has no GUI event loop to run; "
                                 "use %matplotlib inline, whose figures come back as display outputs")

        def enable_matplotlib(self, gui=None):
            if gui is None and not os.environ.get("MPLBACKEND"):
                gui = "inline"  # an IPython kernel's default, so an ipyparallel engine's
            loop, backend = pylabtools.find_gui_and_backend(gui, self.pylab_gui_select)
            if loop is not None:
                raise UsageError(f"%matplotlib {gui}: backend {backend!r} needs a GUI event loop, which a "
                                 "shoal engine does not have; use %matplotlib inline, whose figures come back "
                                 "as display outputs")
            return super().enable_matplotlib(gui)

    return EngineShell


def shell():
    """The engine's InteractiveShell, made on the first call; None if
    IPython is not installed. Its user_ns is `sys.modules["__main__"].__dict__`,
    the engine's namespace, and stays so (the module is not replaced)."""
    global _shell
    if _shell is not None:
        return _shell
    try:
        from IPython.core import page
        from IPython.core.interactiveshell import InteractiveShell
        from traitlets.config import Config
    except ImportError:
        return None
    if InteractiveShell.initialized():  # user code made one: use it, as display() does
        _shell = InteractiveShell.instance()
        return _shell
    config = Config()
    config.HistoryManager.enabled = False  # an engine keeps no IPython history
    config.InteractiveShell.colors = "nocolor"  # tracebacks and %whos go to a task's stdout as plain text
    main = sys.modules["__main__"]
    made = _engine_shell_class().instance(config=config, user_module=main)
    made.display_pub = _Publisher()
    made.set_hook("show_in_pager", page.as_hook(_print_page))
    _shell = made
    return made


def current():
    """The engine's shell if one has been made, else None (it makes none)."""
    return _shell


def execution_info(code, silent):
    """IPython's ExecutionInfo of an execute task's cell (IPython imported)."""
    from IPython.core.interactiveshell import ExecutionInfo
    return ExecutionInfo(code, store_history=False, silent=silent, shell_futures=True, cell_id=None)


def execution_result(info):
    from IPython.core.interactiveshell import ExecutionResult
    return ExecutionResult(info)


def _wrap(module):
    real = module.display

    @functools.wraps(real)  # IPython's name and doc (%whos, help() show them)
    def display(*objs, **kwargs):
        shell()
        return real(*objs, **kwargs)
    module.display = display


class _Finder(importlib.abc.MetaPathFinder):
    """Wraps IPython.core.display_functions.display when it is imported."""

    NAME = "IPython.core.display_functions"

    def find_spec(self, name, path, target=None):
        if name != self.NAME:
            return None
        sys.meta_path.remove(self)  # once; and so that the real finders answer
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        real_exec = spec.loader.exec_module

        def exec_module(module):
            real_exec(module)
            _wrap(module)
        spec.loader.exec_module = exec_module
        return spec


def install():
    """Makes display() on this engine publish into the running task's
    outputs, and a builtin, as in IPython (and so on ipyparallel's engines)."""
    mod = sys.modules.get(_Finder.NAME)
    if mod is not None:
        _wrap(mod)
    else:
        sys.meta_path.insert(0, _Finder())
    import builtins
    if not hasattr(builtins, "display"):
        builtins.display = _builtin_display


def _builtin_display(*objs, **kwargs):
    """display() without an import: IPython's (through our wrapper).
    Imported on first use, so an engine that never displays never imports IPython."""
    from IPython.display import display
    return display(*objs, **kwargs)


def collect(outputs):
    """Sends what display() publishes into outputs (None: nowhere)."""
    global _sink
    _sink = outputs
