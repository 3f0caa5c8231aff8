"""Sequential prediction under other hosts' traffic (issue #19): pure arithmetic, no I/O.

A sequential NAT hands the next port (last + delta) to whoever opens the next flow. Between a
peer's announcement and its sweep, other hosts behind the same NAT take ports: the *drift*.
Measured in the lab (bench/bench_hard_pairs.py), a mutual sweep that pairs socket i with the
peer's announced + delta * i dies at 2 background connections/s: it needs drift_a + drift_b = 0.

What each side can know: its own drift, by one STUN probe right before the sweep (the probe's
mapping minus the announced one, in delta steps). What it cannot know: the peer's drift. The
pairing below needs only the former:

    side X's k-th sweep socket (allocated at X's index d_X + k) aims at the peer's index
    e_X + k + o_k,  e_X = X's measured drift,  o_k = an offset of the chooser's window.

Socket k of the chooser A and socket k' of the follower B connect when A aims at B's socket and
B at A's: k + e_A + o_k = d_B + k'  and  k' + e_B = d_A + k, i.e. o_k = u_A + u_B, where
u = d - e is the drift nobody observed (allocations between the probe and the sweep), and
k' = k + d_A - e_B. So the drifts themselves may differ by up to the follower's count; only
the unobserved part must fall inside the chooser's offset window, which is sized from the
measured allocation rate and the time from probe to sweep. The chooser cycles its offsets
0..w-1 over consecutive sockets, so every offset meets every shift.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from .steps import PORT_RANGE

MAX_WINDOW = 16            # offsets the chooser cycles through (covers ~ 8 unseen allocations/side)
HISTORY = 8                # observations kept for the allocation rate
RATE_HORIZON_S = 120.0     # older observations do not count towards the rate


def index_port(announced: int, delta: int, index: int) -> int:
    """The port a sequential NAT gives its ``index``-th flow after ``announced`` (wrapping
    inside PORT_RANGE, as :func:`steps.remote_ports` does)."""
    lo, hi = PORT_RANGE
    return lo + (announced - lo + delta * index) % (hi - lo + 1)


def drift(announced: int, observed: int, delta: int) -> int:
    """Allocations from ``announced`` to ``observed`` (the observing flow included), >= 0."""
    lo, hi = PORT_RANGE
    steps = ((observed - announced) * (1 if delta > 0 else -1)) % (hi - lo + 1)
    return max(0, steps // abs(delta))


def window(rate: float, unseen_s: float) -> int:
    """Offsets the chooser cycles through: the allocations expected on both sides between the
    probe and the sweep (``rate`` per side), plus three standard deviations (Poisson), plus one."""
    mean = 2 * max(rate, 0.0) * max(unseen_s, 0.0)
    return max(1, min(MAX_WINDOW, math.ceil(mean + 3 * math.sqrt(mean)) + 1))


def mutual_targets(peer_announced: int, peer_delta: int, count: int, own_drift: int,
                   offsets: int = 1) -> list[int]:
    """The peer ports our ``count`` sweep sockets aim at, in socket order (see the module
    docstring): socket k -> the peer's index own_drift + k + (k - 1) % offsets."""
    return [index_port(peer_announced, peer_delta, own_drift + k + (k - 1) % offsets)
            for k in range(1, count + 1)]


@dataclass(frozen=True)
class Observation:
    at: float          # time.time() when the observing flow was opened
    port: int          # the external port it was given


class AllocationTracker:
    """Our sequential NAT's observed positions: the drift since the announcement and the rate
    at which other flows take ports (each observation after the first took one itself)."""

    def __init__(self, delta: int) -> None:
        if not delta:
            raise ValueError("a sequential NAT has a non-zero delta")
        self.delta = delta
        self._seen: deque[Observation] = deque(maxlen=HISTORY)
        self.announced: Observation | None = None
        self.probe_s: float | None = None     # how long a probe to the server takes (EWMA)

    def observe(self, at: float, port: int, *, announced: bool = False,
                took: float | None = None) -> None:
        """``port`` was given to a flow opened at ``at``; ``took``: the probe's duration."""
        obs = Observation(at, port)
        self._seen.append(obs)
        if announced:
            self.announced = obs
        if took is not None and took >= 0:
            self.probe_s = took if self.probe_s is None else 0.7 * self.probe_s + 0.3 * took

    def drift(self, port: int) -> int:
        """Allocations since the announced mapping up to ``port`` (its own flow included)."""
        if self.announced is None:
            return 0
        return drift(self.announced.port, port, self.delta)

    def rate(self) -> float:
        """Other flows per second, over the observations of the last RATE_HORIZON_S."""
        seen = list(self._seen)
        if len(seen) < 2:
            return 0.0
        recent = [o for o in seen if o.at >= seen[-1].at - RATE_HORIZON_S] or seen[-1:]
        first, last = recent[0], recent[-1]
        span = last.at - first.at
        if len(recent) < 2 or span <= 0:
            return 0.0
        others = drift(first.port, last.port, self.delta) - (len(recent) - 1)
        return max(0.0, others / span)
