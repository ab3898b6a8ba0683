"""The pool route: load-balanced tasks that whichever idle engine of this
node takes (docs/engine.md, "Pools").

A pool is a ring in an arena block of the client's, shared by the engines
of one load-balanced view that all run on this node: each got its handle on
its lane, takes tasks from it when idle, and answers on its lane (so the
lane route receives the replies, and tells this route). The ring records
who took each task, so when an engine dies the client knows which tasks
went with it, and a task no engine has taken can be taken back.
"""

import json

from . import _core
from ._msgblock import KIND_POOL, KIND_TASK, POOL_SLOTS, SLOT, pack_frames
from .error import EngineError, TaskAborted
from .routes import Route, request

# Pools a client keeps at once (one per set of engines a load-balanced view
# spans; usually one).
MAX_POOLS = 8


class _Pool:
    """A node-local queue of this client's load-balanced tasks, which
    whichever of its engines is idle takes.

    Each member engine got its handle on its lane and replies on that lane.
    """

    def __init__(self, arena, lanes):
        self.block = arena.alloc(_core.Ring.size(POOL_SLOTS))
        self.ring = _core.Ring(self.block, POOL_SLOTS, pool=True)
        self.lanes = dict(lanes)  # engine id -> Lane, of the engines that take from it
        self.tasks = {}  # task id -> position in the ring, until answered
        self.turn = 0  # which member to try waking first

    def wake(self, n):
        """Wakes up to n sleeping members (engines awake look before they sleep)."""
        lanes = list(self.lanes.values())
        woken = 0
        for k in range(len(lanes)):
            if woken >= n:
                break
            woken += lanes[(self.turn + k) % len(lanes)].sq.wake()
        self.turn += 1


class PoolRoute(Route):
    """The pools of one client, over its lanes (a LaneRoute)."""

    def __init__(self, lanes, ids):
        self.lanes = lanes
        lanes.pools = self
        self.ids = ids  # the client's counter of lane and load-balanced task ids
        self.pools = {}  # frozenset of engine ids -> _Pool
        self.tasks = {}  # pool task id -> (AsyncResult, _Pool)

    def pool(self, engines):
        """The pool for load-balanced tasks that may run on any of engines,
        or None if they are not all engines of this node with lanes (or are
        fewer than two): such tasks go to one engine each."""
        key = frozenset(engines)
        pool = self.pools.get(key)
        if pool is not None or len(key) < 2 or self.lanes.local is None:
            return pool
        lanes = {e: self.lanes.lane(e) for e in key}
        if any(lane is None for lane in lanes.values()):
            return None
        if len(self.pools) >= MAX_POOLS:  # let idle ones go first
            for k, p in list(self.pools.items()):
                if not p.tasks:
                    self._close(k)
            if len(self.pools) >= MAX_POOLS:
                return None
        try:
            pool = _Pool(self.lanes.arena, lanes)
        except (OSError, MemoryError):
            return None  # no arena memory for it: one engine each
        slot = SLOT.pack(0, KIND_POOL, 0, *pool.block.handle, 0)
        for eid, lane in lanes.items():
            self.lanes.send(eid, lane, slot)
        self.pools[key] = pool
        return pool

    # ---- the Route interface ---------------------------------------------------

    def submit(self, client, pool, meta, s, make):
        """Puts a task (s, serialized in our arena) in pool; its AsyncResult,
        made by make(client, task_id, [None], kind), or None if the pool is
        full (the caller sends it to one engine instead)."""
        task_id = next(self.ids)
        m = request(meta, s)
        block = pack_frames(self.lanes.arena, [json.dumps(m).encode(), s.payload], s.frames)
        try:
            pos = pool.ring.put(SLOT.pack(task_id, KIND_TASK, 0, *block.handle, 0))
        except OSError:
            pos = None
        if pos is None:
            return None
        ar = make(client, task_id, [None], meta["kind"])
        ar._zmq_targets = []
        ar._keep += s.keep + [block]
        ar._blocks.append(block)
        ar.task_id = task_id
        pool.tasks[task_id] = pos
        self.tasks[task_id] = (ar, pool)
        pool.wake(1)
        return ar

    def held(self):
        return len(self.tasks)

    def outstanding(self):
        return [ar for ar, _ in self.tasks.values()]

    def queued(self):
        """(who took it, AsyncResult) of each task: an engine id, or a
        negative _core.POOL_* value (_core.POOL_WAITING: nobody yet)."""
        for task_id, (ar, pool) in self.tasks.items():
            yield pool.ring.owner(pool.tasks[task_id]), ar

    def abort(self, ar):
        """Takes back ar's task if it waits in a pool: it fails with
        TaskAborted. True if it did."""
        entry = self.tasks.get(ar.task_id)
        return entry is not None and self._take_back(
            entry[1], ar.task_id, TaskAborted(f"task {ar.task_id} was aborted before it started"))

    def close(self):
        self.tasks.clear()

    def close_all(self, error=EngineError, why="closed"):
        """Closes every pool (see _close)."""
        for key in list(self.pools):
            self._close(key, error, why)

    # ---- what the lane route tells --------------------------------------------------

    def answered(self, task_id):
        """An engine is done with pool task task_id (answered, or gone)."""
        _, pool = self.tasks.pop(task_id)
        pos = pool.tasks.pop(task_id)
        try:
            pool.ring.retire(pos)
        except OSError:
            pass  # withdrawn and retired already, or the pool is closed

    def engine_gone(self, eid, lane, what):
        """Engine eid (whose lane was lane) is gone: the tasks it took fail,
        and a pool it leaves empty closes."""
        for key, pool in list(self.pools.items()):
            if eid not in pool.lanes:
                continue
            del pool.lanes[eid]
            for task_id, pos in list(pool.tasks.items()):
                if pool.ring.owner(pos) == eid:  # it took this one and did not answer
                    ar = self.tasks[task_id][0]
                    ar._targets = [eid]
                    ar._fail(eid, EngineError(f"engine {eid} (pid {lane.engine_pid}) {what} while running task "
                                              f"{task_id}", eid, task_id))
                    self.answered(task_id)
            if not pool.lanes:  # nobody is left to take what waits
                self._close(key, EngineError, f"every engine of its load-balanced view {what}")

    def _take_back(self, pool, task_id, exc):
        """Withdraws a pool task that no engine has taken, and fails it
        with exc; True if it did."""
        if not pool.ring.withdraw(pool.tasks[task_id]):
            return False
        ar = self.tasks[task_id][0]
        self.answered(task_id)
        ar._fail(None, exc)
        return True

    def _close(self, key, error=EngineError, why="closed"):
        """Closes a pool: what waits in it fails with error(why), and its
        members drop it. Tasks engines have taken stay in pool.tasks: their
        answers come on the lanes, and retiring them in a closed pool is
        harmless."""
        pool = self.pools.pop(key)
        for task_id in list(pool.tasks):
            self._take_back(pool, task_id, error(f"task {task_id} was never taken: {why}"))
        pool.ring.close()
        pool.wake(len(pool.lanes))  # the sleepers see it closed
