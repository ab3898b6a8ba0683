"""Routes: the ways a client's task reaches an engine, and the receiving
and driving that serve them all.

One module per route:

- route_lane.py: lanes, rings in this node's arena straight to each
  engine of the node (docs/engine.md);
- route_pool.py: pools, node-local queues of load-balanced tasks that
  whichever engine is idle takes; their replies come on the lanes;
- route_controller.py: the controller's socket, to any engine on any node.

Each is a Route: the client submits, receives, aborts and closes through
these methods alone, and holds none of a route's state.

  submit(ar, targets, meta, s, obj)
      Sends one task for AsyncResult ar to targets, whose request header
      is built from meta; s is obj serialized (serialize.dumps) as the
      route needs it. Returns what start() is to wake (the lane route
      leaves waking engines until every task of a submission is queued).
      The pool route's is submit(client, pool, meta, s, make): a task for
      whichever engine of pool is idle, whose AsyncResult it makes (None
      if the pool is full).
  start(woken)
      Wakes what submit() left asleep.
  busy()
      Whether replies are due on the route.
  held()
      How many tasks (task parts, for the controller) it has out: the
      client's flow control (client.MAX_LANE_TASKS, CONTROLLER_WINDOW).
  poll()
      Takes what has arrived, without waiting; True if anything did.
  wait(timeout, want=1)
      Waits up to timeout seconds for something to arrive, and takes it;
      True if anything did. want: how many replies the caller waits for.
  outstanding()
      The AsyncResults it has tasks out for.
  queued()
      (engine id, AsyncResult) of each task part it has out (queue_status).
  abort(ar)
      Takes ar's task back (True: it is ended, nothing else to do), or
      marks it, so that an engine that has not started it answers
      TaskAborted. The controller's is abort(ar, timeout, receive): it
      asks the controller, and waits for its answer.
  close()
      Drops what it holds and lets go of its resources (the client fails
      what was outstanding first).

Routes holds a client's routes, receives from all of them (receive: the
calling thread receives, so a round trip costs no hand-off between
threads) and runs the driver thread, which hands out load-balanced maps'
tasks while nobody waits.
"""

import collections
import threading
import traceback


def request(meta, s):
    """The JSON header of a task whose arguments s (a Serialized) holds."""
    m = dict(meta, buffers=s.buffers)
    if s.notes:
        m["notes"] = s.notes  # the engine puts them in its reply's metadata
    return m


class Route:
    """What every route implements (see the module's doc); the defaults
    are those of a route with nothing of the kind to do."""

    def submit(self, ar, targets, meta, s, obj):
        raise NotImplementedError

    def start(self, woken):
        pass

    def busy(self):
        return False

    def held(self):
        return 0

    def poll(self):
        return False

    def wait(self, timeout, want=1):
        return False

    def outstanding(self):
        return []

    def queued(self):
        return iter(())

    def abort(self, ar):
        return False

    def close(self):
        pass


