"""The relay race's times scale with the measured RTT (relay_race.race_timings, #19).

At the lab's 40 ms the constants hold (the relay carries data <= 1 s after connect(); the lab
test tests/lab/test_relay_race.py checks that end to end); on a long path the direct steps get
the round trips they need. The race itself runs here with futures standing in for the punch
and the relay, so the decision time is measured without a network (~3 s in all).
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from pyholepunch import relay_race
from pyholepunch.relay_race import RaceTimings, race_timings
from pyholepunch.report import ConnectionReport, Route


def test_lab_rtt_keeps_the_measured_constants() -> None:
    base = RaceTimings(relay_race.PREPARE_AFTER, relay_race.DECIDE_AFTER, relay_race.DECIDE_BY,
                       relay_race.JOIN_ALLOWANCE)
    for rtt in (None, 0.0, 0.0002, 0.040, 0.055):   # loopback, the lab, the lab under load
        assert race_timings(rtt) == base, rtt


def test_the_decision_time_follows_the_scaled_timings() -> None:
    started = 100.0
    start_at = started + 0.05
    lab = relay_race.decision_time(start_at, started, 0.040)
    assert lab == pytest.approx(start_at + relay_race.DECIDE_AFTER)      # as before #19's scaling
    far = relay_race.decision_time(start_at, started, 0.2)
    assert far == pytest.approx(start_at + 2.0)                          # 10 RTTs of 200 ms


def test_long_paths_get_more_time_for_the_direct_steps() -> None:
    t = race_timings(0.2)     # a 200 ms RTT to the server: ~400 ms between the peers
    assert t.decide_after == pytest.approx(2.0)
    assert t.decide_by == pytest.approx(2.4)
    assert t.prepare_after == pytest.approx(0.6)
    assert t.join_allowance == pytest.approx(1.0)
    # monotone in the RTT, and bounded when the estimate is nonsense (seconds of lag)
    times = [race_timings(r).decide_after for r in (0.05, 0.08, 0.12, 0.3, 0.5)]
    assert times == sorted(times) and times[-1] > times[0]
    assert race_timings(30.0).decide_after == relay_race.MAX_DECIDE_AFTER


class _Writer:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


async def _race(rtt: float, direct_after: float | None) -> tuple[Route, float]:
    """Run the initiator's race: the punch connects after ``direct_after`` s (None: never),
    the relay joins at once; (route, when it was decided, s after the start)."""
    loop = asyncio.get_running_loop()
    start = time.time()
    report = ConnectionReport(role="initiator", started=start)
    punched: asyncio.Future[Any] = loop.create_future()
    if direct_after is not None:
        loop.call_later(direct_after, punched.set_result, object())
    relay_streams = (object(), _Writer())
    direct_streams = (object(), _Writer())

    async def punch() -> Any:
        return await punched

    async def secure(_won: Any) -> Any:
        return direct_streams

    async def join() -> Any:
        return relay_streams

    async def relay_tls(streams: Any) -> Any:
        return streams

    try:
        route, streams, _why, cause = await relay_race._race(
            punch(), secure, join, relay_tls, True, start, report, rtt)
    finally:
        if not punched.done():
            punched.cancel()
    took = time.time() - start
    assert streams is (direct_streams if route is Route.DIRECT else relay_streams)
    if route is Route.RELAY:
        assert cause == "direct_pending"
    return route, took


@pytest.mark.asyncio
async def test_the_decision_waits_longer_on_a_long_path() -> None:
    # 40 ms: no direct connection 0.6 s after the start -> the relay (decision_time keeps
    # 8 RTTs after the start at the least, 0.32 s here: the floor rules)
    route, took = await _race(0.040, None)
    assert route is Route.RELAY
    assert 0.55 <= took < 0.9, took
    # 100 ms: a direct connection at 0.8 s still wins (the constant 0.6 s would have relayed)
    route, took = await _race(0.100, 0.8)
    assert route is Route.DIRECT, took
    # ... and without one the relay takes over at ~1.0 s, not at once and not never
    route, took = await _race(0.100, None)
    assert route is Route.RELAY
    assert 0.95 <= took < 1.4, took

