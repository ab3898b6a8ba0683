"""Dependencies of load-balanced tasks, as ipyparallel has them: `after`
(run once other tasks have finished), `follow` (run where they ran),
@depend (run only on an engine where a condition holds), with `timeout` and
`retries`. The client holds a task until it may run; no engine waits.
"""

import functools
import time

from .asyncresult import AsyncResult
from .error import ImpossibleDependency, InvalidDependency, TaskAborted, TaskTimeout, UnmetDependency


class Dependency(set):
    """Tasks (AsyncResults or msg_ids) that another task depends on.

    all: every one of them must be met (else any one); success / failure:
    whether a task that succeeded / failed counts as met.
    """

    def __init__(self, dependencies=(), all=True, success=True, failure=False):
        if isinstance(dependencies, (AsyncResult, int)) or hasattr(dependencies, "msg_id"):
            dependencies = [dependencies]
        super().__init__(d.msg_id if hasattr(d, "msg_id") else d for d in dependencies)
        self.all, self.success, self.failure = all, success, failure
        if not (success or failure):
            raise ValueError("a dependency must be met by success, failure, or both")

    def state(self, client):
        """True (met), False (cannot be met any more) or None (not yet)."""
        if not self:
            return True
        met = unmet = 0
        for mid in self:
            ended = _how_ended(client, mid)
            if ended is None:
                continue  # still running
            ok = ended[0]
            if (ok and self.success) or (not ok and self.failure):
                met += 1
            else:
                unmet += 1
        if self.all:
            return False if unmet else (True if met == len(self) else None)
        return True if met else (False if unmet == len(self) else None)

    def check(self, completed, failed=None):
        """Whether the dependency is met, given the msg_ids that completed
        (succeeded) and failed, as ipyparallel's scheduler checks it."""
        if not self:
            return True
        against = set(completed) if self.success else set()
        if failed is not None and self.failure:
            against |= set(failed)
        return self.issubset(against) if self.all else not self.isdisjoint(against)

    def unreachable(self, completed, failed=None):
        """Whether it can no longer be met, given those msg_ids."""
        if not self:
            return False
        against = set() if self.success else set(completed)
        if failed is not None and not self.failure:
            against |= set(failed)
        return not self.isdisjoint(against) if self.all else self.issubset(against)

    def as_dict(self):
        return dict(dependencies=list(self), all=self.all, success=self.success, failure=self.failure)

    def engines(self, client):
        """Where the tasks ran: every one (all) or any one of them."""
        sets = [e[1] for e in (_how_ended(client, mid) for mid in self) if e is not None]
        if not sets:
            return None
        return set.intersection(*sets) if self.all else set.union(*sets)


def _how_ended(client, mid):
    """client._how_ended(mid), or InvalidDependency saying why it is not known."""
    try:
        return client._how_ended(mid)
    except KeyError:
        raise InvalidDependency(
            f"this client sent no task with msg_id {mid}, purged it, or it finished more than "
            f"Client.history_limit ({client.history_limit}) tasks ago and its AsyncResult is gone: keep the "
            f"AsyncResult (or raise history_limit) to depend on it") from None


def _as_dependency(dep):
    if dep is None or isinstance(dep, Dependency):
        return dep or None
    return Dependency(dep)


def depend(f, *args, **kwargs):
    """Decorator: the task runs only on an engine where f(*args, **kwargs)
    is true; elsewhere it raises UnmetDependency and the load balancer tries
    another engine (ImpossibleDependency once none is left)."""
    def deco(g):
        return _Depends(g, f, args, kwargs)
    return deco


class _Depends:
    def __init__(self, g, f, args, kwargs):
        self.func, self.cond = g, (f, args, kwargs)
        functools.update_wrapper(self, g, updated=())  # not g.__dict__: it would overwrite ours

    def __call__(self, *args, **kwargs):
        f, fargs, fkwargs = self.cond
        if not f(*fargs, **fkwargs):
            raise UnmetDependency(f"{getattr(f, '__name__', f)} does not hold on this engine")
        return self.func(*args, **kwargs)


