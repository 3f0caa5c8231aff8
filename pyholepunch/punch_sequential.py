"""A sequential NAT's side of a mutual prediction sweep: re-measure our position right before
the sweep and aim from there (strategy/sequential.py has the arithmetic and why it works).

The peer keeps an :class:`AllocationTracker` of its own NAT (every announcement is an
observation); :class:`SequentialSide` gives punch.py the peer ports to aim at, after one STUN
probe from a fresh port at the step's start. A probe that fails or comes too late leaves the
drift unmeasured (0, as before this existed) and says so in the log.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from .address import Address
from .nat.profile import Allocation, Mapping, NatProfile
from .strategy import RoleInstruction
from .strategy.sequential import AllocationTracker, mutual_targets, window

__all__ = ["AllocationTracker", "SequentialSide", "sequential_side", "stale", "tracker_for"]
log = logging.getLogger(__name__)

# An announcement younger than this is the prediction base as it is: a CONNECT goes out at
# once. An older one is learned again first (a STUN probe over TCP: 2 RTT before CONNECT, the
# most of a predict-sweep's time to connect over a cone's, issue 18). Other hosts' flows in the
# meantime are the drift the sweeps absorb: at 50 flows/s, ~50 of the cone's 7 x count spare
# targets, ~as a responder's announcement ages between sessions.
FRESH_S = 1.0


def stale(tracker: AllocationTracker | None, now: float) -> bool:
    """Should a sequential initiator re-learn its mapping before CONNECT? (``tracker``: its
    NAT's positions; None, or no announcement yet: yes.)"""
    return tracker is None or tracker.announced is None or now - tracker.announced.at > FRESH_S


@dataclass
class SequentialSide:
    tracker: AllocationTracker
    probe: Callable[[], Awaitable[int]]     # a fresh flow to the server: its external port
    last: dict[str, float] | None = None    # drift, rate, offsets of the latest measurement

    async def mutual_remotes(self, ins: RoleInstruction, *, sweep_at: float, peer_ip: str,
                             peer_port: int, chooser: bool) -> list[Address]:
        """Our sweep's targets: the peer's announced + delta * (our drift + k + offset).

        Probes at once and returns as soon as the probe answers (``sweep_at``, the plan's
        sweep time, bounds the wait): the caller sweeps right away, so the allocations nobody
        saw are those of one probe's duration. Behind NATs that drop unsolicited SYNs (the
        sequential ones we know) the two sweeps need not start together: the SYNs of the
        earlier side die at the other NAT, but its own NAT keeps them open for the later one."""
        assert ins.delta is not None
        t = time.time()
        own = 0
        try:
            port = await asyncio.wait_for(self.probe(), max(0.01, sweep_at - t))
        except (OSError, TimeoutError) as exc:
            log.info("sequential: no position before the sweep (%s): aiming at drift 0",
                     exc or type(exc).__name__)
        else:
            self.tracker.observe(t, port, took=time.time() - t)
            own = self.tracker.drift(port)
        rate = self.tracker.rate()
        offsets = window(rate, time.time() - t + 0.02) if chooser else 1
        self.last = {"drift": own, "rate": round(rate, 2), "offsets": offsets}
        log.info("sequential: drift %d since the announcement, %.1f other flows/s, %d offsets",
                 own, rate, offsets)
        return [(peer_ip, p) for p in mutual_targets(peer_port, ins.delta, ins.count, own, offsets)]


def tracker_for(profile: NatProfile) -> AllocationTracker | None:
    """A tracker when ``profile`` is a sequential symmetric NAT with a known delta."""
    if profile.mapping in (Mapping.ADDRESS_DEPENDENT, Mapping.ADDRESS_AND_PORT_DEPENDENT) \
            and profile.allocation is Allocation.SEQUENTIAL and profile.delta:
        return AllocationTracker(profile.delta)
    return None


def sequential_side(tracker: AllocationTracker | None,
                    probe: Callable[[], Awaitable[Any]]) -> SequentialSide | None:
    """What Punch needs of a sequential side (None for any other NAT); ``probe``: a STUN
    binding from a fresh local port (punchport.probe: its result's ``mapped`` address)."""
    if tracker is None:
        return None

    async def port() -> int:
        return int((await probe()).mapped[1])

    return SequentialSide(tracker, port)
