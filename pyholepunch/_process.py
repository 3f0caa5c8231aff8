"""Stopping child processes (servers the demo, coturn wrapper, lab tests and benches start)."""
from __future__ import annotations

import subprocess
import time


def stop_processes(*procs: subprocess.Popen[bytes] | subprocess.Popen[str],
                   grace: float = 5.0) -> None:
    """SIGTERM every one still running, give them ``grace`` seconds together to exit, then
    SIGKILL and reap whatever is left (no zombies, no process outliving its owner)."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
