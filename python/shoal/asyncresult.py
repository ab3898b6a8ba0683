"""AsyncResult and AsyncMapResult: what a non-blocking call returns.

Each is a concurrent.futures.Future, as ipyparallel's are: ``result()``
is ``get()``, ``exception()`` the error ``get()`` would raise, and
``concurrent.futures.wait`` / ``as_completed``, ``add_done_callback``,
``asyncio.wrap_future`` and ``await`` work. A result is received by
whoever waits for it through the client (get, wait, ready); a Future's
waiters (wait, as_completed, a callback, an awaiting event loop) are not
such a thread, so while one of them waits the client's own thread receives
for it (Routes.drive, in routes.py).
"""

import asyncio
import base64
import concurrent.futures
import datetime
import json
import sys
import threading
import time
import types
import weakref
from concurrent.futures._base import FINISHED

from . import outputs, serialize
from ._records import Reply
from .error import CompositeError, EngineError, RemoteError, TaskAborted, TimeoutError


# What a result holds in place of a dict or list it has not needed yet
# (nothing printed, nothing published, no callback): one shared, empty and
# read-only, so that each of a million finished tasks does not keep a
# handful of empty containers (64 bytes each). Who writes makes its own first.
_NOTHING = types.MappingProxyType({})


class _Waiters(list):
    """A Future's list of waiters (concurrent.futures.wait and
    as_completed add theirs to it): one added sets the client's thread
    receiving for the result, which nobody else may be doing."""

    __slots__ = ("ar",)

    def __init__(self, ar):
        super().__init__()
        self.ar = weakref.ref(ar)  # not a cycle: the result goes when its holders let it go

    def append(self, waiter):
        super().append(waiter)
        ar = self.ar()
        if ar is not None:
            ar._client._routes.want(ar)


class _Future(concurrent.futures.Future):
    """What every result of shoal's is, besides its own API: a Future whose
    state follows the task's (see the module's doc). Subclasses define
    _done() (every answer is in), _error() (what get() raises, or None)
    and get(timeout), and call _resolve() once _done() holds."""

    def __init__(self, client):
        # Future's own __init__ is not called: its condition variable (1.4 us
        # of a 60 us round trip) is made only if a Future's waiter asks for
        # it (_condition, below). These are the rest of its state.
        self._client = client
        self._state = "RUNNING"  # sent (or held until its dependencies are met): it cannot be cancelled
        self._result = self._exception = None

    _done_callbacks = ()  # ours run through add_done_callback's list (Future's invoker is never called)
    _cond = _w = None  # the condition variable and the waiters, once made (below)

    @property
    def _waiters(self):
        """Future's list of waiters, made on first use: it refers back to
        the result, and a cycle for every result would leave them all to
        the cyclic garbage collector."""
        waiters = self.__dict__.get("_w")
        return waiters if waiters is not None else self.__dict__.setdefault("_w", _Waiters(self))

    @property
    def _condition(self):
        """Future's condition variable, made on first use (setdefault: one
        of two threads making it at once wins, under the GIL)."""
        cond = self.__dict__.get("_cond")
        return cond if cond is not None else self.__dict__.setdefault("_cond", threading.Condition())

    def _resolve(self):
        """Marks the Future finished, once, and tells its waiters (not its
        callbacks: those run as the client receives, see add_done_callback).
        The value is not stored: result() joins it when asked, as get() does.

        The state is set before the condition variable is looked for: a
        waiter makes the condition, then reads the state under it, and
        either sees it finished or is waiting on it when it is notified
        here. So a result nobody waits for through a Future costs no lock."""
        if self._state == FINISHED:
            return
        self._state = FINISHED  # (exception() and result() read the error from the answers, not _exception)
        cond = self._cond  # not self.__dict__: reading that makes the instance a dict (64 bytes a result)
        if cond is None:
            return
        error = self._exception = self._error()
        with cond:
            for waiter in self._w or ():
                if error is None:
                    waiter.add_result(self)
                else:
                    waiter.add_exception(self)
            cond.notify_all()

    # Whether a Future's waiter or a callback waits for it: then the
    # client's thread receives while it is pending (Routes._drive_loop).
    _wanted = False

    def _has_work(self):
        """Whether it has tasks to hand out (see LoadBalancedView): none."""
        return False

    def add_done_callback(self, fn):
        """Calls fn(self) once the result is complete (at once if it is),
        from the thread that receives it; the client's thread receives
        while it is pending."""
        with self._client._lock:  # the client's thread may be completing it right now
            if not self._done():
                self._callback(fn)
                self._client._routes.want(self)
                return
        fn(self)

    def _on_done(self, fn):
        """add_done_callback for shoal's own bookkeeping, which whoever
        waits for the result receives: no thread of the client's is set
        going for it."""
        with self._client._lock:  # fn too: it must not run beside the receiving thread's call of it
            if not self._done():
                self._callback(fn)
                return
            fn(self)

    def _callback(self, fn):
        """Adds fn to the callbacks (a list made on the first; under the client's lock)."""
        if self._callbacks:
            self._callbacks.append(fn)
        else:
            self._callbacks = [fn]

    def done(self):
        """Whether the result is complete (ready(): never blocks)."""
        return self.ready()

    def cancel(self):
        """False: a task that was sent is not cancelled (abort() stops one
        that has not started)."""
        return False

    def result(self, timeout=None):
        """get(timeout): the value, or raises the task's error."""
        return self.get(-1 if timeout is None else timeout)

    def exception(self, timeout=None):
        """The error get() would raise (None if it succeeded), once ready;
        raises TimeoutError if it is not within timeout."""
        if not self.wait(-1 if timeout is None else timeout):
            raise TimeoutError(f"{self!r} did not finish within {timeout} s")
        return self._error()

    def __await__(self):
        return asyncio.wrap_future(self).__await__()


