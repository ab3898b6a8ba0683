"""Rich display output on an engine: what IPython's display() shows there is
kept with the task's reply (AsyncResult.outputs), as ipyparallel's engines,
which are IPython kernels, publish it.

An engine does not start IPython for every task: the first time the user's
code imports IPython.core.display_functions (which IPython.display does),
display() is wrapped so that its first call sets up an InteractiveShell
whose display publisher hands each output to the engine.
"""

import importlib.abc
import importlib.util
import sys

_sink = None  # where outputs go: a list of {"data", "metadata"} of the running task


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


def _shell():
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config
    if not InteractiveShell.initialized():
        config = Config()
        config.HistoryManager.enabled = False  # an engine keeps no IPython history
        # The engine's namespace is the shell's: with a user module of its
        # own, IPython would put that one in sys.modules["__main__"], and
        # functions of the client's __main__ (whose globals are the
        # engine's __main__ there) would stop seeing what execute and push
        # put in the engine's namespace.
        shell = InteractiveShell.instance(config=config, user_module=sys.modules["__main__"])
        shell.display_pub = _Publisher()
    return InteractiveShell.instance()


def _wrap(module):
    real = module.display

    def display(*objs, **kwargs):
        _shell()
        return real(*objs, **kwargs)
    display.__wrapped__ = real
    display.__doc__ = real.__doc__
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
    """Makes display() on this engine publish into the running task's outputs."""
    mod = sys.modules.get(_Finder.NAME)
    if mod is not None:
        _wrap(mod)
    else:
        sys.meta_path.insert(0, _Finder())


def collect(outputs):
    """Sends what display() publishes into outputs (None: nowhere)."""
    global _sink
    _sink = outputs
