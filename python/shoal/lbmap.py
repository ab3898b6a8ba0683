"""The load-balanced map's policy: how LoadBalancedView.map cuts its items
into tasks as it goes (chunks sized from the time the first ones took,
within the view's TARGET_TASK_SECONDS, GROWTH, MAX_CHUNK), how many it
keeps in the pool and in flight (POOL_DEPTH, IN_FLIGHT), and how it joins
their results; and imap's iterators. The views make these; nothing here
makes a view.
"""

import array
import collections
import concurrent.futures
import contextlib
import time

from . import serialize
from .asyncresult import AsyncMapResult, _Future, _metadata
from .error import EngineError, TaskAborted, TimeoutError


def _call_chunk(f, *chunks):
    """Runs on an engine: f called with its parts of the sequences."""
    return f(*chunks)


def _star_chunk(f, *columns):
    """Runs on an engine: one task of a load-balanced map, f over its items."""
    return list(map(f, *columns))


class _Bounds:
    """(low, high) of each chunk of a map, in order, as a list of them
    reads: chunks are handed out one after another, so each starts where
    the one before ended, and one array of the ends is enough (8 bytes a
    chunk; a tuple of two ints was 100)."""

    __slots__ = ("ends",)

    def __init__(self):
        self.ends = array.array("q", [0])

    def __len__(self):
        return len(self.ends) - 1

    def __getitem__(self, i):
        n = len(self.ends) - 1
        if i < 0:  # from the end, as a list reads
            i += n
        if not 0 <= i < n:
            raise IndexError(i)
        return self.ends[i], self.ends[i + 1]

    def append(self, chunk):
        low, high = chunk
        if low != self.ends[-1]:
            raise ValueError(f"chunk {chunk} does not start where the last ended ({self.ends[-1]})")
        self.ends.append(high)


class _Ran:
    """What a load-balanced map keeps of each of its tasks that finished:
    its metadata and output, not its AsyncResult (which held 2-3 KiB more
    a task: a map of a million items with chunksize=1 held gigabytes)."""

    __slots__ = ("msg_id", "engine", "submitted", "meta", "stdout", "stderr")

    _NO_REPLY = {}  # the meta of a task that failed with no reply (never written)

    def __init__(self, ar, engine):
        self.msg_id, self.engine, self.submitted = ar.msg_id, engine, ar._submitted
        self.meta = ar._meta.get(engine, self._NO_REPLY)
        self.stdout, self.stderr = ar._stdout.get(engine, ""), ar._stderr.get(engine, "")

    def metadata(self):
        """ipyparallel's metadata dict of the task."""
        return _metadata(self.msg_id, self.engine, self.submitted, self.meta, self.stdout, self.stderr)


