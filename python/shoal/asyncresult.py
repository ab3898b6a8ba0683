"""AsyncResult and AsyncMapResult: what a non-blocking call returns."""

import datetime
import json
import sys
import time

from . import serialize
from .error import CompositeError, EngineError, RemoteError, TaskAborted, TimeoutError


class AsyncResult:
    """The pending result of a task on one or more engines.

    ``get`` gives one value for a single engine's task, else a list in target
    order.
    """

    def __init__(self, client, msg_id, targets, kind, keep=()):
        self._client = client
        self.msg_id = msg_id
        self._targets = list(targets)
        self._kind = kind
        self._fname = kind  # what ipyparallel's repr calls it: apply, execute, scatter...
        self._keep = list(keep)  # arena blocks of the arguments, until every engine has answered
        self._results = {}  # engine id -> (ok, value or exception)
        self.stdout = {}
        self.stderr = {}
        self.task_id = None
        self._single = False
        self._callbacks = []  # called (with self) once every engine has answered, after the receiving
        self._return_exceptions = False  # get() puts errors in place of values (a map's, for each item)
        self._part_lens = {}  # engine id -> items of a map's block it had
        self._blocks = []  # message blocks sent through lanes (abort() marks them)
        self._zmq_targets = self._targets  # those the controller answers for
        self._mids = {}  # our messages to the controller -> their targets
        self._submitted = time.time()
        self._meta = {}  # engine id -> what its reply said about the task, and when it arrived

    def __repr__(self):
        # As ipyparallel shows it: what it does while pending, "finished" once done.
        return f"<{type(self).__name__}: {'finished' if self._done() else self._fname}>"

    def _add(self, hdr, payload, buffers):
        """Takes an engine's reply; True if its value holds arena buffers
        (which the engine keeps a reference to until it hears RELEASE)."""
        meta = json.loads(bytes(payload[0]))
        engine = hdr["sender"]
        self.task_id = hdr["task_id"]
        self.stdout[engine] = meta.get("stdout", "")
        self.stderr[engine] = meta.get("stderr", "")
        meta["received"] = time.time()
        where = meta.pop("buffers", [])
        self._meta[engine] = meta
        if meta.get("status") == "ok":
            try:
                value = serialize.loads(bytes(payload[1]), where, buffers, arena=self._client.arena) \
                    if len(payload) > 1 and len(payload[1]) else None
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
        if self._done():
            self._finished()
        return bool(where)

    def _fail(self, engine, exc):
        self._results[engine] = (False, exc)
        self._meta.setdefault(engine, {"engine_id": engine, "status": "error", "received": time.time()})
        if self._done():
            self._finished()

    def _finished(self):
        self._keep.clear()
        self._blocks.clear()
        self._client._record(self)
        if self._callbacks:
            # Run by the client once it has taken what arrived, never in the
            # middle of it (a callback may submit).
            self._client._due.append(self)

    def abort(self):
        """Aborts the task where it has not started (see Client.abort)."""
        if self._done():
            raise RuntimeError("Can't abort, I am already done!")
        self._client.abort([self])

    def add_done_callback(self, fn):
        """Calls fn(self) once the result is complete (at once if it is)."""
        with self._client._lock:  # the client's thread may be completing it right now
            if not self._done():
                self._callbacks.append(fn)
                return
        fn(self)

    def _refused(self, targets, text):
        for e in targets:
            if e not in self._results:
                self._results[e] = (False, EngineError(f"the controller refused the task: {text}", e))
        if self._done():
            self._finished()

    def _output(self, hdr, payload):
        """A piece of stdout or stderr that an engine printed while the task runs."""
        piece = json.loads(bytes(payload[0]))
        where = self.stdout if piece.get("name") == "stdout" else self.stderr
        engine = hdr["sender"]
        if engine not in self._results:  # the reply, once here, has the whole text
            where[engine] = where.get(engine, "") + piece.get("text", "")

    def _done(self):
        return all(e in self._results for e in self._targets)

    def _zmq_done(self):
        return all(e in self._results for e in self._zmq_targets)

    def ready(self):
        """Whether every engine has answered (never blocks)."""
        while not self._done() and self._client._receive(0):
            pass
        return self._done()

    def wait(self, timeout=-1):
        """Waits up to timeout seconds (-1 or None: for ever); True if ready."""
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
            raise AssertionError("the result is not ready yet")
        return all(ok for ok, _ in self._results.values())

    def get(self, timeout=-1):
        """The result: one value for one engine, a list in target order for several.

        Raises TimeoutError if not ready within timeout. A task of one engine
        (a view of an int) raises that engine's error (RemoteError with the
        remote traceback, or EngineError); a task of a list of engines raises
        a CompositeError of every engine's error, as ipyparallel does.
        """
        if not self.wait(timeout):
            raise TimeoutError(f"task {self.task_id or '(not yet started)'} on engines {self._targets} "
                               f"did not finish within {timeout} s")
        errors = [v for ok, v in (self._results[e] for e in self._targets) if not ok]
        if errors and self._return_exceptions:
            return self._join([self._results[e][1] if self._results[e][0] else
                               [self._results[e][1]] * self._part_lens.get(e, 1) for e in self._targets])
        if errors:
            # One engine's task raises its error; a list of engines', a
            # CompositeError of all of them, as in ipyparallel.
            raise errors[0] if self._single else CompositeError(self._fname, errors, self._kind)
        values = [self._results[e][1] for e in self._targets]
        return self._join(values)

    def _join(self, values):
        """The value get() returns, from the engines' values in target order."""
        return values[0] if self._single else values

    # ---- what ipyparallel tells about a task ------------------------------------------

    def _metadata_of(self, engine):
        m = self._meta.get(engine, {})
        md = {"engine_id": engine, "msg_id": self.msg_id, "submitted": _when(self._submitted),
              "started": _when(m.get("started")), "completed": _when(m.get("completed")),
              "received": _when(m.get("received")), "status": m.get("status"),
              "execution_count": m.get("execution_count"), "execute_result": m.get("execute_result"),
              "stdout": self.stdout.get(engine, ""), "stderr": self.stderr.get(engine, ""),
              "outputs": m.get("outputs", [])}
        if m.get("status") == "error":
            md.update(ename=m.get("ename"), evalue=m.get("evalue"))
        return md

    @property
    def metadata(self):
        """What is known of the task on each engine (a dict; a list of them,
        in target order, for several engines): engine_id, submitted,
        started, completed, received (datetimes, None until known), status,
        execution_count and execute_result (execute), stdout, stderr."""
        mds = [self._metadata_of(e) for e in self._targets]
        return mds[0] if self._single else mds

    @property
    def outputs(self):
        """What display() showed on each engine during the task: a list of
        {"data": {mime type: content}, "metadata": {...}} (a list of such
        lists, in target order, for several engines)."""
        outs = [self._meta.get(e, {}).get("outputs", []) for e in self._targets]
        return outs[0] if self._single else outs

    @property
    def progress(self):
        """How many engines have answered."""
        self.ready()
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
            raise AssertionError(f"the result of {self._fname} is not ready yet")

    def display_outputs(self, groupby="type"):
        """Prints each engine's stdout, stderr and cell value as %px does
        (groupby: "type", "engine" or "order")."""
        from . import magics
        magics.display_outputs(self, groupby)

    def wait_interactive(self, interval=0.1, timeout=-1, file=None):
        """Waits, drawing a progress bar of the engines that have answered."""
        file = file or sys.stdout
        deadline = None if timeout is None or timeout < 0 else time.monotonic() + timeout
        n = len(self._targets)
        while True:
            done = self.wait(interval)
            k = self.progress
            bar = "#" * (30 * k // n if n else 30)
            print(f"\r{self._fname}: [{bar:<30}] {k}/{n} tasks finished after {self.elapsed:4.0f} s",
                  end="", file=file, flush=True)
            if done or (deadline is not None and time.monotonic() >= deadline):
                print(file=file)
                return done

    def get_dict(self, timeout=-1):
        self.get(timeout)
        return {e: self._results[e][1] for e in self._targets}


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
