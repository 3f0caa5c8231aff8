"""When the initiator stops waiting for the punch (relay_race.decision_time) and what a race
that brings up no path raises: sans-I/O, no lab."""
from __future__ import annotations

import asyncio

import pytest

from pyholepunch.engine import PunchResult
from pyholepunch.errors import PunchError, RelayError
from pyholepunch.relay_race import DECIDE_AFTER, DECIDE_BY, decision_time, direct_or_relay
from pyholepunch.report import ConnectionReport

RTT = 0.04


def test_an_on_time_start_decides_within_the_second() -> None:
    started = 100.0
    start_at = started + RTT / 2 + 0.01           # a PUNCH on a steady path
    assert decision_time(start_at, started, RTT, 0.005) == pytest.approx(
        start_at + DECIDE_AFTER + 0.01)
    late_start = started + 0.3                    # a sequential initiator announces first
    assert decision_time(late_start, started, RTT) == pytest.approx(started + DECIDE_BY)


def test_a_late_start_still_gives_the_punch_its_window() -> None:
    started = 100.0
    start_at = started + 0.65                     # a lost CONNECT segment: an RTO late
    decide = decision_time(start_at, started, RTT)
    assert decide - start_at >= 8 * RTT - 1e-9     # before: 0.05 s after the start
    assert decide - start_at >= 0.3 - 1e-9


def test_a_jittery_or_lossy_path_waits_longer_but_bounded() -> None:
    started, start_at = 100.0, 100.1
    steady = decision_time(start_at, started, RTT, 0.004)
    lossy = decision_time(start_at, started, RTT, 0.4)       # a retransmitted ping
    assert lossy > steady
    assert lossy - started <= DECIDE_BY + 2 * 0.25 + 1e-9    # capped: MAX_SPREAD_MARGIN
    assert decision_time(start_at, started, RTT, -5.0) == pytest.approx(steady - 0.008)


class _Failing:
    """A punch whose every direct step failed."""
    rtt = RTT
    streams = None

    async def run(self) -> PunchResult:
        raise PunchError("every direct step failed")


@pytest.mark.asyncio
async def test_no_path_raises_one_relay_error_naming_why() -> None:
    async def join() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        raise TimeoutError("the peer never joined the relay")

    async def never(_: object) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        raise AssertionError("no TLS without a connection")

    report = ConnectionReport("initiator", peer_name="bob")
    with pytest.raises(RelayError, match="neither a direct nor a relayed.*never joined"):
        await direct_or_relay(punch=_Failing(), secure=never, join_relay=join,  # type: ignore[arg-type]
                              relay_tls=never, initiator=True, start_at=report.started,
                              report=report)
