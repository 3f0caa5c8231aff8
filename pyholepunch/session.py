"""One session's punch path after signaling, shared by ``Peer`` and ``Punch`` (backend.py).

However the two sides met — the rendezvous server's PUNCH (peer.py) or two offers the app
carried (backend.py) — each side then holds the same plan, its role and a common start. From
there ``punch_or_relay`` is the one code path: the plan's direct steps on the engine
(punch.py), TLS 1.3 pinned to the peer's certificate, the relay step beside them or after them
(relay_race.py), the report, and a ``Connection``. The caller supplies how to join a relay
(the built-in relay through the server, a TURN allocation, or none) and what to tell its
signaling about the outcome.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, replace
from typing import Any

from .address import Address
from .connection import DEFAULT_KEEPALIVE, Connection, KeepAlive
from .engine import Engine, PunchResult
from .errors import PunchError, StrategyError
from .identity import Identity
from .punch import PunchRun
from .punch_sequential import SequentialSide
from .relay_race import direct_or_relay, punch_or_grant
from .report import ConnectionReport, Route
from .security import Streams, secure_stream, warm_tls_context
from .signal.client import PeerInfo
from .strategy import Action, Plan, RoleInstruction, StepKind

log = logging.getLogger(__name__)

TLS_TIMEOUT = 5.0
STEP_KINDS = tuple(str(k) for k in StepKind)
_IDLE = RoleInstruction(Action.NONE)


@dataclass
class SessionEnd:
    """Our side of a session: who we are and how we punch."""

    identity: Identity
    engine: Engine
    insecure_plain: bool = False
    keepalive: KeepAlive | None = DEFAULT_KEEPALIVE
    rtt: float | None = None                   # to the server/STUN: a silent simopen re-arms
    nat_hops: int | None = None                # NAT routers in front of us (low-TTL SYNs)
    sequential: SequentialSide | None = None   # our NAT is sequential: re-measure before sweeps


JoinRelay = Callable[[bool], Awaitable[Streams]]           # initiator? -> streams to the peer
Record = Callable[[str, ConnectionReport], Awaitable[None]]  # outcome -> the signaling
Spawn = Callable[[Coroutine[Any, Any, Any]], None]


def check_strategies(strategies: Sequence[str] | None) -> tuple[str, ...] | None:
    """The step kinds of a ``strategies=[...]`` choice; StrategyError names an unknown one."""
    if strategies is None:
        return None
    if isinstance(strategies, str):
        raise StrategyError(f"strategies is a list of step kinds, got the string {strategies!r}")
    chosen = tuple(dict.fromkeys(strategies))
    unknown = [s for s in chosen if s not in STEP_KINDS]
    if unknown or not chosen:
        raise StrategyError(f"unknown step kind {', '.join(map(repr, unknown)) or '(none given)'}"
                            f": the kinds are {', '.join(STEP_KINDS)}")
    return chosen


def restrict_plan(plan: Plan, strategies: Sequence[str] | None, *, keep_slots: bool) -> Plan:
    """``plan`` with only the step kinds in ``strategies`` (None: all of it).

    ``keep_slots``: a step left out still takes its time slot, idle, so the schedule stays
    the one the other side runs (a Peer's responder runs the server's whole plan); without it
    (both sides restrict alike, as two Punch offers do) left-out steps are dropped. A relay
    step is kept only when "relay" is chosen. StrategyError when no chosen kind is planned."""
    kinds = check_strategies(strategies)
    if kinds is None:
        return plan
    planned = list(dict.fromkeys(str(s.kind) for s in plan.steps))
    if not set(kinds) & set(planned):
        raise StrategyError(f"none of the chosen steps ({', '.join(kinds)}) is in the plan for "
                            f"this pair ({', '.join(planned) or 'no step'}: {plan.reason})")
    steps = []
    for step in plan.steps:
        if step.kind in kinds:
            steps.append(step)
        elif keep_slots and step.kind is not StepKind.RELAY:
            steps.append(replace(step, reason="left out by strategies=", initiator=_IDLE,
                                 responder=_IDLE))
    return replace(plan, steps=tuple(steps))


async def punch_or_relay(end: SessionEnd, *, plan: Plan, role: str, start_at: float,
                         ends: dict[str, Address], peer: PeerInfo, report: ConnectionReport,
                         join_relay: JoinRelay | None, record: Record, spawn: Spawn,
                         relay_grant: asyncio.Future[Any] | None = None,
                         spread: float = 0.0) -> Connection:
    """The session from its plan on: a Connection, direct if a direct step works, else
    relayed (``join_relay``; None: no relay, a PunchError with the report's reason).

    ``start_at``: the common start in ``time.time()`` terms; ``ends``: our (local ip, punch
    port) per family; ``relay_grant``: resolves when the peer moved to the relay first (the
    server's grant); ``record(outcome, report)`` tells the signaling how it ended;
    ``spread``: the two peers' round-trip spread as the server measured it (relay_race)."""
    report.peer_id, report.peer_name = peer.peer_id, peer.name
    report.remote_nat = peer.tcp_profile.to_dict()
    report.set_plan(plan.to_dict())
    report.tls = not end.insecure_plain
    initiator = role == "initiator"
    relay_on = join_relay is not None and plan.has_relay

    def tls(conn: Any) -> Awaitable[Streams]:
        return secure_stream(conn, identity=end.identity, peer_id=peer.peer_id,
                             peer_cert=peer.cert, initiator=initiator, timeout=TLS_TIMEOUT,
                             insecure_plain=end.insecure_plain)

    if peer.cert is not None and not end.insecure_plain:   # warm the TLS context meanwhile
        spawn(warm_tls_context(end.identity, peer.cert, initiator, start_at))
    direct_error: BaseException | None = None
    cause = "no_direct_plan"
    if plan.direct_steps:
        grant = relay_grant if relay_grant is not None else \
            asyncio.get_running_loop().create_future()
        try:
            def secure(won: PunchResult) -> Awaitable[Streams]:
                return tls(won.sock)
            punch = PunchRun.for_session(end.engine, plan, role, start_at, ends, peer.candidates,
                                      peer.profiles, report, secure)
            punch.rtt, punch.nat_hops, punch.sequential = end.rtt, end.nat_hops, end.sequential
            punch.mark = not end.insecure_plain     # plain streams would read it as data
            if relay_on:    # the relay ready alongside
                assert join_relay is not None
                route, (reader, writer) = await direct_or_relay(
                    punch=punch, secure=secure, initiator=initiator, start_at=start_at,
                    spread=spread, report=report, join_relay=lambda: join_relay(initiator),
                    relay_tls=tls)
                await record(str(route), report)
                return _connection(end, reader, writer, peer, route, report)
            result = await punch_or_grant(punch.run(), grant)
        except (PunchError, OSError) as exc:
            direct_error = exc
            cause = "punch_failed" if isinstance(exc, PunchError) else "socket_error"
        else:
            if not isinstance(result, PunchResult):   # the initiator gave up first
                direct_error = PunchError("the peer moved to the relay")
                cause = "peer_relayed"
            else:
                try:   # a dual-stack race has run TLS already (the first mutually
                    # authenticated connection wins); else the handshake runs now
                    reader, writer = punch.streams or await secure(result)
                except (TimeoutError, OSError) as exc:   # not AuthenticationError: an
                    direct_error, cause = exc, "tls_failed"   # impostor gets no relay either
                else:
                    report.finish(Route.DIRECT)
                    await record("direct", report)
                    return _connection(end, reader, writer, peer, Route.DIRECT, report)
    if not relay_on:
        error = PunchError(f"no direct path to {peer.name} ({direct_error or plan.reason}) "
                           "and relaying is off")
        report.fail(error)      # as the caller's connect() would record it
        raise error
    assert join_relay is not None
    reason = str(direct_error) if direct_error else plan.reason
    # The one WARNING of this connection's fallback (its reason also goes to the report,
    # the server's metrics and the API's events).
    log.warning("falling back to the relay for %s: %s", peer.name, reason)
    report.fallback(reason, cause)
    step = report.step_started("relay")
    try:
        reader, writer = await tls(await join_relay(initiator))
    except BaseException as exc:
        report.step_finished(step, "error", error=exc)
        raise
    report.step_finished(step, "success")
    report.finish(Route.RELAY, relay_reason=reason)
    await record("relay", report)
    return _connection(end, reader, writer, peer, Route.RELAY, report)


def _connection(end: SessionEnd, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                peer: PeerInfo, route: Route, report: ConnectionReport) -> Connection:
    return Connection(reader, writer, peer_id=peer.peer_id, peer_name=peer.name, route=route,
                      report=report, keepalive=end.keepalive)
