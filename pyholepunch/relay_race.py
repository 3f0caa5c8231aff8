"""Direct and relay side by side: the relay is ready before the direct steps run out (#19).

Before, the relay step ran only after every direct step had failed: 3.7 s after connect() for
a sequential pair whose sweep missed. Now, for a plan with both direct steps and a relay:

- the initiator starts joining the relay ``prepare_after`` s after the common start, while
  the punch goes on (asking the server for a relay grant, which also reaches the responder);
- the responder joins the relay as soon as a grant arrives, and keeps punching too;
- the initiator decides: a direct connection up before ``decide_after`` (``decide_by`` after
  connect() at the latest) wins; after that, with
  the relay joined, it runs TLS over the relay (the relay then carries data) and stops
  waiting for the punch; when every direct step fails earlier, the relay is taken at once.

The three times scale with the measured RTT to the server (:func:`race_timings`): at the lab's
40 ms they are the constants below (the relay carries data <= 1 s after connect()); on a long
path the direct steps get the round trips they need before the relay takes over;
- the responder takes whichever of the two its peer completes a TLS handshake on (the
  initiator speaks first and only on the path it chose; the other path is closed).

A direct connection that comes up after the relay was chosen is recorded in the report
(``direct_after_relay_s``, ``Connection.direct_seen``) and closed; the caller may then ask
for a direct connection (``Connection.upgrade()``: a new session without relay fallback) and
move its data there. A transparent move of a live stream (libp2p's DCUtR) is not built.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from .engine import PunchResult
from .errors import PunchError, RelayError
from .punch import PunchRun, close_late_result
from .report import ConnectionReport, Route
from .signal.machine import MAX_SPREAD_MARGIN

log = logging.getLogger(__name__)

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]
# The floors (s), measured at 40 ms RTT on a loaded machine, and the same times in RTTs to the
# server (``rtt``, the signaling connection's); each time is the larger of the two, so up to
# ~60 ms (the lab's 40 ms plus measurement noise under load) nothing changes.
PREPARE_AFTER = 0.2     # after start_at: the initiator starts joining the relay
DECIDE_AFTER = 0.6      # after start_at: no direct connection yet -> TLS over the relay
DECIDE_BY = 0.7         # after connect() at the latest (a sequential initiator announces
                        # first: its start_at is later), so the relay carries data within ~1 s
JOIN_ALLOWANCE = 0.3    # the relay join gets before the decision, at the least
# In RTTs to the server. The peer-to-peer RTT is ~2 of them (both peers' legs; the peer's own
# is not known here, so ours stands for it). A direct connection needs one path RTT for the
# simultaneous open, one silence re-arm (3 RTTs, stun.client.silence_rearm) for a lost SYN, and
# TLS 1.3 (1.5 path RTTs): ~10 server RTTs. Joining the relay: grant request, relay connect,
# its handshake and the partner's join: ~5.
PREPARE_RTTS = 3.0
DECIDE_RTTS = 10.0
DECIDE_BY_RTTS = 12.0   # connect() -> start_at takes ~2 RTTs (CONNECT, PUNCH) plus margin
JOIN_RTTS = 5.0
MAX_DECIDE_AFTER = 8.0  # s: a bogus RTT estimate (seconds of signaling lag) still ends


@dataclass(frozen=True, slots=True)
class RaceTimings:
    """When the initiator prepares the relay and decides, in s (see the module docstring)."""

    prepare_after: float    # after start_at
    decide_after: float     # after start_at
    decide_by: float        # after connect()
    join_allowance: float   # before the decision, at the least


def race_timings(rtt: float | None) -> RaceTimings:
    """The race's times for an RTT to the server of ``rtt`` s (None: unknown, the floors)."""
    if rtt is None or not rtt > 0:
        rtt = 0.0
    rtt = min(rtt, MAX_DECIDE_AFTER / DECIDE_RTTS)

    def scaled(floor: float, rtts: float) -> float:
        return round(max(floor, rtts * rtt), 3)
    return RaceTimings(scaled(PREPARE_AFTER, PREPARE_RTTS), scaled(DECIDE_AFTER, DECIDE_RTTS),
                       scaled(DECIDE_BY, DECIDE_BY_RTTS), scaled(JOIN_ALLOWANCE, JOIN_RTTS))
