"""Processes: the children the demo, the coturn wrapper, the lab tests and the benches start
(reading their output as it comes, stopping them), and this process's descriptor limit."""
from __future__ import annotations

import contextlib
import resource
import subprocess
import threading
import time
from typing import Any

from .errors import ProcessError


def raise_fd_limit(want: int | None = None) -> None:
    """Lift the soft RLIMIT_NOFILE to ``want`` (None: to the hard limit), never above the hard
    limit and never down; a limit the system refuses is left as it is."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if want is None or (hard != resource.RLIM_INFINITY and want > hard) else want
    if soft != resource.RLIM_INFINITY and (target == resource.RLIM_INFINITY or soft < target):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


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


class OutputLines:
    """Every line a process writes to one stream, read by a thread so its pipe never fills."""

    def __init__(self, proc: subprocess.Popen[bytes], stream: str, what: str) -> None:
        self.proc, self.what = proc, what
        self.lines: list[str] = []
        self._new = threading.Condition()
        self._eof = False
        threading.Thread(target=self._pump, args=(getattr(proc, stream),), daemon=True).start()

    def _pump(self, pipe: Any) -> None:
        for raw in iter(pipe.readline, b""):
            with self._new:
                self.lines.append(raw.decode(errors="replace").rstrip())
                self._new.notify_all()
        with self._new:
            self._eof = True
            self._new.notify_all()

    def wait_for(self, needle: str, timeout: float) -> str:
        """The first line containing ``needle``; ProcessError naming what came instead."""
        deadline = time.monotonic() + timeout
        with self._new:
            while True:
                for line in self.lines:
                    if needle in line:
                        return line.strip()
                left = deadline - time.monotonic()
                if self._eof or left <= 0:
                    break
                self._new.wait(left)
            tail = "\n  ".join(self.lines[-8:]) or "(no output)"
        state = "still running" if self.proc.poll() is None else f"exited with {self.proc.returncode}"
        raise ProcessError(f"{self.what} did not come up within {timeout:.0f} s ({state}):\n  {tail}")
