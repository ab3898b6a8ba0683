"""The lane route: tasks straight to the engines of this node.

A lane is a pair of rings in the node's arena between the client and one
engine (docs/engine.md): tasks go in one, replies and outputs come back on
the other, with no socket and no other process on the way, and results are
zero-copy views of the blocks the engine wrote. The agent hands the client
a lane on request and closes it when the engine dies or is stopped.

The replies of load-balanced tasks (route_pool.py) come on lanes too: this
route takes them, and tells the pools when one is answered or an engine is
gone.
"""

import json
import os
import struct
import time

from . import _core
from ._msgblock import ABORTED, KIND_OUTPUT, KIND_RELEASE, KIND_RESULT, KIND_TASK, LANE_ENGINE_STOPPED, SLOT, Lane, \
    pack_frames, unpack_frames
from .error import EngineError
from .routes import Route, request

# How long a client waiting on its lanes spins before it sleeps (seconds):
# a no-op task's round trip through a lane takes well under this.
LANE_SPIN = 300e-6
_CORES = os.cpu_count() or 1
# A reply block larger than this (bytes) is released at once, waking its
# engine if it sleeps; a smaller one (without arena buffers), of a task for
# more engines than cores, waits for the engine's next task. Either way the
# engine lets go of it before it exits.
RELEASE_WAKE_BYTES = 64 << 10
# What abort() writes at bytes 12 to 16 of a task's message block: an
# engine that has not started the task answers TaskAborted.
ABORTED_WORD = struct.pack("<I", ABORTED)