class LoadBalancedMapResult(AsyncMapResult):
    """The pending result of LoadBalancedView.map: an AsyncMapResult (and
    so a concurrent.futures.Future) over the map's tasks.

    The items are handed out in order, in chunks: chunk i covers items
    self._chunks[i] = (low, high). With a chunksize, every chunk has that
    many items; without, _chunk_size picks each chunk's size as it goes.
    """

    def __init__(self, view, f, columns, ordered, runner=None, return_exceptions=False, chunksize=None):
        _Future.__init__(self, view.client)  # not AsyncResult's: the map's own record, below
        self._view = view
        self.msg_id = next(self._client._lane_ids)  # the map's own id (each task has its own too)
        self._client._by_id[self.msg_id] = self  # found by it (wait, abort, get_result) while held
        self.task_id = None
        self._single = False
        self._kind = "map"
        self._callbacks = []
        self._f, self._ordered = f, ordered
        self._f_sent = serialize.pickled_once(f)  # the same bytes in every task
        self._columns = columns  # one per sequence, each sliceable
        self._n = min(len(c) for c in columns)  # items: as zip, the shortest sequence's length
        self._chunksize = chunksize
        self._runner = runner or _star_chunk
        self._return_exceptions = return_exceptions
        self._fname = getattr(f, "__name__", "map")
        self._chunks = _Bounds()  # (low, high) of each chunk handed out (or aborted), in item order
        self._next = 0  # the next item to hand out
        self._items_done = 0  # items whose chunk has finished
        self._results = {}  # chunk index -> (ok, values or exception)
        self._finish_order = array.array("q")  # chunk indices as they finished (8 bytes each)
        self._inflight = {}  # engine id -> chunks of this map it has (handed to it)
        self._pooled = 0  # chunks of this map in the client's pool, taken or not
        self._attempts = {}  # chunk index -> (its AsyncResult, its engine or None: the pool) while it runs
        self._ran = {}  # chunk index -> what its finished task told (a _Ran): its metadata
        self._busy = 0.0  # seconds the engines spent on the chunks finished so far (their own clocks)
        self._items_timed = 0  # items of those chunks
        self._largest_timed = 0  # items of the largest of them
        self._ramping = False  # the last chunk was kept smaller by GROWTH than its items' cost would make it
        self._submitted = time.time()

    def __repr__(self):
        return f"<AsyncMapResult: {'finished' if self._done() else self._fname}>"

    def _start(self, drive):
        """Hands out the first chunks; drive: the rest from the client's
        thread, as earlier ones finish, even while nobody waits. Either
        way the client knows of the map (close() and abort() reach it)."""
        with self._client._lock:
            self._fill()
            if self._has_work():
                self._client._routes.drive(self, thread=drive)
            elif self._done():
                self._resolve()  # no items

    def _chunk_size(self, engines):
        """Items in the next chunk. Fixed with a chunksize. Without: one
        until a chunk has finished; then as many as take an engine about
        TARGET_TASK_SECONDS, where an item is taken to cost what the
        engines spent on the finished chunks per item, by their own clocks
        (from the start of each task to its end, a task's fixed cost
        included: an over-estimate for small chunks, so chunks grow from
        small ones). Never more than GROWTH times the largest chunk that
        has finished: the evidence for the items' cost is that many items.
        Towards the end, no more than half an engine's share of what is
        left (but not under an eighth of the size wanted, nor over half an
        engine's share of the whole map), so that the last chunks are short
        and no engine works on alone while the others wait."""
        left = self._n - self._next
        if self._chunksize is not None:
            return min(self._chunksize, left)
        if not self._items_timed:
            return 1
        per_item = self._busy / self._items_timed
        want = int(type(self._view).TARGET_TASK_SECONDS / per_item) if per_item > 0 else left
        self._ramping = want > type(self._view).GROWTH * self._largest_timed
        want = min(want, type(self._view).GROWTH * self._largest_timed)
        share = min(max(-(-left // (2 * len(engines))), want // 8), -(-self._n // (2 * len(engines))))
        return max(1, min(want, share, left, type(self._view).MAX_CHUNK))

    def _fill(self):
        """Hands out chunks until every engine has its share in flight: two
        each while plenty is left, so that an engine finds its next chunk
        waiting; one each towards the end, so that no chunk waits behind a
        long one while another engine has nothing to do."""
        engines = self._view._engines()
        if not engines:
            if self._has_work() and self._view.targets is not None:
                # Every engine the view names has left the registry (died,
                # or was stopped): none of them takes the rest, ever (a new
                # engine has a new id). Without this the map waited for
                # ever (found by `shoal bench soak`). A view of every
                # engine (targets=None) waits for new ones, as ipyparallel's
                # scheduler does.
                self._chunks.append((self._next, self._n))
                self._next = self._n
                self._chunk_finished(len(self._chunks) - 1, (False, EngineError(
                    f"{self._n - self._chunks[-1][0]} item(s) of map {self._fname} were never sent: every engine "
                    f"of its load-balanced view ({self._view.targets}) has stopped running")))
                self._handed_all()
            return
        pool = self._view._pool(engines) if self._has_work() else None
        if pool is not None:
            # Engines take from the pool when idle: keep enough there that
            # none waits for the client, and no more (an abort, or a new
            # engine, still finds the rest here).
            while self._has_work() and self._pooled < self._depth(type(self._view).POOL_DEPTH) * len(engines):
                if not self._hand_out(None, engines, pool):
                    break  # full: the rest goes one engine each
            else:
                return
        while self._has_work():
            left = self._n - self._next
            limit = self._depth(type(self._view).IN_FLIGHT) if left > len(engines) else 1
            engine = min(engines, key=lambda e: self._inflight.get(e, 0))
            if self._inflight.get(engine, 0) >= limit:
                return
            self._hand_out(engine, engines)

    def _depth(self, depth):
        """Tasks an engine may have waiting for it: depth; one while chunks
        are smaller than their items' cost calls for (nothing known yet, or
        growing from what is), as more would only be more of those."""
        sized = self._chunksize is not None or (self._items_timed and not self._ramping)
        return depth if sized else 1

    def _hand_out(self, engine, engines, pool=None):
        """Sends the next chunk to engine, or into pool; False if the pool was full."""
        low = self._next
        high = low + self._chunk_size(engines)
        parts = [c[low:high] for c in self._columns]
        if self._runner is _call_chunk:
            parts = [list(p) for p in parts]  # f(seq) gets lists, as in ipyparallel
        args = (self._f_sent, *parts)
        i = len(self._chunks)
        try:
            if pool is not None:
                ar = self._view._apply_pooled(pool, self._runner, args, {})
                if ar is None:
                    return False
            else:
                ar = self._view._apply_on(engine, self._runner, args, {})
        except Exception as e:  # e.g. an item that cannot be pickled: that task fails, the map goes on
            self._chunks.append((low, high))
            self._next = high
            self._chunk_finished(i, (False, e))
            return True
        self._chunks.append((low, high))
        self._next = high
        if pool is not None:
            self._pooled += 1
        else:
            self._inflight[engine] = self._inflight.get(engine, 0) + 1
        self._attempts[i] = (ar, engine)
        if not self._has_work():
            self._handed_all()
        ar._on_done(lambda ar, i=i, engine=engine: self._chunk_done(i, engine, ar))
        return True

    def _handed_all(self):
        """Every item is handed out: the client need not drive this map
        (unless a Future's waiter waits for it)."""
        if not self._wanted:
            with contextlib.suppress(ValueError):
                self._client._routes.driven.remove(self)

    def _chunk_finished(self, i, result):
        low, high = self._chunks[i]
        self._results[i] = result
        self._items_done += high - low
        self._finish_order.append(i)
        if self._done():
            self._resolve()
            if self._callbacks:
                self._client._due.append(self)  # run by the client once it has taken what arrived

    def abort(self):
        """Aborts the chunks that have not started: those still held by the
        client, and those queued on an engine (see Client.abort)."""
        with self._client._lock:
            if self._has_work():
                self._chunks.append((self._next, self._n))
                self._next = self._n
                self._chunk_finished(len(self._chunks) - 1,
                                     (False, TaskAborted(f"a task of map {self._fname} was aborted")))
                self._handed_all()
            # A copy: an abort through the controller receives, and a chunk
            # that finishes meanwhile leaves _attempts.
            for ar, _ in list(self._attempts.values()):
                self._client._abort_sent(ar)

    _abort = abort

    def _chunk_done(self, i, engine, ar):
        """Chunk i's task has finished. Its result is taken first, and only
        once: cut short (a Ctrl-C in the waiting thread), this is called
        again by _tick, and the map still ends."""
        if i not in self._results:
            target = engine if engine is not None else ar._targets[0]  # a pool task: where it ran
            self._chunk_finished(i, ar._results[target])
            self._ran[i] = _Ran(ar, target)
            raw = ar._meta.get(target, {})
            # Only a task that ran its items tells what they cost (an
            # aborted one, or one that failed early, ran few or none).
            if raw.get("status") == "ok" and raw.get("started") and raw.get("completed"):
                items = self._chunks[i][1] - self._chunks[i][0]
                self._busy += max(raw["completed"] - raw["started"], 0.0)
                self._items_timed += items
                self._largest_timed = max(self._largest_timed, items)
        if self._attempts.pop(i, None) is not None:
            if engine is None:
                self._pooled -= 1
            else:
                self._inflight[engine] -= 1
        self._fill()

    def _tick(self):
        """From the client's thread (under its lock): takes the results of
        chunks whose callback never ran (cut short by a Ctrl-C), and hands
        out what it can."""
        for i, (ar, engine) in list(self._attempts.items()):
            if ar._done() and not ar._callbacks and ar not in self._client._due:
                self._chunk_done(i, engine, ar)
        self._fill()

    def _has_work(self):
        return self._next < self._n

    def _ending(self):
        """(succeeded, engines): every task of it succeeded; where they ran."""
        return all(ok for ok, _ in self._results.values()), {r.engine for r in self._ran.values()}

    @property
    def metadata(self):
        """Each finished task's metadata, in chunk order."""
        return [r.metadata() for r in self._tasks()]

    @property
    def wall_time(self):
        if not self.ready():
            raise TimeoutError(f"the result of {self._fname} is not ready yet")
        received = [r.meta["received"] for r in self._ran.values() if r.meta.get("received")]
        return max(received, default=self._submitted) - self._submitted

    @property
    def serial_time(self):
        if not self.ready():
            raise TimeoutError(f"the result of {self._fname} is not ready yet")
        return sum(m["completed"] - m["started"] for m in (r.meta for r in self._ran.values())
                   if m.get("completed") and m.get("started"))

    @property
    def _targets(self):  # for wait_interactive: one "target" per item
        return range(self._n)

    @property
    def progress(self):
        """How many items have been done (their tasks have finished)."""
        self.ready()
        return self._items_done

    def _done(self):
        return self._next >= self._n and len(self._results) >= len(self._chunks)

    def __len__(self):
        """The number of items."""
        return self._n

    def get(self, timeout=-1, return_exceptions=None, return_when=None):
        """The results, one per item (see map). return_exceptions: as the
        map was told, unless given; return_when=FIRST_EXCEPTION raises a
        task's error as soon as it has arrived."""
        if return_when == concurrent.futures.FIRST_EXCEPTION and not self._return_exceptions:
            deadline = None if timeout is None or timeout < 0 else time.monotonic() + timeout
            while not self._done() and self._error() is None:
                if deadline is not None and time.monotonic() >= deadline:
                    break
                self._client._receive(0.1 if deadline is None else max(min(deadline - time.monotonic(), 0.1), 0))
            if self._error() is not None:
                raise self._error()
        if not self.wait(timeout):
            raise TimeoutError(f"map of {self._fname} did not finish within {timeout} s "
                               f"({self._items_done} of {self._n} items done)")
        return self._value(self._return_exceptions if return_exceptions is None else return_exceptions)

    def _value(self, return_exceptions):
        out = []
        for i in (range(len(self._chunks)) if self._ordered else self._finish_order):
            out.extend(self._values(i, return_exceptions))  # a chunk at a time: not an item at a time
        return out

    def _error(self, return_exceptions=None):
        """The first failed task's error (in item order) among those that
        have finished, as get() raises it (None with return_exceptions)."""
        if self._return_exceptions if return_exceptions is None else return_exceptions:
            return None
        return next((v for ok, v in (self._results[i] for i in sorted(self._results)) if not ok), None)

    def split(self):
        """(self,): a map's tasks are made as it goes, so it is waited for whole."""
        return (self,)

    def __getitem__(self, key):
        """An int or a slice: those items of get() (once ready); a str:
        that field of each task's metadata."""
        if isinstance(key, str):
            self.ready()
            return [m[key] for m in self.metadata]
        if isinstance(key, (int, slice)) and not isinstance(key, bool):
            if not self.ready():
                raise TimeoutError("the result is not ready")
            return self.get(0)[key]
        raise TypeError(f"a map's result is read by int, slice or str, not {type(key).__name__}")

    def _tasks(self):
        """What each task that ran told (a _Ran), in item order."""
        return [self._ran[i] for i in sorted(self._ran)]

    @property
    def msg_ids(self):
        """The msg_ids of the map's tasks, in item order."""
        return [r.msg_id for r in self._tasks()]

    @property
    def engine_id(self):
        """The engine of each task, in item order."""
        return [r.engine for r in self._tasks()]

    @property
    def stdout(self):
        return [r.stdout for r in self._tasks()]

    @property
    def stderr(self):
        return [r.stderr for r in self._tasks()]

    @property
    def outputs(self):
        return [r.meta.get("outputs", []) for r in self._tasks()]

    def get_dict(self, timeout=-1):
        """{engine id: its task's result}, as ipyparallel's: only when no
        engine ran more than one of the map's tasks (ValueError if one
        did). A task of one item gives that item; of several, their list."""
        self.get(timeout)
        out = {}
        for i in sorted(self._ran):
            engine = self._ran[i].engine
            if engine in out:
                raise ValueError(f"cannot build a dict of engine ids: engine {engine} ran more than one "
                                 f"of this map's {len(self._ran)} tasks")
            values = self._values(i)
            out[engine] = values[0] if len(values) == 1 else values
        return out

    def _values(self, i, return_exceptions=None):
        """The values of finished chunk i, one per item (raises its error,
        unless return_exceptions: as the map was told, unless given)."""
        ok, value = self._results[i]
        if not ok and not (self._return_exceptions if return_exceptions is None else return_exceptions):
            raise value
        if not ok:
            low, high = self._chunks[i]
            return [value] * (high - low)
        if self._runner is _call_chunk and not isinstance(value, (list, tuple)):
            return [value]  # f(part) gave one value: joined as a list of them
        return value

    def __iter__(self):
        """The results, one per item: in order, or as they finish (ordered=False)."""
        k = 0  # chunks yielded
        while True:
            order = range(len(self._chunks)) if self._ordered else self._finish_order
            while k < len(order) and order[k] in self._results:
                yield from self._values(order[k])
                k += 1
            if self._done() and k >= len(self._results):
                return
            self._client._receive(0.1)


class LazyMapIterator:
    """What LoadBalancedView.imap (and its executor's map) returns, as
    ipyparallel's: an iterator over the results, whose cancel() stops it."""

    def __iter__(self):
        return self

    def cancel(self):
        raise NotImplementedError


class _Iterated(LazyMapIterator):
    """A map's results, as a LazyMapIterator."""

    def __init__(self, result):
        self.result, self._it = result, iter(result)

    def __next__(self):
        return next(self._it)

    def cancel(self):
        """Aborts what of the map has not started."""
        if not self.result._done():
            self.result.abort()


class _LazyMap(LazyMapIterator):
    """LoadBalancedView.imap over sequences read as it goes: one task per
    item, at most max_outstanding out (0: no limit), submitted as results
    are taken."""

    def __init__(self, view, f, items, ordered, max_outstanding, return_exceptions):
        self.view, self.items = view, items
        self.f = serialize.pickled_once(f)  # the same bytes in every task
        self.ordered, self.limit = ordered, max_outstanding
        self.return_exceptions = return_exceptions
        self.out = collections.deque()  # AsyncResults submitted, not yet yielded
        self.exhausted = False

    def _top_up(self):
        while not self.exhausted and (self.limit <= 0 or len(self.out) < self.limit):
            try:
                args = next(self.items)
            except StopIteration:
                self.exhausted = True
                break
            self.out.append(self.view.apply_async(self.f, *args))  # a Pickled f is f itself on the engine

    def __next__(self):
        self._top_up()
        if not self.out:
            raise StopIteration
        if self.ordered:
            ar = self.out.popleft()
        else:
            done, _ = concurrent.futures.wait(list(self.out), return_when=concurrent.futures.FIRST_COMPLETED)
            ar = next(a for a in self.out if a in done)
            self.out.remove(ar)
        try:
            value = ar.get()
        except Exception as e:
            if not self.return_exceptions:
                raise
            value = e
        self._top_up()  # the next items go out before the caller works on this one
        return value

    def cancel(self):
        """Submits nothing more; aborts what was submitted and has not started."""
        self.exhausted = True
        pending = [ar for ar in self.out if not ar._done()]
        if pending:
            self.view.client.abort(pending)
