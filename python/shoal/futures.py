"""Client.executor() and LoadBalancedView.executor: a
concurrent.futures.Executor over a LoadBalancedView."""

import concurrent.futures
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

    def shutdown(self, wait=True, *, cancel_futures=False):
        """No submit() after this; wait: until what was submitted has
        finished. cancel_futures: aborts what has not started."""
        self._shut = True
        pending = [ar for ar in self._submitted if not ar._done()]
        if cancel_futures and pending:
            self.view.client.abort(pending)
        if wait:
            self.view.client.wait(pending)
