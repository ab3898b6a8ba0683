"""examples/idioms.py: twenty-five idioms of ipyparallel's documentation,
run as a user's plain script (its functions are functions of __main__)
against a real cluster of three engines."""

import subprocess
import sys
from pathlib import Path

from procs import Agent, Controller

ROOT = Path(__file__).resolve().parents[2]


def test_the_idioms_of_ipyparallels_documentation_run_as_a_script(tmp_path):
    ctl = Controller(tmp_path / "home", heartbeat_ms=500)
    agent = Agent(ctl, tmp_path / "run", engines=3)
    try:
        p = subprocess.run([sys.executable, str(ROOT / "examples" / "idioms.py"), "--url-file", str(ctl.conn)],
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0 and p.stdout.rstrip().endswith("25 passed, 0 failed"), p.stdout + p.stderr
    finally:
        agent.stop()
        ctl.stop()
