"""`shoal bench soak` (shoal.soak) in small, and what it found: a
load-balanced map over a list of engines that all died waited for ever."""

import os
import signal
import subprocess
import sys
import time

import pytest

import shoal

from procs import Agent, Controller


@pytest.mark.parametrize("lanes", [True, False])
def test_a_map_over_engines_that_all_died_fails_its_items_not_waits(tmp_path, lanes):
    # Found by the soak: a map's items not yet handed out when the last
    # engine of its view died were never handed out, and never failed
    # (view.py, LoadBalancedMapResult._fill found no engine and returned).
    ctl = Controller(tmp_path / "home", heartbeat_ms=500)
    agent = Agent(ctl, tmp_path / "run", engines=2, extra=["--restart-engines"])
    c = shoal.Client(url_file=str(ctl.conn), timeout=10, lanes=lanes)
    try:
        ids = c.ids
        pids = c[ids].apply_sync(os.getpid)
        lview = c.load_balanced_view(ids)
        ar = lview.map_async(time.sleep, [0.1] * 200, chunksize=1, return_exceptions=True)
        time.sleep(0.5)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        values = ar.get(timeout=30)
        assert len(values) == 200
        failed = [v for v in values if isinstance(v, BaseException)]
        assert failed and all(isinstance(v, shoal.EngineError) for v in failed), failed[:3]
        assert all(v is None for v in values if not isinstance(v, BaseException))
        # The view's engines are gone for good (new ones have new ids): a new map fails at once.
        deadline = time.monotonic() + 10
        while set(c.ids) & set(ids) and time.monotonic() < deadline:
            time.sleep(0.1)
        late = lview.map_async(abs, [1, 2, 3], chunksize=1, return_exceptions=True)
        values = late.get(timeout=10)
        assert len(values) == 3 and all(isinstance(v, shoal.EngineError) for v in values), values
        assert "every engine of its load-balanced view" in str(values[0])
    finally:
        c.close()
        agent.stop()
        ctl.stop()