DIRECT_WINDOW = 0.3     # s after start_at the direct steps get at the least, and DIRECT_RTTS
DIRECT_RTTS = 8         # round trips: a late start (a lost signaling segment costs an RTO)
                        # must not leave the punch a few ms before the decision
LATE_SPREADS = 2        # and this many RTT spreads more: the peer's PUNCH may come that late


async def direct_or_relay(*, punch: PunchRun, secure: Callable[[PunchResult], Awaitable[Streams]],
                          join_relay: Callable[[], Awaitable[Streams]],
                          relay_tls: Callable[[Streams], Awaitable[Streams]],
                          initiator: bool, start_at: float, report: ConnectionReport,
                          spread: float = 0.0) -> tuple[Route, Streams]:
    """(route, TLS streams) for a plan with direct steps and a relay, the report finished
    (with the reason and cause of a fallback). Raises the relay's error when neither path
    comes up."""
    async def direct_tls(won: PunchResult) -> Streams:
        # a dual-stack race (race.py) has run TLS on its pick already
        return punch.streams or await secure(won)

    try:
        route, streams, why, cause = await _race(punch.run(), direct_tls, join_relay, relay_tls,
                                                 initiator, start_at, report, punch.rtt, spread)
    except (PunchError, OSError) as exc:    # neither path: a second relay request cannot help
        raise RelayError(f"neither a direct nor a relayed connection came up: "
                         f"{type(exc).__name__}: {exc}") from exc
    if route is Route.RELAY:
        reason = str(why or "the peer took the relay")
        # The one WARNING of this connection's fallback, as in peer.py.
        log.warning("falling back to the relay for %s: %s", report.peer_name, reason)
        report.fallback(reason, cause)
    report.finish(route)
    return route, streams


async def _race(punch: Awaitable[PunchResult], secure: Callable[[PunchResult], Awaitable[Streams]],
                join_relay: Callable[[], Awaitable[Streams]],
                relay_tls: Callable[[Streams], Awaitable[Streams]], initiator: bool, start_at: float,
                report: ConnectionReport, rtt: float | None = None,
                spread: float = 0.0) -> tuple[Route, Streams, BaseException | None, str]:
    direct = asyncio.ensure_future(punch)
    join: asyncio.Future[Streams] | None = None
    tasks: list[asyncio.Future[Any]] = []
    route: Route | None = None
    try:
        if initiator:
            decide_at = decision_time(start_at, report.started, rtt, spread, begun=time.time())
            t = race_timings(rtt)
            prepare_at = min(start_at + t.prepare_after, decide_at - t.join_allowance)
            await asyncio.wait({direct}, timeout=max(0.0, prepare_at - time.time()))
            if not (direct.done() and direct.exception() is None):
                join = asyncio.ensure_future(join_relay())
            await asyncio.wait({direct}, timeout=max(0.0, decide_at - time.time()))
            why: BaseException | None = None
            cause = "punch_failed"
            if direct.done() and direct.exception() is None:
                try:
                    streams = await secure(direct.result())
                except (TimeoutError, OSError) as exc:
                    why, cause = exc, "tls_failed"
                else:
                    route = Route.DIRECT
                    return route, streams, None, ""
            elif direct.done():
                why = direct.exception()
                cause = "punch_failed" if isinstance(why, PunchError) else "socket_error"
            else:
                cause = "direct_pending"
                why = PunchError(f"no direct connection {decide_at - report.started:.2f} s after "
                                 "connect(): the relay carries the data (the punch went on)")
                direct.add_done_callback(_note_late_direct(report))
            if join is None:
                join = asyncio.ensure_future(join_relay())
            streams = await _secure_relay(join, relay_tls, report)
            route = Route.RELAY
            return route, streams, why, cause
        join = asyncio.ensure_future(join_relay())

        async def direct_tls() -> Streams:
            return await secure(await asyncio.shield(direct))

        paths = {Route.DIRECT: asyncio.ensure_future(direct_tls()),
                 Route.RELAY: asyncio.ensure_future(_secure_relay(join, relay_tls, report,
                                                                  record=False))}
        tasks += paths.values()
        errors: dict[Route, BaseException] = {}
        pending = set(paths.values())
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for path, fut in paths.items():
                if fut not in done:
                    continue
                if fut.exception() is None:
                    route = path
                    if path is Route.DIRECT:
                        return path, fut.result(), None, ""
                    report.step_finished(report.step_started("relay"), "success")
                    why = errors.get(Route.DIRECT)
                    return path, fut.result(), why, "punch_failed" if why else "peer_relayed"
                errors[path] = fut.exception() or PunchError(f"the {path} path ended")
        raise errors.get(Route.RELAY) or errors.get(Route.DIRECT) or PunchError("no path came up")
    finally:
        for task in tasks:
            task.cancel()
        if route is not Route.DIRECT:      # its connection, if it comes, is not used
            direct.add_done_callback(close_late_result)
            if route is None or not initiator:
                # No path (the session was aborted or failed), or the responder on the
                # relay: nobody waits for a late direct connection, and the punch's sockets
                # on our punch port took the next session's connection (#12).
                direct.cancel()
        if join is not None and route is not Route.RELAY:
            join.cancel()
            join.add_done_callback(_close_streams)


