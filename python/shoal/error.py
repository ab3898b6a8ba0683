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

    def _render_traceback_(self):
        # IPython shows this instead of the local traceback.
        return self.render_traceback()


class EngineError(RemoteError):
    """The engine could not run the task: it died, or it is not running."""

    def __init__(self, evalue, engine_id=None, task_id=None):
        super().__init__("EngineError", evalue, "", engine_id, task_id)

    def __str__(self):
        return self.evalue


class TimeoutError(builtins.TimeoutError, ShoalError):
    """A result did not arrive in time (also a builtins.TimeoutError)."""


class CompositeError(RemoteError):
    """Errors from several engines at once, as ipyparallel raises them for a
    view of a list of engines.

    ``elist`` holds the engines' errors (RemoteError or EngineError) in
    target order; ``raise_exception(i)`` raises the i-th of them. Each is
    labelled ``[engine:method]`` (method: execute, apply, ...).
    """

    tb_limit = 4

    def __init__(self, fname, errors, method=None):
        self.fname, self.method, self.elist = fname, method or fname, list(errors)
        first = self.elist[0] if self.elist else None
        super().__init__(first.ename if first else "CompositeError", first.evalue if first else "",
                         first.traceback if first else "", first.engine_id if first else None,
                         first.task_id if first else None)

    def _label(self, e):
        return f"[{e.engine_id}:{self.method}]" if e.engine_id is not None else "[Engine Exception]"

    def __str__(self):
        lines = [f"one or more exceptions raised in: {self.fname}"]
        lines += [f"{self._label(e)}: {e.ename}: {e.evalue}" for e in self.elist[:self.tb_limit]]
        if len(self.elist) > self.tb_limit:
            lines.append(f".... {len(self.elist) - self.tb_limit} more exceptions ...")
        return "\n".join(lines)

    def __repr__(self):
        return f"CompositeError({len(self.elist)})"

    def render_traceback(self):
        """Each engine's traceback (the first four), as IPython shows them."""
        lines = []
        for e in self.elist[:self.tb_limit]:
            lines.append(f"{self._label(e)}:")
            lines += e.render_traceback()
            lines.append("")
        if len(self.elist) > self.tb_limit:
            lines.append(f"... {len(self.elist) - self.tb_limit} more exceptions ...")
        return lines

    def _render_traceback_(self):
        return self.render_traceback()

    def raise_exception(self, excid=0):
        """Raises the excid-th engine's error."""
        if not -len(self.elist) <= excid < len(self.elist):
            raise IndexError(f"an engine error with id {excid} does not exist (there are {len(self.elist)})")
        raise self.elist[excid]
