"""A million tasks through the controller: every one answered, and neither
the client nor the controller grows with their number (issue 15; README,
"Memory per task"). About 200 s here (~5,000 tasks/s through the controller
on 2 cores): SHOAL_MILLION sets the count (default 1,000,000)."""

import collections
import os
import time

import pytest

import shoal

from procs import Agent, Controller

N = int(os.environ.get("SHOAL_MILLION", "1000000"))
# What the client (RSS) and the controller (VmRSS) may grow by between the
# tenth of the run and its end, whatever N: the client's records are full
# at history_limit (100,000) tasks and trimmed in batches of an eighth
# (~1.5 MB); the rest is the allocators' slack. Before: ~400 bytes a task
# in the client, 360 MB over 900,000 tasks.
CLIENT_GROWTH = 48 << 20
CONTROLLER_GROWTH = 32 << 20
# Results a user's loop waits for at most: it keeps the latest AsyncResults
# in a window and takes each one's value as it leaves (the client's own
# window through the controller, CONTROLLER_WINDOW, is 2048 parts).
WINDOW = 4096

pytestmark = pytest.mark.skipif(
    "asan" in os.environ.get("LD_PRELOAD", ""),
    reason="a million tasks take ~200 s in the plain build, many times that under the sanitizers")


def rss(pid="self"):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


@pytest.mark.timeout(max(1800, N // 500))
def test_a_million_tasks_through_the_controller(tmp_path):
    ctl = Controller(tmp_path / "home", heartbeat_ms=500)
    agent = Agent(ctl, tmp_path / "run", engines=2)
    try:
        with shoal.Client(url_file=str(ctl.conn), lanes=False) as rc:
            dvs = [rc[e] for e in rc.ids]
            window = collections.deque()
            got = total = 0
            mark = None
            t0 = time.monotonic()
            for i in range(N):
                window.append(dvs[i & 1].apply_async(abs, -i))
                while len(window) > WINDOW:
                    total += window.popleft().get(60)
                    got += 1
                if i + 1 == N // 10:
                    mark = (rss(), rss(ctl.proc.pid))
            while window:
                total += window.popleft().get(60)
                got += 1
            took = time.monotonic() - t0
            end = (rss(), rss(ctl.proc.pid))
            assert got == N and total == N * (N - 1) // 2, "every task answered, with its own result"
            assert len(rc.history) <= rc.history_limit * 9 // 8 and len(rc._ended) <= rc.history_limit * 9 // 8
            print(f"\n{N} tasks in {took:.0f} s ({N / took:.0f}/s); client RSS {mark[0] >> 20} -> "
                  f"{end[0] >> 20} MiB, controller RSS {mark[1] >> 20} -> {end[1] >> 20} MiB "
                  f"(after {N // 10} tasks -> after {N})")
            assert end[0] - mark[0] < CLIENT_GROWTH, f"the client grew {(end[0] - mark[0]) >> 20} MiB"
            assert end[1] - mark[1] < CONTROLLER_GROWTH, f"the controller grew {(end[1] - mark[1]) >> 20} MiB"
        assert ctl.proc.poll() is None, "the controller still runs"
    finally:
        agent.stop()
        ctl.stop()