class LaneRoute(Route):
    """The lanes of one client to the engines of its node.

    ids: the client's counter of lane and load-balanced task ids.
    registry: what the route needs of the client's registry, as three
    methods: _engine(eid) (the registry's entry of engine eid, or None),
    _engine_left() (an engine's lane closed: read the registry again) and
    _node_lost(node) (the node's agent died: its engines are lost). A weak
    proxy, so that the client and its routes make no cycle.
    """

    def __init__(self, use, ids, registry):
        self.use = use  # False: every task goes through the controller (Client(lanes=False))
        self.ids = ids
        self.registry = registry
        self.local = self.arena = self.node = None  # the node's arena, once attached (attach)
        self.lanes = {}  # engine id -> Lane, or None where there is none
        self.tasks = {}  # lane task id -> (AsyncResult, engines yet to answer)
        self.pools = None  # the PoolRoute, whose replies come on our lanes (it sets this)
        self.bell = None  # the doorbell all our lanes' completion rings ring
        self.last_submit = 0.0  # when the client last submitted a task (it sets this)

    def attach(self, local, node):
        """Reaches the engines of node through local (a LocalArena)."""
        self.local, self.arena, self.node = local, local.arena, node

    def lane(self, eid):
        """The lane to engine eid, or None if it is not on this node (or has none)."""
        if eid in self.lanes:
            return self.lanes[eid]
        lane = None
        engine = self.registry._engine(eid)
        if self.use and self.local is not None and engine is not None and engine["alive"] \
                and engine["node"] == self.node:
            try:
                reply = self.local.ask({"lane": eid})
                if "block" in reply and reply.get("lane") == eid:
                    lane = Lane(self.arena, reply["block"])
                    if lane.engine_id != eid:  # not the engine asked for: take no chances
                        raise ValueError(f"the agent gave engine {lane.engine_id}'s lane for engine {eid}")
                    lane.pending = set()  # our task ids the engine has yet to answer
                    lane.backlog = []  # slots waiting for room in its task ring
                    lane.inbox = []  # slots popped from its completion ring, not taken yet (see poll)
                    if self.bell is None:
                        self.bell = _core.Doorbell(lane.client_bell)
            except (OSError, ValueError):
                lane = None  # the controller's path still works
        self.lanes[eid] = lane
        return lane

    def retry(self):
        """Forgets which engines had no lane: they may have one now (a new engine of this node)."""
        self.lanes = {e: lane for e, lane in self.lanes.items() if lane is not None}

    def reach(self, targets):
        """{engine id: Lane} of the targets this route reaches."""
        return {t: lane for t in targets if (lane := self.lane(t)) is not None}

    # ---- the Route interface ---------------------------------------------------

    def submit(self, ar, lanes, meta, s, obj):
        """Puts one task on lanes (reach's answer) for ar, not waking the
        engines; returns the lanes whose engines start() is to wake."""
        # One message block for all of them, ours until they have answered.
        task_id = next(self.ids)
        m = request(meta, s)
        block = pack_frames(self.arena, [json.dumps(m).encode(), s.payload], s.frames)
        ar._keep.append(block)
        ar._blocks.append(block)  # where abort() marks it
        ar.task_id = task_id
        if ar.msg_id is None:
            ar.msg_id = task_id
        self.tasks[task_id] = (ar, set(lanes))
        slot = SLOT.pack(task_id, KIND_TASK, 0, *block.handle, 0)
        for t, lane in lanes.items():
            lane.pending.add(task_id)
            self.send(t, lane, slot, wake=False)
        return list(lanes.values())

    def start(self, woken):
        """Wakes the engines of the lanes submit() gave: every ring first,
        then the doorbells (an engine woken early would otherwise take the
        core from the pushes that follow)."""
        for lane in woken:
            self.flush(lane)  # what waited for room in its ring goes first
            lane.sq.wake()
        # Results are taken when waited for (or by ready()), not here: an
        # AsyncResult reads as pending until the caller looks.
        if any(lane.cq.closed for lane in woken):
            self.poll()  # a closed lane fails its part now

    def busy(self):
        """Whether tasks of ours are out on lanes or in pools (their replies come here)."""
        return bool(self.tasks or self.pools.tasks)

    def held(self):
        return len(self.tasks)

    def outstanding(self):
        return [ar for ar, _ in self.tasks.values()]

    def queued(self):
        for ar, engines in self.tasks.values():
            for e in engines:
                yield e, ar

    def abort(self, ar):
        """Marks ar's message blocks (its lane and pool tasks'): an engine
        that has not started the task answers TaskAborted instead."""
        for block in ar._blocks:
            memoryview(block).cast("B")[12:16] = ABORTED_WORD
        return False

    def close(self):
        self.tasks.clear()
        self.lanes, self.bell = {}, None
        self.local = self.arena = None

    def send(self, eid, lane, slot, wake=True):
        """Queues a slot for the engine: into its ring, or behind what waits.
        wake=False leaves waking the engine to the caller (lane.sq.wake())."""
        try:
            if lane.backlog or lane.sq.push(slot, wake) == 0:
                lane.backlog.append(slot)
        except BrokenPipeError:
            pass  # the engine is gone: its completion ring says so too

    def flush(self, lane):
        while lane.backlog:
            try:
                n = lane.sq.push(b"".join(lane.backlog[:64]))
            except BrokenPipeError:
                lane.backlog.clear()
                return
            if n == 0:
                return
            del lane.backlog[:n]

    # ---- receiving ---------------------------------------------------------------

    def poll(self):
        """Takes what the engines put on our lanes; True if anything came.

        A Ctrl-C can land anywhere in here. Slots are popped into the
        lane's inbox in C (pop_into), so none is lost on the way; each is
        taken off the inbox in one step, inside the try of its handling
        (_slot), so none is handled twice (a RELEASE sent twice would
        free a block twice), and a reply whose handling was cut short fails
        its task, so that nothing waits for it for ever. What is still in
        the inbox is taken at the next receiving."""
        got = False
        for eid, lane in list(self.lanes.items()):
            if lane is None:
                continue
            self.flush(lane)
            inbox = lane.inbox
            while True:
                if not inbox:
                    try:
                        if not lane.cq.pop_into(inbox, 64):
                            break
                    except OSError:  # closed (the engine is gone) or broken
                        self._gone(eid, lane)
                        got = True
                        break
                got = True
                while inbox:
                    if inbox[0]:
                        self._slot(eid, lane, inbox)
                    else:
                        del inbox[0]
            self.flush(lane)
        return got

    def wait(self, timeout, want=1):
        """Waits on the lanes' doorbell up to timeout seconds, spinning
        briefly first, then takes what came; True if anything did.

        want > 1 (a caller that waits for that many engines' replies) sleeps
        until that many have come, not waking for each: a fan-out to 8
        engines on 2 cores then wakes the client once instead of 8 times,
        and leaves it the cores meanwhile. Not while load-balanced tasks are
        out: their replies top the pool up, and should be taken at once."""
        if timeout > 0 and self.bell is not None:
            lanes = [lane for lane in self.lanes.values() if lane is not None]
            pool_tasks = self.pools.tasks
            # Spin only soon after a submission (a long wait sleeps), and
            # only while a core is left for us: spinning while more
            # engines than cores have work takes a core from them.
            busy = sum(1 for lane in lanes if lane.pending) + min(len(pool_tasks), _CORES)
            spin = LANE_SPIN if busy < _CORES and time.monotonic() - self.last_submit < 0.01 else 0
            want = 1 if pool_tasks else max(1, want)
            self.bell.wait([lane.cq for lane in lanes], timeout=timeout, spin=min(spin, timeout), want=want)
        # Nothing came: is the agent, which closes a dead engine's lane, still there?
        return self.poll() or self.check_agent()

    def _slot(self, eid, lane, inbox):
        """Takes the first slot of inbox[0] (see poll) and handles it."""
        slots = inbox[0]
        task_id, kind, _, off, length, gen, _ = SLOT.unpack_from(slots)
        pool_tasks = self.pools.tasks
        ar = (self.tasks.get(task_id) or pool_tasks.get(task_id) or (None,))[0]
        hdr = {"sender": eid, "task_id": task_id}
        if kind == KIND_RESULT and task_id in pool_tasks:
            ar._targets = [eid]  # a pool task ran where it was taken
        if kind == KIND_RESULT:
            # A RELEASE wakes the engine if it sleeps. That is what a reply
            # with arena buffers needs (they are freed when dropped here), and
            # what one engine or two want: woken now, off the critical path,
            # the engine spins for our next task instead of sleeping through
            # it (a round trip: 61 us; 86 without). A task for more engines
            # than cores leaves a small reply's RELEASE for the engine's next
            # task: waking them all again cost a context switch per engine
            # (a push to 8 engines on 2 cores: 16 wake-ups instead of 8).
            wake = True
            try:
                inbox[0] = slots[SLOT.size:]  # taken, in one store: whatever comes next, handled once
                # Our own reference: the values may be views of this block.
                block = self.arena.acquire_bytes((off, length, gen), 0, length)
                payload, buffers = unpack_frames(block)
                if ar is not None:
                    wake = ar._add(hdr, payload, buffers) or length > RELEASE_WAKE_BYTES \
                        or len(ar._targets) <= _CORES
            except (OSError, ValueError) as e:
                if ar is not None:
                    ar._fail(eid, EngineError(f"engine {eid} sent a reply to task {task_id} that could not be "
                                              f"read: {e}", eid, task_id))
            except BaseException:
                # Cut short (a Ctrl-C): the reply is gone from the ring, so
                # the task must end here, or its waiters would wait for ever.
                if ar is not None:
                    if eid not in ar._results:
                        ar._fail(eid, EngineError(f"engine {eid} answered task {task_id}, but taking the reply "
                                                  f"was interrupted", eid, task_id))
                    elif ar._done():
                        ar._finished()  # again, if it was cut short: clearing and callbacks bear it
                raise
            finally:
                # Now the engine can let go of it, whatever became of it here.
                self.send(eid, lane, SLOT.pack(0, KIND_RELEASE, 0, off, length, gen, 0), wake)
                self._answered(eid, lane, task_id)
            return
        inbox[0] = slots[SLOT.size:]
        if kind == KIND_OUTPUT and ar is not None:
            try:
                payload, _ = unpack_frames(self.arena.acquire_bytes((off, length, gen), 0, length))
                ar._output(hdr, payload)
            except (OSError, ValueError):
                pass  # best effort: the reply has it all

    def _answered(self, eid, lane, task_id):
        """Engine eid is done with lane task task_id (answered, or gone)."""
        if task_id in self.pools.tasks:
            return self.pools.answered(task_id)
        lane.pending.discard(task_id)
        entry = self.tasks.get(task_id)
        if entry is not None:
            entry[1].discard(eid)
            if not entry[1]:
                del self.tasks[task_id]

    def _gone(self, eid, lane, what=None):
        """The agent closed the lane: the engine died or was stopped (or,
        with what, the agent itself is gone)."""
        self.lanes[eid] = None
        self.registry._engine_left()  # ids reads the registry again: the engine has left it, or is about to
        if what is None:
            what = "was stopped" if lane.closed_why() == LANE_ENGINE_STOPPED else "died"
        for task_id in sorted(lane.pending):
            ar = self.tasks[task_id][0]
            ar._fail(eid, EngineError(f"engine {eid} (pid {lane.engine_pid}) {what} while running task {task_id}",
                                      eid, task_id))
            self._answered(eid, lane, task_id)
        self.pools.engine_gone(eid, lane, what)

    def check_agent(self):
        """When the node's agent has died, nothing answers on our lanes any
        more (it is the one that closes a dead engine's lane): every lane
        and pool task fails now, naming its engine and why, and the engines
        of the node are marked lost, so that tasks sent to them fail at
        once. True if that happened. Called by a client that waits on lanes
        and finds nothing (a poll that never waits)."""
        if self.local is None or not self.lanes or not self.local.gone():
            return False
        pid = self.local.agent_pid
        what = f"was lost with its node's agent (pid {pid}), which died" if pid else \
            "was lost with its node's agent, which died"
        self.registry._node_lost(self.node)
        # What the engines put on their lanes before the agent died is
        # theirs to give: a reply that made it is a result, not lost.
        self.poll()
        for eid, lane in list(self.lanes.items()):
            if lane is not None:
                self._gone(eid, lane, what)
        self.pools.close_all(EngineError, f"every engine of its load-balanced view {what}")
        self.use = False  # a new agent's engines are reached through the controller
        return True
