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

    def print_traceback(self, excid=None):
        """Prints the remote traceback."""
        print("\n".join(self.render_traceback()))


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
        super().__init__(_ename(first) if first else "CompositeError", _evalue(first) if first else "",
                         getattr(first, "traceback", ""), getattr(first, "engine_id", None),
                         getattr(first, "task_id", None))

    def _label(self, e):
        engine = getattr(e, "engine_id", None)
        return f"[{engine}:{self.method}]" if engine is not None else "[Engine Exception]"

    def __str__(self):
        lines = [f"one or more exceptions raised in: {self.fname}"]
        lines += [f"{self._label(e)}: {_ename(e)}: {_evalue(e)}" for e in self.elist[:self.tb_limit]]
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
            lines += e.render_traceback() if hasattr(e, "render_traceback") else [f"{_ename(e)}: {_evalue(e)}"]
            lines.append("")
        if len(self.elist) > self.tb_limit:
            lines.append(f"... {len(self.elist) - self.tb_limit} more exceptions ...")
        return lines

    def _render_traceback_(self):
        return self.render_traceback()

    def print_traceback(self, excid=None):
        """Prints every engine's traceback (the first four), or engine
        error excid's alone."""
        if excid is None:
            print("\n".join(self.render_traceback()))
        else:
            if not -len(self.elist) <= excid < len(self.elist):
                raise IndexError(f"an engine error with id {excid} does not exist (there are {len(self.elist)})")
            e = self.elist[excid]
            print("\n".join(e.render_traceback() if hasattr(e, "render_traceback") else [str(e)]))

    def raise_exception(self, excid=0):
        """Raises the excid-th engine's error."""
        if not -len(self.elist) <= excid < len(self.elist):
            raise IndexError(f"an engine error with id {excid} does not exist (there are {len(self.elist)})")
        raise self.elist[excid]


class AlreadyDisplayedError(RemoteError):
    """The errors of a cell whose engines' tracebacks were already shown
    (``%%px --stream`` prints each as it arrives), as ipyparallel raises it:
    IPython then shows only "N errors" instead of the tracebacks again.

    ``original_error`` is the CompositeError that get() raised; ``n``, how
    many engines failed.
    """

    def __init__(self, original_error):
        self.original_error = original_error
        self.n = len(getattr(original_error, "elist", [original_error]))
        super().__init__(_ename(original_error), _evalue(original_error),
                         getattr(original_error, "traceback", ""), getattr(original_error, "engine_id", None),
                         getattr(original_error, "task_id", None))

    def __repr__(self):
        return f"<{type(self).__name__}({self.n} errors)>"

    def __str__(self):
        return f"{self.n} errors"

    def render_traceback(self):
        """One line, "N errors": the tracebacks were shown already."""
        return [str(self)]


def _ename(e):
    return getattr(e, "ename", type(e).__name__)


def _evalue(e):
    return getattr(e, "evalue", str(e))


class TaskAborted(ShoalError):
    """The task was aborted before it started."""


class SchedulerError(RemoteError):
    """A task's end that the scheduler decided (no engine ran it to an
    error of its own): a RemoteError whose ename is the class's name, as
    ipyparallel's scheduler, in another process, reports it. So both
    ``except TaskTimeout`` and ``except RemoteError`` catch it."""

    def __init__(self, message="", engine_id=None, task_id=None):
        super().__init__(type(self).__name__, message, "", engine_id, task_id)

    def __reduce__(self):
        return type(self), (self.evalue, self.engine_id, self.task_id)


class TaskTimeout(SchedulerError):
    """The task's dependencies were not met within its timeout (or no engine
    was left to retry it on within it)."""


class UnmetDependency(SchedulerError):
    """Raised on an engine where a task's @depend condition does not hold:
    the load balancer tries another engine."""


class ImpossibleDependency(UnmetDependency):
    """A task's dependencies can never be met: a task it follows failed, or
    no engine satisfies its condition."""


class DependencyTimeout(ImpossibleDependency):
    """A task's dependencies were not met in time (ipyparallel's name;
    shoal raises TaskTimeout for that)."""


class InvalidDependency(ImpossibleDependency):
    """A dependency that can never be checked: a msg_id the client never
    sent, or that was purged."""


class NoEnginesRegistered(ShoalError):
    """An operation that needs engines, with none registered."""

    def __str__(self):
        return "this operation needs engines: Client.wait_for_engines(n) waits for n to register"