class Routes:
    """A client's routes (controller, lane, pool), its receiving, and its
    driver thread.

    lock: the client's lock. due: the client's list of AsyncResults whose
    callbacks are still to run (run_due runs them as receiving ends).
    """

    def __init__(self, lock, due, controller, lane, pool):
        self.lock = lock
        self.due = due
        self.controller, self.lane, self.pool = controller, lane, pool
        self.all = (controller, lane, pool)
        self.closed = False
        self.receiving = 0  # depth of receive calls in this thread's stack (callbacks run inside)
        self.driven = []  # load-balanced maps with tasks still to hand out
        self.driver = None  # the thread that hands them out while nobody waits
        self.driver_lock = threading.Lock()  # guards driver alone; taken under lock, never the reverse
        self.wanted = collections.deque()  # results a Future's waiter waits for, for the driver to take
        # Threads other than the driver inside receive: while there are
        # any, they receive (and so hand out) for everybody, and the driver
        # keeps out of their way (see _drive_loop).
        self.waiters = 0
        self.waiters_left = threading.Condition(threading.Lock())

    def outstanding(self):
        """Our AsyncResults still waiting for an engine, each once."""
        with self.lock:
            ars = [ar for route in self.all for ar in route.outstanding()]
        return list({id(ar): ar for ar in ars}.values())

    def close(self):
        """Closes every route (the client has failed what was outstanding)."""
        self.closed = True
        for route in self.all:
            route.close()

    # ---- receiving ---------------------------------------------------------------

    def receive(self, timeout, want=1):
        """Receives what arrives within timeout seconds, then runs the
        callbacks of the results it completed; True if anything came.
        want: how many lane replies the caller waits for (see _receive_some).
        Takes the lock."""
        if threading.current_thread() is not self.driver:
            with self.waiters_left:
                self.waiters += 1
            try:
                return self._receive_locked(timeout, want)
            finally:
                with self.waiters_left:
                    self.waiters -= 1
                    if not self.waiters:
                        self.waiters_left.notify_all()
        return self._receive_locked(timeout, want)

    def _receive_locked(self, timeout, want):
        with self.lock:
            self.receiving += 1
            try:
                # Closed: its outstanding results have failed, and only their callbacks may be left to run.
                got = self._receive_some(timeout, want) if not self.closed else False
                self.run_due()
            finally:
                self.receiving -= 1
            return got

    def run_due(self):
        """Runs the callbacks of the results that have finished, one at a
        time: one cut short (a Ctrl-C) leaves the others for the next
        receiving, not lost."""
        due = self.due
        while due:
            ar = due[0]
            while ar._callbacks:
                fn = ar._callbacks.pop(0)
                try:
                    fn(ar)
                except Exception:  # one callback's failure must not stop the others, nor receiving
                    traceback.print_exc()
            due.pop(0)

    def _receive_some(self, timeout, want=1):
        """Receives what arrives within timeout seconds; True if anything did.

        The caller's thread does the receiving, under the client's lock: one
        thread at a time talks to the socket (ZeroMQ sockets are not
        thread-safe) and the lanes, and a waiting thread receives for
        everybody. Lanes (and the pools, whose replies come on lanes) are
        waited on through their doorbell (LaneRoute.wait); while
        controller replies are due too, in slices of a millisecond, looking
        at the socket between them.
        """
        with self.lock:
            lane, controller = self.lane, self.controller
            if lane.busy():
                if lane.poll():
                    return True
                if controller.busy():
                    if controller.poll():
                        return True
                    wait = min(max(timeout, 0), 0.001)
                else:
                    wait = min(max(timeout, 0), 0.005)  # another thread waits for the lock 5 ms at most
                return lane.wait(wait, want)
            return controller.wait(timeout)

    # ---- the driver thread ---------------------------------------------------------

    def drive(self, work, thread=True):
        """Hands out work's tasks from a thread of ours until none is left, so
        that a load-balanced map goes on while nobody waits for it.
        thread=False: only registers it (its caller waits, and so hands
        them out; close() and abort() still reach it)."""
        with self.lock:
            if work not in self.driven:
                self.driven.append(work)
            if thread:
                self._start_driver()

    def want(self, ar):
        """A Future's waiter or callback waits for ar: the client's thread
        receives while it is pending. Takes no lock but the driver's: the
        caller may hold ar's condition (concurrent.futures.wait does),
        which whoever completes ar takes under the client's lock."""
        ar._wanted = True
        self.wanted.append(ar)  # a deque: safe without the lock; the driver moves it to driven
        self._start_driver()

    def _start_driver(self):
        with self.driver_lock:
            if self.driver is None:
                self.driver = threading.Thread(target=self._drive_loop, name="shoal-load-balancer", daemon=True)
                self.driver.start()

    def _drive_loop(self):
        """While another thread waits for results, it receives, and so
        hands out the maps' tasks (from the callbacks of those that
        finish): the driver then only ticks every 5 ms, and does not take
        the lock from the waiter (a waiter kept from the lock is a map's
        tasks left unanswered meanwhile)."""
        try:
            while True:
                with self.lock:
                    while self.wanted:
                        w = self.wanted.popleft()
                        if w not in self.driven:
                            self.driven.append(w)
                    # A map cut short keeps being driven while it has tasks out
                    # (its _tick takes what their lost callbacks did not);
                    # a result a Future's waiter waits for, while it is pending.
                    self.driven = [w for w in self.driven if w._has_work() or getattr(w, "_attempts", None)
                                   or (w._wanted and not w._done())]
                    if not self.driven or self.closed:
                        with self.driver_lock:
                            if self.wanted and not self.closed:
                                continue  # wanted since we looked
                            # Under the same hold of the driver's lock as the
                            # decision: a drive() or want() after it starts a new thread.
                            self.driver = None
                        return
                    for w in list(self.driven):
                        if hasattr(w, "_tick"):
                            w._tick()  # a task waiting for its dependencies, or its timeout
                    if not self.waiters:
                        self.receive(0.005)
                        continue
                with self.waiters_left:
                    if self.waiters:
                        self.waiters_left.wait(0.005)
        except BaseException:
            with self.driver_lock:
                self.driver = None  # so that the next drive() starts another
            raise