class TaskResult(AsyncResult):
    """A load-balanced task's result: the client holds the task until its
    dependencies are met, then sends it (again, on another engine, for a
    retry or an unmet @depend)."""

    _counted = False  # its attempts are, on the engines they ran on

    # Defaults in the class, set on the instance only when they differ: an
    # instance of more than 30 attribute names gets a dict of its own
    # (about 1.5 KiB), where fewer share the class's keys.
    _after = _follow = None  # Dependency: tasks it runs after / where they ran
    _deadline = _timeout = None
    _retries = 0
    _tried = frozenset()  # engines where its @depend did not hold
    _failed_on = frozenset()  # engines where an attempt failed
    _last_failure = None
    _final = False
    _attempt = None

    def __init__(self, view, f, args, kwargs, after=None, follow=None, timeout=None, retries=0):
        client = view.client
        super().__init__(client, next(client._lane_ids), [], "apply")
        self._single = True
        self._fname = getattr(f, "__name__", "apply")
        self._view, self._call = view, (f, args, kwargs)
        if after is not None or follow is not None:
            self._after, self._follow = _as_dependency(after), _as_dependency(follow)
        if timeout is not None:
            self._deadline = None if timeout < 0 else time.monotonic() + timeout
            self._timeout = timeout
        if retries:
            self._retries = retries
        client._by_id[self.msg_id] = self
        client.history.append(self.msg_id)

    def _done(self):
        return self._final

    def _end(self, engine, ok, value, meta=None):
        if self._final:
            return
        self._targets = [engine]
        self._results = {engine: (ok, value)}
        if meta:
            self._meta = {engine: meta}
        self._final = True
        # What only sending it needed goes: its arguments above all (a
        # finished task may be held by the million).
        self._call = None
        if self._after is not None or self._follow is not None:
            self._after = self._follow = None
        self._finished()

    def _fail_here(self, exc):
        self._end(None, False, exc, {"engine_id": None, "status": "error", "received": time.time(),
                                     "ename": type(exc).__name__, "evalue": str(exc)})

    def _has_work(self):
        """Not yet sent, or being retried: the client's thread keeps at it."""
        return not self._final and self._attempt is None

    def _tick(self):
        """Sends the task if it may run now; ends it if it never can."""
        if self._final or self._attempt is not None:
            return
        try:
            self._try_send()
        except Exception as e:  # its arguments cannot be pickled, a dependency was purged, ...
            self._fail_here(e)

    def _try_send(self):
        client = self._client
        for dep in (self._after, self._follow):
            state = dep.state(client) if dep else True
            if state is False:
                return self._fail_here(ImpossibleDependency(
                    f"task {self.msg_id}: a task it depends on ended the wrong way"))
            if state is None:
                if self._deadline is not None and time.monotonic() >= self._deadline:
                    return self._fail_here(TaskTimeout(
                        f"task {self.msg_id}: its dependencies were not met within {self._timeout} s"))
                return
        engines = set(self._view._engines()) - self._tried
        if not self._follow and not self._tried and not self._failed_on:
            # Any of the view's engines will do: into the pool, if there is one.
            pool = self._view._pool()
            f, args, kwargs = self._call
            ar = self._view._apply_pooled(pool, f, args, kwargs) if pool is not None else None
            if ar is not None:
                self._forget_attempt(ar)
                self._attempt = ar
                ar._on_done(lambda ar: self._attempt_done(ar._targets[0], ar))
                return
        if self._follow:
            where = self._follow.engines(client)
            engines &= where if where is not None else set()
        if not engines:
            return self._fail_here(ImpossibleDependency(
                f"task {self.msg_id}: no engine can run it (tried {sorted(self._tried)})"))
        fresh = engines - self._failed_on  # a retry goes to an engine where it has not failed, as in ipyparallel
        if not fresh:
            # Failed everywhere: it waits for an engine to join until its
            # timeout, as ipyparallel's scheduler holds it; without one, it
            # ends with its last error rather than wait for ever.
            if self._deadline is None:
                return self._end(*self._last_failure)
            if time.monotonic() >= self._deadline:
                return self._fail_here(TaskTimeout(
                    f"task {self.msg_id}: it failed on every engine ({sorted(self._failed_on)}) and no other "
                    f"came within {self._timeout} s"))
            return
        load = client._lb_load
        engine = min(fresh, key=lambda e: load.get(e, 0))
        f, args, kwargs = self._call
        self._attempt = self._view._apply_on(engine, f, args, kwargs)
        self._forget_attempt(self._attempt)
        self._attempt._on_done(lambda ar, e=engine: self._attempt_done(e, ar))

    def _forget_attempt(self, ar):
        """The client's history lists this task once, by its own msg_id,
        not each attempt at it."""
        ar._recorded = False  # nor does the client remember its ending: this task's is
        history = self._client.history
        if history and history[-1] == ar.msg_id:
            history.pop()

    def _attempt_done(self, engine, ar):
        self._attempt = None
        ok, value = ar._results[engine]
        meta = ar._meta.get(engine)
        if not ok and getattr(value, "ename", None) == "UnmetDependency":
            self._tried |= {engine}
        elif not ok and self._retries > 0 and not isinstance(value, TaskAborted):
            self._retries -= 1
            self._failed_on |= {engine}
            self._last_failure = (engine, ok, value, meta)
        else:
            return self._end(engine, ok, value, meta)
        self._tick()
        if self._has_work():
            self._client._routes.drive(self)

    def _abort(self):
        """Aborts the task if it has not started: True if it had not."""
        if self._final:
            return False
        if self._attempt is None:
            self._fail_here(TaskAborted(f"task {self.msg_id} was aborted before it started"))
            return True
        return self._client._abort_sent(self._attempt)
