"""The errors a shoal user meets, named as ipyparallel names them."""

import builtins


class ShoalError(Exception):
    """Base class of shoal's errors."""


class RemoteError(ShoalError):
    """An exception raised on an engine, with the engine's traceback.

    ``engine_id``, ``ename`` (the exception's class name), ``evalue`` (its
    message), ``traceback`` (the remote traceback, as text) and ``task_id``.
    """

    def __init__(self, ename, evalue, traceback="", engine_id=None, task_id=None):
        self.ename, self.evalue, self.traceback = ename, evalue, traceback
        self.engine_id, self.task_id = engine_id, task_id
        super().__init__(ename, evalue)

    def __str__(self):
        where = f"[engine {self.engine_id}, task {self.task_id}] " if self.engine_id is not None else ""
        return f"{where}{self.ename}: {self.evalue}"

    def render_traceback(self):
        """The remote traceback, as IPython shows it."""
        return self.traceback.splitlines() if self.traceback else [str(self)]


class EngineError(RemoteError):
    """The engine could not run the task: it died, or it is not running."""

    def __init__(self, evalue, engine_id=None, task_id=None):
        super().__init__("EngineError", evalue, "", engine_id, task_id)

    def __str__(self):
        return self.evalue


class TimeoutError(builtins.TimeoutError, ShoalError):
    """A result did not arrive in time (also a builtins.TimeoutError)."""
