"""Absolute-time waits for the pure engine: sleep most of the way, spin the last stretch."""
from __future__ import annotations

import time

SPIN = 0.002
"""time.sleep() overshoots by 50-100 us (more on a busy box); the last SPIN s are a busy-wait
on time.time() so the first SYN leaves within a few microseconds of the target."""


def wait_until(when: float) -> None:
    """Return once time.time() >= ``when`` (CLOCK_REALTIME, like the C engine's TIMER_ABSTIME)."""
    left = when - time.time()
    if left > SPIN:
        time.sleep(left - SPIN)
    while time.time() < when:
        pass


def ns_since(t: float, start: float) -> int:
    """``t - start`` in integer nanoseconds."""
    return int(round((t - start) * 1e9))