class AsyncResult(_Future):
    """The pending result of a task on one or more engines.

    ``get`` gives one value for a single engine's task, else a list in target
    order.
    """

    def __init__(self, client, msg_id, targets, kind, keep=()):
        super().__init__(client)
        self.msg_id = msg_id
        self._targets = list(targets)
        self._kind = kind
        self._fname = kind  # what ipyparallel's repr calls it: apply, execute, scatter...
        self._keep = list(keep)  # arena blocks of the arguments, until every engine has answered
        self._results = {}  # engine id -> (ok, value or exception)
        self.task_id = None
        self._single = False
        self._return_exceptions = False  # get() puts errors in place of values (a map's, for each item)
        self._blocks = []  # message blocks sent through lanes (abort() marks them)
        self._zmq_targets = self._targets  # those the controller answers for
        self._submitted = time.time()
        self._meta = {}  # engine id -> what its reply said about the task (a Reply), and when it arrived
        self._parts = None  # engine id -> its part (split()), once asked for

    # Made when first written (_NOTHING until then; see _own):
    _stdout = _NOTHING  # engine id -> what it printed (so far, while it runs), if anything
    _stderr = _NOTHING
    _data = _NOTHING  # engine id -> what it published (so far)
    _part_lens = _NOTHING  # engine id -> items of a map's block it had
    _mids = _NOTHING  # our messages to the controller -> their targets
    _by_value = _NOTHING  # those of them with memmaps by reference -> (meta, obj) (ControllerRoute._resend_by_value)
    _callbacks = ()  # called (with self) once every engine has answered, after the receiving

    def _own(self, name):
        """The dict of that name, made if it is still the shared _NOTHING."""
        d = getattr(self, name)
        if d is _NOTHING:
            d = {}
            setattr(self, name, d)
        return d

    def __repr__(self):
        # As ipyparallel shows it: what it does while pending, "finished" once done.
        return f"<{type(self).__name__}: {'finished' if self._done() else self._fname}>"

    def _add(self, hdr, payload, buffers):
        """Takes an engine's reply; True if its value holds arena buffers
        (which the engine keeps a reference to until it hears RELEASE)."""
        meta = json.loads(bytes(payload[0]))
        engine = hdr["sender"]
        self.task_id = hdr["task_id"]
        for name, key in (("_stdout", "stdout"), ("_stderr", "stderr")):
            text = meta.get(key, "")
            if text or engine in getattr(self, name):  # the reply's is the whole of it
                self._own(name)[engine] = text
        where = meta.get("buffers", [])
        if "data" in meta:
            self._take_data(engine, meta["data"])
        meta = self._meta[engine] = Reply(meta, time.time())
        if meta.status == "ok":
            try:
                value = serialize.loads(bytes(payload[1]), where, buffers, arena=self._client.arena) \
                    if len(payload) > 1 and len(payload[1]) else None
                if self._kind == "execute":
                    value = ExecuteReply(self.msg_id, self._metadata_of(engine))
                self._results[engine] = (True, value)
            except Exception as e:  # e.g. a class the engine has and this process has not
                self._results[engine] = (False, RemoteError(
                    type(e).__name__, f"the result arrived but cannot be rebuilt here: {e}", "", engine,
                    hdr["task_id"]))
        elif meta.get("ename") == "TaskAborted":
            self._results[engine] = (False, TaskAborted(meta.get("evalue", "aborted")))
        elif meta.get("ename") == "EngineError":
            self._results[engine] = (False, EngineError(meta.get("evalue", "engine failed"), engine, hdr["task_id"]))
        else:
            tb = "".join(meta.get("traceback", []))
            self._results[engine] = (False, RemoteError(meta.get("ename"), meta.get("evalue"), tb, engine,
                                                        hdr["task_id"]))
        if self._parts:
            self._part_done(engine)
        if self._done():
            self._finished()
        return bool(where)

    # How the client's record keeping treats it (Client._record): counted
    # in queue_status's "completed"; its ending remembered by msg_id (not
    # for an attempt of a TaskResult, whose msg_id the user never sees);
    # purged (purge_results): no longer speaks for its task.
    _counted = True
    _recorded = True
    _purged = False

    def _ending(self):
        """(succeeded, engines) once finished, as Client._how_ended gives it."""
        return all(ok for ok, _ in self._results.values()), set(self._results)

    def _fail(self, engine, exc):
        self._results[engine] = (False, exc)
        self._meta.setdefault(engine, {"engine_id": engine, "status": "error", "received": time.time()})
        self._part_done(engine)
        if self._done():
            self._finished()

    def _finished(self):
        # What only a pending task needs goes (a finished one may be held
        # by the million): the arena blocks, and an empty list.
        self._keep = self._blocks = ()
        if "_by_value" in self.__dict__:  # only a task with memmaps has its own (a slot in every task's dict, else)
            del self._by_value
        if not self._zmq_targets:
            self._zmq_targets = ()
        self._client._record(self)
        self._resolve()
        if self._callbacks:
            # Run by the client once it has taken what arrived, never in the
            # middle of it (a callback may submit).
            self._client._due.append(self)

    def abort(self):
        """Aborts the task where it has not started (see Client.abort)."""
        if self._done():
            raise RuntimeError("Can't abort, I am already done!")
        self._client.abort([self])

    def _refused(self, targets, text):
        for e in targets:
            if e not in self._results:
                self._results[e] = (False, EngineError(f"the controller refused the task: {text}", e))
                self._part_done(e)
        if self._done():
            self._finished()

    def _output(self, hdr, payload):
        """A piece of stdout or stderr that an engine printed while the task
        runs, or what it has published so far (datapub)."""
        piece = json.loads(bytes(payload[0]))
        engine = hdr["sender"]
        if engine in self._results:  # the reply, once here, has the whole of it
            return
        if piece.get("name") == "data":
            self._take_data(engine, piece.get("text", ""))
            return
        where = self._own("_stdout" if piece.get("name") == "stdout" else "_stderr")
        where[engine] = where.get(engine, "") + piece.get("text", "")

    def _take_data(self, engine, pickled):
        try:
            self._own("_data")[engine] = serialize.loads(base64.b64decode(pickled))
        except Exception as e:  # a class this process lacks, say: said where the data would be
            self._own("_data")[engine] = {"error": f"the published data cannot be rebuilt here: {e}"}

    @property
    def data(self):
        """What the task published (shoal.datapub.publish_data) so far: a
        dict, or a list of them for several engines. Takes what has arrived."""
        self.ready()
        values = [self._data.get(e, {}) for e in self._targets]
        return values[0] if self._single else values

    def _done(self):
        return all(e in self._results for e in self._targets)

    def _zmq_done(self):
        return all(e in self._results for e in self._zmq_targets)

    def ready(self):
        """Whether every engine has answered (never blocks)."""
        while not self._done() and self._client._receive(0):
            pass
        return self._done()

    def wait(self, timeout=-1, return_when=None):
        """Waits up to timeout seconds (-1 or None: for ever); True if ready.

        return_when (FIRST_COMPLETED, FIRST_EXCEPTION, ALL_COMPLETED):
        waits as concurrent.futures.wait does on split()'s parts, one per
        engine, and returns its (done, not_done) sets of them."""
        if return_when is not None:
            return concurrent.futures.wait(self.split(), None if timeout is None or timeout < 0 else timeout,
                                           return_when)
        deadline = None if timeout is None or timeout < 0 else time.monotonic() + timeout
        while not self._done():
            left = 3600 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                return False
            # How many of our engines' replies by lane are still to come (a
            # result of another kind, as a load-balanced map's: wake for each).
            zmq = getattr(self, "_zmq_targets", None)
            want = 1 if zmq is None else sum(1 for e in self._targets if e not in self._results and e not in zmq)
            self._client._receive(min(left, 3600), want)
        return True

    def successful(self):
        """True if every engine succeeded; raises if not ready yet."""
        if not self.ready():
            raise RuntimeError("cannot check successful() before the result is ready")
        return all(ok for ok, _ in self._results.values())

    def get(self, timeout=-1, return_exceptions=None, return_when=None):
        """The result: one value for one engine, a list in target order for several.

        Raises TimeoutError if not ready within timeout. A task of one engine
        (a view of an int) raises that engine's error (RemoteError with the
        remote traceback, or EngineError); a task of a list of engines raises
        a CompositeError of every engine's error, as ipyparallel does.
        return_exceptions=True puts each error in place of its value
        instead (default: as the call that made it was told).
        return_when=FIRST_EXCEPTION raises the first error as soon as it
        arrives, without waiting for the other engines.
        """
        if return_when == concurrent.futures.FIRST_EXCEPTION and not self._single:
            done, _ = self.wait(timeout, return_when=return_when)
            failed = [part for part in done if part._error() is not None]
            if failed and not self._done():
                return failed[0].get(0, return_exceptions=return_exceptions)
        if not self.wait(timeout):
            raise TimeoutError(f"task {self.task_id or '(not yet started)'} on engines {self._targets} "
                               f"did not finish within {timeout} s")
        return self._value(self._return_exceptions if return_exceptions is None else return_exceptions)

    def _value(self, return_exceptions):
        """What get() gives once ready (or raises)."""
        if return_exceptions:
            # A map's failed part: its error for each of its items.
            return self._join([v if ok or e not in self._part_lens else [v] * self._part_lens[e]
                               for e, (ok, v) in ((e, self._results[e]) for e in self._targets)])
        error = self._error(False)
        if error is not None:
            raise error
        values = [self._results[e][1] for e in self._targets]
        return self._join(values)

    def _error(self, return_exceptions=None):
        """What get() raises once ready, or None: one engine's task, its
        error; a list of engines', a CompositeError of every one's, as in
        ipyparallel. return_exceptions: as the call was told, unless given."""
        if self._return_exceptions if return_exceptions is None else return_exceptions:
            return None
        errors = [v for ok, v in (self._results[e] for e in self._targets) if not ok]
        if not errors:
            return None
        return errors[0] if self._single else CompositeError(self._fname, errors, self._kind)

    def _join(self, values):
        """The value get() returns, from the engines' values in target order."""
        return values[0] if self._single else values

    # ---- what ipyparallel tells about a task ------------------------------------------

    def _metadata_of(self, engine):
        return _metadata(self.msg_id, engine, self._submitted, self._meta.get(engine, {}),
                         self._stdout.get(engine, ""), self._stderr.get(engine, ""))

    @property
    def metadata(self):
        """What is known of the task on each engine (a dict; a list of them,
        in target order, for several engines): engine_id, submitted,
        started, completed, received (datetimes, None until known), status,
        execution_count and execute_result (execute), stdout, stderr."""
        mds = [self._metadata_of(e) for e in self._targets]
        return mds[0] if self._single else mds

    @property
    def stdout(self):
        """What the task printed (so far, while it runs): one engine's text,
        or a list of them in target order, as ipyparallel gives it."""
        outs = [self._stdout.get(e, "") for e in self._targets]
        return outs[0] if self._single else outs

    @property
    def stderr(self):
        """As stdout, for stderr."""
        outs = [self._stderr.get(e, "") for e in self._targets]
        return outs[0] if self._single else outs

    @property
    def outputs(self):
        """What display() showed on each engine during the task: a list of
        {"data": {mime type: content}, "metadata": {...}} (a list of such
        lists, in target order, for several engines)."""
        outs = [self._meta.get(e, {}).get("outputs", []) for e in self._targets]
        return outs[0] if self._single else outs

    @property
    def progress(self):
        """How many results have come, as len() counts them: engines that
        have answered (a map's: the items of their parts)."""
        self.ready()
        if self._part_lens:
            return sum(self._part_lens.get(e, 1) for e in self._results)
        return len(self._results)

    @property
    def elapsed(self):
        """Seconds since submission: until now while pending, until the last
        answer once finished."""
        if not self.ready():
            return time.time() - self._submitted
        return self.wall_time

    @property
    def wall_time(self):
        """Seconds from submission to the last answer (raises if not ready)."""
        self._require_ready()
        received = [m["received"] for m in self._meta.values() if m.get("received")]
        return max(received, default=self._submitted) - self._submitted

    @property
    def serial_time(self):
        """Seconds the engines spent on the task, added up (raises if not ready)."""
        self._require_ready()
        return sum(m["completed"] - m["started"] for m in self._meta.values()
                   if m.get("completed") and m.get("started"))

    def _require_ready(self):
        if not self.ready():
            raise TimeoutError(f"the result of {self._fname} is not ready yet")

    def display_outputs(self, groupby="type"):
        """Prints each engine's stdout, stderr and cell value as %px does
        (groupby: "type", "engine" or "order")."""
        outputs.display_outputs(self, groupby)

    def wait_interactive(self, interval=0.1, timeout=-1, file=None, return_when=None):
        """Waits, drawing a progress bar of the results that have come.
        return_when=FIRST_EXCEPTION stops at the first error,
        FIRST_COMPLETED at the first result."""
        file = file or sys.stdout
        deadline = None if timeout is None or timeout < 0 else time.monotonic() + timeout
        n = len(self)
        while True:
            left = interval if deadline is None else max(min(interval, deadline - time.monotonic()), 0)
            done = self.wait(left)
            k = self.progress
            bar = "#" * (30 * k // n if n else 30)
            print(f"\r{self._fname}: [{bar:<30}] {k}/{n} tasks finished after {self.elapsed:4.0f} s",
                  end="", file=file, flush=True)
            stop = (return_when == concurrent.futures.FIRST_EXCEPTION and
                    any(not ok for ok, _ in list(self._results.values()))) or \
                (return_when == concurrent.futures.FIRST_COMPLETED and self._results)
            if done or stop or (deadline is not None and time.monotonic() >= deadline):
                print(file=file)
                return done

    def get_dict(self, timeout=-1):
        """{engine id: its value}; raises as get() does."""
        self.get(timeout)
        return {e: self._results[e][1] for e in self._targets}

    @property
    def result_dict(self):
        return self.get_dict()

    @property
    def r(self):
        """get(), as a property."""
        return self.get()

    # ---- ipyparallel's surface: parts, ids, metadata as items -------------------------

    def _part_done(self, engine):
        """Engine's answer is in: its part (split()) is complete."""
        part = self._parts.get(engine) if self._parts else None
        if part is not None:
            part._finished()

    def split(self):
        """One AsyncResult per engine (a Future each, for
        concurrent.futures.wait and friends), sharing this one's answers;
        (self,) for a task of one engine."""
        if len(self._targets) <= 1:
            return (self,)
        with self._client._lock:
            if self._parts is None:
                self._parts = {e: _Part(self, e) for e in self._targets}
            return tuple(self._parts[e] for e in self._targets)

    @classmethod
    def join(cls, *results):
        """One result of several (the inverse of split()): get() gives
        their values in order, a list (each part's values in it)."""
        if not results:
            raise ValueError("join needs at least one AsyncResult")
        if len(results) == 1:
            return results[0]
        return _Joined(results)

    @property
    def msg_ids(self):
        """The ids of the task's messages: one, for every engine of it
        (ipyparallel sends one per engine)."""
        return [self.msg_id]

    @property
    def engine_id(self):
        return self["engine_id"]

    def __getitem__(self, key):
        """An int or a slice: those values of get() (ready only; a
        TimeoutError if not); a str: that field of the metadata (of each
        engine, for several), as ipyparallel has it."""
        if isinstance(key, (int, slice)) and not isinstance(key, bool):
            if not self.ready():
                raise TimeoutError("the result is not ready")
            values = self.get(0, return_exceptions=True)
            values = [values] if self._single else values
            chosen = values[key]
            errors = [v for v in (chosen if isinstance(key, slice) else [chosen]) if isinstance(v, BaseException)]
            if errors and not self._return_exceptions:
                raise CompositeError(self._fname, errors, self._kind)
            return chosen
        if isinstance(key, str):
            self.ready()
            values = [m[key] for m in (self._metadata_of(e) for e in self._targets)]
            return values[0] if self._single else values
        raise TypeError(f"an AsyncResult is read by int, slice or str, not {type(key).__name__}")

    def __getattr__(self, key):
        # Only for names that are not attributes: metadata fields (ar.started, ar.status...).
        if key.startswith("_"):
            raise AttributeError(key)
        try:
            return self[key]
        except (KeyError, TimeoutError):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {key!r}") from None

    def __iter__(self):
        """Each engine's value as it arrives, in target order (a task of one
        engine is not iterable). An engine's error is raised when reached."""
        if self._single:
            raise TypeError("an AsyncResult of one engine's task is not iterable")
        return self._as_they_come()

    def _as_they_come(self):
        for e in self._targets:
            while e not in self._results:
                self._client._receive(0.1)
            ok, value = self._results[e]
            if not ok and not self._return_exceptions:
                raise CompositeError(self._fname, [value], self._kind)
            yield value

    def __len__(self):
        """How many results: 1 for one engine's task, else one per engine
        (a map: one per item)."""
        if self._single:
            return 1
        if self._part_lens:
            return sum(self._part_lens.get(e, 1) for e in self._targets)
        return len(self._targets)

    def wait_for_output(self, timeout=-1):
        """Waits for the task's output: it arrives whole with each
        engine's answer, so as wait()."""
        return self.wait(timeout)

    @property
    def sent(self):
        """True: a task is in its ring (or sent) once the call returns; an
        arena buffer needs no tracking."""
        return True

    def wait_for_send(self, timeout=-1):
        """Nothing to wait for (see sent)."""
        return None

    def timedelta(self, start, end, start_key=min, end_key=max):
        """Seconds between two metadata times (fields "submitted",
        "started", "completed", "received"), of each engine (lists are
        reduced with start_key and end_key)."""
        s, e = self[start] if isinstance(start, str) else start, self[end] if isinstance(end, str) else end
        if isinstance(s, list):
            s = start_key(x for x in s if x)
        if isinstance(e, list):
            e = end_key(x for x in e if x)
        return (e - s).total_seconds()


class ExecuteReply:
    """What execute's result gives for each engine, as ipyparallel's: the
    cell's execution_count and its metadata (stdout, stderr, outputs,
    execute_result: what its value shows, as {"data": {mime type: ...},
    "metadata": ..., "execution_count": n}, or None for a silent cell or
    one without a value). Metadata fields read as items and attributes;
    IPython shows it as the value would be shown."""

    def __init__(self, msg_id, metadata):
        self.msg_id = msg_id
        self.metadata = metadata
        self.execution_count = metadata.get("execution_count")

    @property
    def data(self):
        """The value's display data ({mime type: content}), {} if none."""
        return (self.metadata.get("execute_result") or {}).get("data", {})

    @property
    def _data_metadata(self):
        return (self.metadata.get("execute_result") or {}).get("metadata", {})

    def __getitem__(self, key):
        return self.metadata[key]

    def __getattr__(self, key):
        # _repr_png_ and its kind: only for the types the value has, so that
        # IPython shows what there is; metadata fields by name.
        mime = _REPR_MIME.get(key)
        if mime is not None and mime in self.data:
            return lambda: self._repr_mime(mime)
        if key.startswith("_") or key not in self.metadata:
            raise AttributeError(key)
        return self.metadata[key]

    def _repr_mime(self, mime):
        data, md = self.data[mime], self._data_metadata.get(mime)
        return (data, md) if md else data

    def _repr_mimebundle_(self, include=None, exclude=None):
        return self.data, self._data_metadata

    def display(self):
        """Shows the value in IPython, as the engine's display would."""
        from IPython.display import publish_display_data
        publish_display_data(self.data, self._data_metadata)

    def __repr__(self):
        text = self.data.get("text/plain", "")
        if len(text) > 32:
            text = text[:29] + "..."
        return f"<ExecuteReply[{self.execution_count}]: {text}>"

    def _repr_pretty_(self, p, cycle):
        p.text(self.data.get("text/plain", ""))


_REPR_MIME = {"_repr_png_": "image/png", "_repr_jpeg_": "image/jpeg", "_repr_svg_": "image/svg+xml",
              "_repr_html_": "text/html", "_repr_markdown_": "text/markdown", "_repr_latex_": "text/latex",
              "_repr_json_": "application/json", "_repr_javascript_": "application/javascript",
              "_repr_pdf_": "application/pdf"}


class _Part(AsyncResult):
    """One engine's part of a task for several (AsyncResult.split): it
    shares the whole's answers, and completes with its engine's."""

    def __init__(self, whole, engine):
        _Future.__init__(self, whole._client)
        self.msg_id, self.task_id = whole.msg_id, whole.task_id
        self._targets, self._single = [engine], True
        self._kind, self._fname = whole._kind, whole._fname
        self._whole = whole
        self._results, self._meta = whole._results, whole._meta  # the same dicts: answers land in both
        self._callbacks, self._keep, self._blocks = [], [], []
        self._return_exceptions = whole._return_exceptions
        self._zmq_targets = [engine] if engine in whole._zmq_targets else []
        self._submitted, self._parts = whole._submitted, None
        if engine in self._results:
            self._finished()

    # The whole's, as they are now (it makes them when first written).
    _stdout = property(lambda self: self._whole._stdout)
    _stderr = property(lambda self: self._whole._stderr)
    _data = property(lambda self: self._whole._data)

    def _finished(self):
        self._resolve()
        if self._callbacks:
            self._client._due.append(self)

    def abort(self):
        raise RuntimeError("a part of a task is aborted with the whole task (abort() on it)")


class _Joined(_Future):
    """Several results as one (AsyncResult.join): get() gives their values
    in order, in one list; metadata, stdout and stderr are lists too."""

    _single = False

    def __init__(self, results):
        super().__init__(results[0]._client)
        self._children = list(results)
        self._callbacks = []
        self._return_exceptions = False
        self._fname = self._children[0]._fname
        self.msg_id = self._children[0].msg_id
        for child in self._children:
            child._on_done(self._child_done)

    def _child_done(self, _):
        # Under the client's lock (_on_done), as the receiving thread runs it.
        if self._done():
            self._resolve()
            if self._callbacks:
                self._client._due.append(self)

    def _done(self):
        return all(c._done() for c in self._children)

    def ready(self):
        return all(c.ready() for c in self._children)

    def split(self):
        return tuple(self._children)

    def wait(self, timeout=-1, return_when=None):
        if return_when is not None:
            return concurrent.futures.wait(self._children, None if timeout is None or timeout < 0 else timeout,
                                           return_when)
        deadline = None if timeout is None or timeout < 0 else time.monotonic() + timeout
        return all(c.wait(-1 if deadline is None else max(deadline - time.monotonic(), 0))
                   for c in self._children)

    def _values(self):
        out = []
        for c in self._children:
            v = c.get(0, return_exceptions=True)
            out += [v] if c._single else list(v)
        return out

    def _error(self, return_exceptions=None):
        if self._return_exceptions if return_exceptions is None else return_exceptions:
            return None
        errors = [v for v in self._values() if isinstance(v, BaseException)]
        return CompositeError(self._fname, errors) if errors else None

    def get(self, timeout=-1, return_exceptions=None, return_when=None):
        if return_when == concurrent.futures.FIRST_EXCEPTION:
            done, _ = self.wait(timeout, return_when=return_when)
            failed = [c for c in done if c._error() is not None]
            if failed and not self._done():
                return failed[0].get(0, return_exceptions=return_exceptions)
        if not self.wait(timeout):
            raise TimeoutError(f"the joined results did not finish within {timeout} s")
        error = self._error(return_exceptions)
        if error is not None:
            raise error
        return self._values()

    def _each(self, name):
        out = []
        for c in self._children:
            v = getattr(c, name)
            out += [v] if c._single else list(v)
        return out

    @property
    def metadata(self):
        return self._each("metadata")

    @property
    def stdout(self):
        return self._each("stdout")

    @property
    def stderr(self):
        return self._each("stderr")

    @property
    def msg_ids(self):
        return [m for c in self._children for m in c.msg_ids]

    def __len__(self):
        return sum(len(c) for c in self._children)


def _metadata(msg_id, engine, submitted, m, stdout, stderr):
    """ipyparallel's metadata dict of a task on one engine, built when asked
    for: m is what its reply said (a Reply, or a dict for a task that
    failed here), submitted our clock's time of the submission."""
    md = {"engine_id": engine, "msg_id": msg_id, "submitted": _when(submitted),
          "started": _when(m.get("started")), "completed": _when(m.get("completed")),
          "received": _when(m.get("received")), "status": m.get("status"),
          "execution_count": m.get("execution_count"), "execute_result": m.get("execute_result"),
          "stdout": stdout, "stderr": stderr, "outputs": m.get("outputs", [])}
    if m.get("status") == "error":
        md.update(ename=m.get("ename"), evalue=m.get("evalue"))
    if m.get("notes"):  # shoal's: what the engine was told (a memmap that went by value, and why)
        md["notes"] = m.get("notes")
    return md


def _when(t):
    return datetime.datetime.fromtimestamp(t) if t else None


def _flat(parts):
    """Joins lists of items into one list (a map's parts)."""
    return [x for p in parts for x in p]


class AsyncMapResult(AsyncResult):
    """The result of a map, scatter or gather: ``get`` joins the engines'
    parts into one sequence (``join``, applied to their values in target
    order)."""

    def __init__(self, client, msg_id, targets, kind, join, keep=()):
        super().__init__(client, msg_id, targets, kind, keep)
        self._joiner = join

    def _join(self, values):
        return self._joiner(values)

    def __iter__(self):
        """The joined items, each engine's part as soon as it has arrived (in
        target order), when the parts are lists (map); else once all have."""
        if self._joiner is not _flat:
            yield from self.get()
            return
        for e in self._targets:
            while e not in self._results:
                self._client._receive(0.1)
            ok, value = self._results[e]
            if ok:
                yield from value
            elif self._return_exceptions:
                yield from [value] * self._part_lens.get(e, 1)
            else:
                raise value
