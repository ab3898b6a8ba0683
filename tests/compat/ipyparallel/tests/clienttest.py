"""The wheel's clienttest.py (kept beside this as _wheel_clienttest.py),
with three methods of ClusterTestCase replaced for a shoal cluster; all else
(the helper functions, raises_remote, skip_without, the rest of
ClusterTestCase) is the wheel's own.

- connect_client: the wheel's passes its zmq context, Client(profile='iptest',
  context=...); a shoal Client has no zmq context to share (its sockets are
  the C core's), so it connects to the run's profile without one.
- setup_method: the wheel's clears the engines' namespaces with
  self.client.clear(block=True); where shoal's Client has no clear() this
  does it with the view's, self.client[:].clear(block=True), so that the
  lack shows in the test that calls Client.clear (test_client's test_clear)
  and not in every test's setup.
- teardown_method: the wheel's first resets the engines' serializer with
  self.client[:].use_pickle(); shoal always serializes with cloudpickle, so
  that step runs only where the view has use_pickle. A test that calls
  use_pickle/use_dill itself still meets shoal's as it is.
"""

import signal

from . import _wheel_clienttest
from ._wheel_clienttest import *  # noqa: F401,F403
from ._wheel_clienttest import Client, add_engines, launchers, zmq
from . import cluster_profile

ClusterTestCase = _wheel_clienttest.ClusterTestCase


def connect_client(self):
    c = Client(profile=cluster_profile())
    c.wait = lambda *a, **kw: self.client_wait(c, *a, **kw)
    return c


def setup_method(self):
    self.context = zmq.Context.instance()
    if hasattr(signal, 'SIGALRM'):
        # use sigalarm for test timeout
        def _sigalarm(sig, frame):
            raise TimeoutError(f"test did not finish in {self.test_timeout} seconds")

        signal.signal(signal.SIGALRM, _sigalarm)
        signal.alarm(self.test_timeout)

    add_engines(self.engine_count, total=True)

    self.client = self.connect_client()
    # start every test with clean engine namespaces:
    if hasattr(self.client, "clear"):
        self.client.clear(block=True)
    else:
        self.client[:].clear(block=True)
    self.base_engine_count = len(self.client.ids)
    self.engines = []


def teardown_method(self):
    if len(self.client) and hasattr(self.client[:], "use_pickle"):
        self.client[:].use_pickle()
    for e in filter(lambda e: e.poll() is not None, launchers):
        launchers.remove(e)
    self.client.wait(timeout=2)
    self.client.close()
    if hasattr(signal, 'SIGALRM'):
        signal.alarm(0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
    self.context.destroy()


ClusterTestCase.connect_client = connect_client
ClusterTestCase.setup_method = setup_method
ClusterTestCase.teardown_method = teardown_method
