"""joblib on a shoal cluster: the backend behind ``view.register_joblib_backend``
and ``shoal.register_joblib_backend``, as ipyparallel's ``_joblib`` is.

``joblib.Parallel`` hands its backend batches of calls (``BatchedCalls``)
and waits for them through callbacks. Here each batch is one task of a
LoadBalancedView (a DirectView's engines get one made over them), so a
batch runs on whichever engine is free; joblib sizes the batches itself
(AutoBatchingMixin: a batch grows until it takes 0.2 to 2 s), and keeps
``2 * n_jobs`` of them out at once, ``n_jobs`` being the view's number of
engines.

One thing differs from joblib's own backends and needs care: shoal runs a
result's done-callbacks in the thread that receives it, holding the
client's lock, and joblib's callback takes ``Parallel``'s lock to hand out
the next batch, while joblib's own thread submits batches holding
``Parallel``'s lock and so takes the client's lock second. Run in the
receiving thread, the callback would take the two locks in the other order,
and the two threads could each wait for the other's. So a done-callback
here only queues joblib's callback for a thread of the backend's own
(``shoal-joblib``), which runs it holding no lock of the client's: the
locks are then always taken ``Parallel``'s first.

A task's error reaches joblib as ``future.result()`` raises it: shoal's
RemoteError (engine id, ``ename``, ``evalue``, the remote traceback), as
under ipyparallel, not the engine's exception itself as joblib's process
backends raise it.
"""

import concurrent.futures
import functools
import threading

try:
    from joblib.parallel import AutoBatchingMixin, ParallelBackendBase, register_parallel_backend
except ImportError as e:  # joblib is needed only by whoever registers a backend
    raise ImportError("register_joblib_backend needs joblib: install it (pip install joblib) "
                      "in the client's environment and the engines'") from e

import sys


class IPythonParallelBackend(AutoBatchingMixin, ParallelBackendBase):
    """A joblib backend that runs each batch as a task of a LoadBalancedView.

    ``view``: a LoadBalancedView (used as it is, flags included), a
    DirectView (a load-balanced view over the same engines is made), or
    None: a ``shoal.Client()`` of the default profile, connected when first
    needed and closed by ``terminate()`` at the end of each ``Parallel``
    call. Unlike ipyparallel's, it does not start a cluster when none is
    running: ``Client()`` raises, saying to run ``shoal start``.
    """

    supports_retrieve_callback = True  # results are taken in the callback (and so timeout and return_as work)

    def __init__(self, view=None, connect=None, **kwargs):
        super().__init__(**kwargs)
        # What makes the default profile's client: shoal.Client (given by
        # shoal.register_joblib_backend; this module imports no client, so
        # that none imports it back).
        self._connect = connect or sys.modules[__package__].Client
        if view is not None:
            view = view._load_balanced()
        self._given = view  # None: the default profile's, through a client of our own
        self._client = None  # that client, while connected
        self._connecting = threading.Lock()  # one thread connects it
        self._lock = threading.Lock()  # guards _pending and _callbacks
        self._pending = set()  # the tasks submitted and not yet done, for abort_everything
        self._callbacks = None  # the executor whose one thread runs joblib's callbacks

    @property
    def _view(self):
        """The LoadBalancedView the batches go to (the default profile's
        is connected here, on first use)."""
        if self._given is not None:
            return self._given
        with self._connecting:
            if self._client is None:
                client = self._connect()
                try:
                    client.wait_for_engines(1, timeout=client.timeout)
                except BaseException:
                    client.close()
                    raise
                self._client = client
            return self._client.load_balanced_view()

    def effective_n_jobs(self, n_jobs):
        """The view's number of engines, whatever n_jobs asks (as in
        ipyparallel: the view, not the caller, says how wide it is)."""
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        view = self._view
        n = len(view)
        if n == 0:
            raise RuntimeError(f"{view!r} has no engines to run joblib's batches on: start some "
                               f"(shoal start) or wait for them (Client.wait_for_engines)")
        return n

    def configure(self, n_jobs=1, parallel=None, **backend_kwargs):
        n = super().configure(n_jobs, parallel, **backend_kwargs)
        with self._lock:
            if self._callbacks is None:
                self._callbacks = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="shoal-joblib")
        return n

    def submit(self, func, callback=None):
        """Sends the batch func as one load-balanced task; returns its
        AsyncResult (a concurrent.futures.Future). callback(future) runs on
        the backend's thread once it is done (see the module's doc)."""
        future = self._view.apply_async(func)
        with self._lock:
            self._pending.add(future)
        future.add_done_callback(functools.partial(self._done, callback))
        return future

    def _done(self, callback, future):
        """A task's done-callback, in the thread that received it (holding
        the client's lock): hands joblib's callback to the backend's thread."""
        with self._lock:
            self._pending.discard(future)
            runner = self._callbacks
            if callback is not None and runner is not None:
                runner.submit(callback, future)
        # No runner: the Parallel call has ended (terminate), and joblib
        # would ignore what is left of it.

    def retrieve_result_callback(self, out):
        """The batch's list of results; raises its task's error (RemoteError,
        EngineError, TaskAborted)."""
        return out.result()

    def abort_everything(self, ensure_ready=True):
        """Aborts the tasks still outstanding (Client.abort): those no engine
        has started fail with TaskAborted, which joblib ignores; those
        running finish. The backend stays usable either way."""
        with self._lock:
            pending, self._pending = list(self._pending), set()
        client = self._given.client if self._given is not None else self._client
        if pending and client is not None:  # no client: it was closed, which failed them all
            client.abort(pending)

    def terminate(self):
        """At the end of a Parallel call: stops the callbacks' thread, and
        closes the client if this backend made it (the next call connects
        again)."""
        with self._lock:
            runner, self._callbacks = self._callbacks, None
            client, self._client = self._client, None
        if runner is not None:
            runner.shutdown(wait=False)  # what it has queued is of this call, ended: it runs and goes
        if client is not None:
            client.close()
        self.reset_batch_stats()


def register(view, name="ipyparallel", make_default=False):
    """Registers view (a DirectView or a LoadBalancedView) as the joblib
    backend name: ``joblib.parallel_config(backend=name)`` (or
    ``Parallel(backend=name)``) then runs joblib's batches on its engines,
    load-balanced. make_default: joblib's default backend from now on."""
    register_parallel_backend(name, functools.partial(IPythonParallelBackend, view=view), make_default=make_default)


def register_default(connect, name="ipyparallel", make_default=False):
    """Registers the default profile's cluster as the joblib backend name:
    each Parallel call connects a client (connect(): ``shoal.Client()``) and
    runs on its load_balanced_view(). make_default: joblib's default
    backend from now on."""
    register_parallel_backend(name, functools.partial(IPythonParallelBackend, connect=connect),
                              make_default=make_default)
