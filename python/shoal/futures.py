"""Client.executor() and LoadBalancedView.executor: a
concurrent.futures.Executor over a LoadBalancedView."""

import concurrent.futures
import time
import weakref


class ViewExecutor(concurrent.futures.Executor):
    """Runs callables on the engines of a LoadBalancedView. submit()
    returns the task's AsyncResult, which is a concurrent.futures.Future
    (as ipyparallel's executor does): wait(), as_completed(), callbacks and
    asyncio work on it, the client receiving for them."""

    def __init__(self, view):
        self.view = view
        self._submitted = weakref.WeakSet()  # for shutdown(wait=True): those still held
        self._shut = False

    def submit(self, fn, /, *args, **kwargs):
        if self._shut:
            raise RuntimeError("cannot submit after shutdown")
        ar = self.view.apply_async(fn, *args, **kwargs)
        self._submitted.add(ar)
        return ar

    def map(self, fn, *iterables, timeout=None, chunksize=None):
        """view.imap(fn, *iterables): its results in order, as they come
        (a LazyMapIterator, as ipyparallel's executor returns; timeout: for
        each result, as concurrent.futures' map has it)."""
        if self._shut:
            raise RuntimeError("cannot map after shutdown")
        results = self.view.imap(fn, *iterables, chunksize=chunksize)
        if timeout is None:
            return results
        return _Timed(results, timeout)

    def shutdown(self, wait=True, *, cancel_futures=False):
        """No submit() after this; wait: until what was submitted has
        finished. cancel_futures: aborts what has not started."""
        self._shut = True
        pending = [ar for ar in self._submitted if not ar._done()]
        if cancel_futures and pending:
            self.view.client.abort(pending)
        if wait:
            self.view.client.wait(pending)


class _Timed:
    """Results of map that must each come within timeout seconds of the
    call, as concurrent.futures.Executor.map has it."""

    def __init__(self, results, timeout):
        self.results = results
        self.deadline = time.monotonic() + timeout

    def __iter__(self):
        return self

    def __next__(self):
        if time.monotonic() > self.deadline:
            self.results.cancel()
            raise TimeoutError("the map's results did not come within its timeout")
        return next(self.results)

    def cancel(self):
        self.results.cancel()
