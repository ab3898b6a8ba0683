"""Client.executor(): a concurrent.futures.Executor over a LoadBalancedView."""

import concurrent.futures


class ViewExecutor(concurrent.futures.Executor):
    """Runs callables on the engines of a LoadBalancedView. Futures complete
    as their results arrive; a thread of the client receives them while
    any is pending, so waiting on a future needs nothing else."""

    def __init__(self, view):
        self.view = view
        self._pending = set()
        self._shut = False

    def submit(self, fn, /, *args, **kwargs):
        if self._shut:
            raise RuntimeError("cannot submit after shutdown")
        future = concurrent.futures.Future()
        future.set_running_or_notify_cancel()
        ar = self.view.apply_async(fn, *args, **kwargs)
        self._pending.add(future)

        def done(ar):
            self._pending.discard(future)
            try:
                future.set_result(ar.get(0))
            except BaseException as e:
                future.set_exception(e)
        ar.add_done_callback(done)
        self.view.client._drive(self)
        return future

    def _has_work(self):
        """While a future is pending, the client's thread receives for it."""
        return bool(self._pending)

    def shutdown(self, wait=True, *, cancel_futures=False):
        self._shut = True
        if wait:
            concurrent.futures.wait(list(self._pending))