def decision_time(start_at: float, started: float, rtt: float | None,
                  spread: float = 0.0, *, begun: float = 0.0) -> float:
    """When the initiator stops waiting for the punch: ``decide_after`` the common start but
    ``decide_by`` after connect() (race_timings: DECIDE_AFTER and DECIDE_BY up to ~60 ms RTT,
    scaled beyond) -- unless signaling was slow, and then the direct steps still
    get their window after the start: some round trips, plus the server-measured RTT spread
    of the two peers (a lossy or jittery path delivers the peer's PUNCH, and so its first
    SYN, up to a retransmission later; a steady one costs nothing here).

    ``begun``: when our punch began, the PUNCH in hand. A PUNCH of ours that a lost segment
    held back past the common start (seen: 0.67 s late, the peer punching all along)
    still gives the direct steps their window from then: the decision fell before our
    first SYN, and the connection that came up 17 ms later was closed (#19)."""
    t = race_timings(rtt)     # the floors at the lab's 40 ms, more on a longer path
    late = LATE_SPREADS * min(max(spread, 0.0), MAX_SPREAD_MARGIN)
    window = max(DIRECT_WINDOW, DIRECT_RTTS * (rtt or 0.0)) + late
    return max(min(start_at + t.decide_after + late, started + t.decide_by + late),
               max(start_at, begun) + window)


async def _secure_relay(join: asyncio.Future[Streams], secure: Callable[[Streams], Awaitable[Streams]],
                        report: ConnectionReport, *, record: bool = True) -> Streams:
    record_ = report.step_started("relay") if record else None
    try:
        streams = await secure(await join)
    except BaseException as exc:
        if record_ is not None:
            report.step_finished(record_, "error", error=exc)
        raise
    if record_ is not None:
        report.step_finished(record_, "success")
    return streams


def _note_late_direct(report: ConnectionReport) -> Callable[[asyncio.Future[PunchResult]], None]:
    def note(fut: asyncio.Future[PunchResult]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return
        took = time.time() - report.started
        report.direct_after_relay_s = round(took, 3)
        log.info("a direct connection came up %.3f s after connect(), while the relay carried "
                 "the data (Connection.upgrade() makes a direct one)", took)
        with contextlib.suppress(OSError):
            fut.result().sock.close()
    return note


def _close_streams(fut: asyncio.Future[Streams]) -> None:
    if fut.cancelled() or fut.exception() is not None:
        return
    with contextlib.suppress(Exception):
        fut.result()[1].close()


async def punch_or_grant(punch: Awaitable[PunchResult], grant: asyncio.Future[Any]) -> Any:
    """The punch result, unless the peer's relay grant arrives first (a late punch result is
    then closed)."""
    task = asyncio.ensure_future(punch)
    try:
        done, _ = await asyncio.wait({task, grant}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:      # the session is over (the peer gave up, timeout)
        task.cancel()
        task.add_done_callback(close_late_result)
        raise
    if task in done:
        return task.result()
    task.add_done_callback(close_late_result)
    return grant.result()
