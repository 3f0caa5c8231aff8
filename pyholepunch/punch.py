"""Running one role's side of a punch plan on the schedule both peers share.

Both peers hold the same plan and the same ``start_at`` (each in its own clock, converted by
the server), so no further signaling is needed: step groups run back to back, each starting
at ``start_at`` + the budgets of the groups before it. A side that fails a step early waits
for the next slot; a side that wins stops. Steps of one ``parallel`` group start together.

This module only turns instructions into engine calls (the engine's async entry points: no
thread per punch, and cancelling a step closes its sockets at once) and plain accepts; TLS and
the relay step belong to the peer layer.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from .address import Address, format_address
from .engine import Engine, PunchResult, PunchStats
from .errors import PunchError, PunchTimeout
from .nat.profile import NatProfile
from .punch_passive import MARK, accept_from, follow, sleep_until
from .punch_sequential import SequentialSide
from .race import Secure, race_lanes
from .report import ConnectionReport, Outcome
from .strategy import (
    Action,
    Candidate,
    Plan,
    PortChoice,
    RoleInstruction,
    Step,
    StepKind,
    Target,
    remote_ports,
)
from .strategy.candidates import host_candidates, public_candidate
from .strategy.race import tcp_profile
from .stun.client import silence_rearm  # one rule for every re-armed TCP connect

log = logging.getLogger(__name__)

REARM_INTERVAL = 0.02      # seconds between re-armed attempts after an RST / ICMP error
SWEEP_AFTER_PROBE = 0.01  # s: a sequential chooser's sweep after its position probe
SUBMIT_AHEAD = 0.05        # seconds before its start a step group's engine calls are made
LET_GO_TIMEOUT = 0.5       # s an abandoned group waits for its cancelled steps to close


@dataclass(frozen=True)
class PunchTarget:
    """Where the peer can be reached in one address family, from its PUNCH candidates."""

    public_ip: str
    port: int                                  # its announced port (see strategy/)
    lan: tuple[Address, ...] = ()              # its local addresses and local punch port
    mapped: Address | None = None              # its router port mapping (NAT-PMP/PCP/UPnP)


@dataclass(frozen=True)
class Lane:
    """Both ends of one address family: our local address and punch port, and the peer."""

    local_ip: str
    local_port: int
    peer: PunchTarget


@dataclass
class PunchRun:
    """One role's execution of ``plan`` (direct steps only).

    ``local_ip``/``local_port``/``peer`` are the IPv4 ends (and those of a one-family plan);
    ``lanes`` gives each family's own ends for a dual-stack plan, whose families race
    (RFC 8305): see :meth:`run`.
    """

    engine: Engine
    plan: Plan
    role: str
    start_at: float                            # common start, in time.time() terms
    local_port: int                            # our announced local port
    peer: PunchTarget
    report: ConnectionReport
    local_ip: str = "0.0.0.0"
    lanes: dict[str, Lane] = field(default_factory=dict)
    secure: Secure | None = None               # a race runs the TLS handshake on its pick
    streams: Any = None                        # ... and keeps the secured streams here
    sequential: SequentialSide | None = None   # our NAT is sequential: re-measure before sweeps
    rtt: float | None = None                   # round trip estimate: a silent simopen re-arms
    nat_hops: int | None = None                # measured NAT routers in front of us (nat/hops.py)
    mark: bool = True                          # the responder's lead MARK (TLS drops it)

    @classmethod
    def for_session(cls, engine: Engine, plan: Plan, role: str, start_at: float,
                    ends: dict[str, Address], peer_candidates: Sequence[Candidate],
                    peer_profiles: Sequence[dict[str, Any]], report: ConnectionReport,
                    secure: Secure | None = None) -> PunchRun:
        """A session's punch: per family of the plan, our (local ip, punch port) from
        ``ends`` and the peer's candidates (and router mapping) of that family."""
        profiles = [NatProfile.from_dict(p) for p in peer_profiles]
        lanes = {f: Lane(ip, port, peer_target(peer_candidates, f,
                                               tcp_profile(profiles, f).port_mapping))
                 for f, (ip, port) in ends.items() if f in plan.families}
        first = lanes.get(plan.families[0]) if plan.families else None
        if first is None:
            raise PunchError(f"no {'/'.join(plan.families)} punch port of ours")
        return cls(engine, plan, role, start_at, first.local_port, first.peer, report,
                   local_ip=first.local_ip, lanes=lanes, secure=secure)

    def lane(self, family: str) -> Lane:
        """Our ends for ``family`` (the defaults when the plan has one family only)."""
        if family in self.lanes:
            return self.lanes[family]
        if family == "ipv4" or len(self.plan.families) <= 1:
            return Lane(self.local_ip, self.local_port, self.peer)
        raise PunchError(f"no {family} address on one side for this plan")

    def schedule(self, family: str | None = None) -> Iterator[tuple[float, list[Step]]]:
        """(start time, steps) per group, in order; the relay step is not included. With
        ``family``: that family's lane only, from its own start (IPv4 waits race_delay)."""
        steps = self.plan.steps if family is None else self.plan.track(family)
        at = self.start_at + (0.0 if family is None else self.plan.track_offset(family))
        for group in _groups(steps):
            if group[0].kind is StepKind.RELAY:
                return
            yield at, group
            at += max(s.budget for s in group)

    async def run(self) -> PunchResult:
        """The first established connection, or PunchError when every direct step failed.

        A plan with two families races them: both lanes run their steps on their own
        schedules; the initiator keeps the first connection any lane brings up and tells
        the responder which one with a KEEP byte on it; with ``secure`` the TLS handshake
        runs on it inside the race (``streams``), and a failed one lets the race go on;
        every other connection is closed (race.py)."""
        families = self.plan.families
        if len(families) <= 1:
            return await self._run_lane(None)
        won = await race_lanes(self.role, {f: self._run_lane(f) for f in families},
                               deadline=self._end(), secure=self.secure)
        self.streams = won.streams
        return won.result

    def _end(self) -> float:
        return max((at + max(s.budget for s in g) for f in self.plan.families
                    for at, g in self.schedule(f)), default=self.start_at)

    async def _run_lane(self, family: str | None) -> PunchResult:
        last: BaseException | None = None
        for at, group in self.schedule(family):
            try:
                return await self._run_group(at, group)
            except (PunchError, OSError) as exc:
                last = exc
                log.info("%s: %s%s failed: %s", self.role, f"{family} " if family else "",
                         "+".join(s.kind for s in group), exc)
        where = f" over {family}" if family else ""
        raise PunchError(f"every direct step{where} failed; last: {last}" if last else
                         "the plan has no direct step")

    async def _run_group(self, at: float, group: list[Step]) -> PunchResult:
        # Engine steps take absolute start times: handed over ahead, their sockets are ready
        # and the engine sends the first SYN at `at` itself, not after an event-loop wake-up.
        await sleep_until(at - SUBMIT_AHEAD)
        tasks = [asyncio.ensure_future(self._run_step(at, step)) for step in group]
        errors: list[BaseException] = []
        won: PunchResult | None = None
        try:
            for next_done in asyncio.as_completed(tasks):
                try:
                    won = await next_done
                    return won
                except (PunchError, OSError) as exc:
                    errors.append(exc)
        finally:
            # Every connection but the one returned is closed, now or when it comes up
            # (also one that finished just as we were cancelled).
            for t in tasks:
                if won is None or not t.done() or t.cancelled() or t.exception() is not None \
                        or t.result() is not won:
                    t.add_done_callback(close_late_result)
            if won is None:     # abandoned (cancelled, or every step failed)
                await _let_go(tasks)
        raise errors[-1] if errors else PunchError("empty step group")

    async def _run_step(self, at: float, step: Step) -> PunchResult:
        ins = step.for_role(self.role)
        lane = self.lane(step.family)
        record = self.report.step_started(step.kind, at=max(at, time.time()), family=step.family,
                                          local=(lane.local_ip, lane.local_port),
                                          remote=_describe_remotes(ins, lane.peer))
        try:
            result = await self._execute(ins, at, step.budget, lane, _mutual_simopen(step))
        except PunchTimeout as exc:
            self.report.step_finished(record, Outcome.TIMEOUT, stats=exc.stats, error=exc)
            raise
        except (PunchError, OSError) as exc:
            stats = exc.stats if isinstance(exc, PunchError) else None
            self.report.step_finished(record, Outcome.ERROR, stats=stats, error=exc)
            raise
        except BaseException as exc:
            if record.outcome is Outcome.RUNNING:
                self.report.step_finished(record, Outcome.ERROR, error=exc or "cancelled")
            raise
        self.report.step_finished(record, Outcome.SUCCESS, stats=result.stats)
        return result

    async def _execute(self, ins: RoleInstruction, at: float, budget: float,
                       lane: Lane, mutual: bool = False) -> PunchResult:
        eng = self.engine
        ip, port = lane.local_ip, lane.local_port
        if ins.syn_ttl is not None and self.nat_hops:
            # A low TTL passes our own NATs and dies at the next router: measured, not assumed.
            ins = dataclasses.replace(ins, syn_ttl=self.nat_hops + 1)
        if ins.action is Action.NONE:
            await sleep_until(at + budget)
            raise PunchTimeout("nothing to do in this step (the peer dials)", PunchStats())
        if ins.action is Action.LISTEN:
            return await accept_from(ip, port, _peer_ips(ins, lane.peer), deadline=at + budget)
        if self.sequential is not None and ins.action is Action.SWEEP_PAIRS \
                and ins.target is Target.PUBLIC:
            remotes = await self.sequential.mutual_remotes(
                ins, sweep_at=at + ins.start_delay, peer_ip=lane.peer.public_ip,
                peer_port=lane.peer.port, chooser=not self._follows(ins))
            # Sweep as soon as our position is known (see mutual_remotes), the chooser a hair
            # after: what the plan's start delay allowed for the probe is not waited out.
            begin = time.time() + (0.0 if self._follows(ins) else SWEEP_AFTER_PROBE)
            start, timeout = _window(begin, at + budget - begin)
        else:
            remotes = _remotes(ins, lane.peer)
            start, timeout = _window(at + ins.start_delay, budget - ins.start_delay)
        if self._follows(ins):
            local_ports = ([port] * len(remotes)
                           if ins.action is Action.SWEEP_REMOTE_PORTS else [0] * len(remotes))
            pairs = list(zip(local_ports, remotes, strict=True))
            return await follow(ip, pairs, _peer_ips(ins, lane.peer), start=start,
                                deadline=start + timeout, syn_ttl=ins.syn_ttl)
        if ins.action in (Action.SIMOPEN, Action.CONNECT):
            listen = ins.action is Action.SIMOPEN
            local = (ip, port if listen else 0)

            result = await rearmed(lambda at, left: eng.simultaneous_open_async(
                local, remotes[0], at, left, interval=REARM_INTERVAL, syn_ttl=ins.syn_ttl,
                listen=listen), start, timeout, silence_rearm(self.rtt))
            if mutual and self.mark and self.role == "responder":
                lead_mark(result)
            return result
        if ins.action is Action.SWEEP_LOCAL_PORTS:
            pairs = [(0, remotes[0])] * ins.count
        elif ins.action is Action.SWEEP_REMOTE_PORTS:
            pairs = [(port, r) for r in remotes]
        elif ins.action is Action.SWEEP_PAIRS:
            pairs = [(0, r) for r in remotes]
        else:
            raise PunchError(f"action {ins.action} is not a direct punch")
        result = await eng.sweep_async(pairs, start, timeout, local_ip=ip,
                                       max_inflight=max(len(pairs), 1), rate=ins.rate,
                                       syn_ttl=ins.syn_ttl)
        try:   # we chose: tell the follower which of the connections that came up is the one
            result.sock.sendall(MARK)
        except OSError:
            result.sock.close()
            raise
        return result

    def _follows(self, ins: RoleInstruction) -> bool:
        """In a sweep several connections can come up at once; only one side may choose.

        The side aiming one port at many (the cone) or the responder of a mutual sweep
        follows: it listens and keeps the connection the other side marks."""
        return ins.action is Action.SWEEP_REMOTE_PORTS or (
            ins.action is Action.SWEEP_PAIRS and self.role == "responder")


def _mutual_simopen(step: Step) -> bool:
    return step.initiator.action is Action.SIMOPEN and step.responder.action is Action.SIMOPEN


def lead_mark(result: PunchResult) -> None:
    """The responder of a simultaneous open sends MARK as soon as it is connected (the
    initiator's TLS layer drops it: security.py). Under loss one end can be connected while
    the other still waits in SYN_RECV for the handshake's last ACK, which the kernel sends
    again only with its SYN-ACK after 1 s; the initiator's ClientHello carries it to a
    half-open responder, but a responder, the TLS server, said nothing to a half-open
    initiator, which stayed so past the relay decision (#19). The MARK's segment carries
    it."""
    try:
        result.sock.send(MARK)      # one byte into an empty send buffer: it never waits
    except OSError as exc:          # broken already: TLS will say so
        log.debug("could not send the simultaneous open's mark: %r", exc)


def _remotes(ins: RoleInstruction, peer: PunchTarget) -> list[Address]:
    if ins.target is Target.LAN:
        if not peer.lan:
            raise PunchError("the peer announced no LAN address")
        return list(peer.lan)
    if ins.target is Target.MAPPED:
        if peer.mapped is None:
            raise PunchError("the peer announced no router port mapping")
        return [peer.mapped]
    return [(peer.public_ip, port) for port in remote_ports(ins, peer.port)]


def _peer_ips(ins: RoleInstruction, peer: PunchTarget) -> set[str]:
    if ins.target is Target.LAN:
        return {ip for ip, _ in peer.lan}
    return {peer.public_ip} | {ip for ip, _ in peer.lan}


def _describe_remotes(ins: RoleInstruction, peer: PunchTarget) -> str:
    """The remote side of the candidate pair a step tries, for the report."""
    if ins.action in (Action.LISTEN, Action.NONE, Action.RELAY):
        return f"{peer.public_ip} (any port)" if ins.action is Action.LISTEN else ""
    if ins.target is Target.LAN:
        dialled = peer.lan[:1] if ins.action in (Action.SIMOPEN, Action.CONNECT) else peer.lan
        return ", ".join(format_address(a) for a in dialled)
    if ins.target is Target.MAPPED:
        return format_address(peer.mapped) + " (port mapping)" if peer.mapped else ""
    if ins.ports is PortChoice.ANNOUNCED:
        return format_address((peer.public_ip, peer.port))
    return f"{format_address((peer.public_ip, peer.port))} ({ins.ports}, {ins.count} ports)"


def _groups(steps: Sequence[Step]) -> Iterator[list[Step]]:
    group: list[Step] = []
    for step in steps:
        if group and (step.parallel is None or step.parallel != group[0].parallel):
            yield group
            group = []
        group.append(step)
    if group:
        yield group


def _window(start: float, timeout: float) -> tuple[float, float]:
    """Clamp a step window that began already (a slow earlier step) to what is left of it."""
    now = time.time()
    if start < now:
        timeout -= now - start
        start = now
    if timeout <= 0:
        raise PunchTimeout("the step's window passed before it could start", PunchStats())
    return start, timeout


async def rearmed(attempt: Callable[[float, float], Awaitable[PunchResult]], start: float,
                  timeout: float, every: float) -> PunchResult:
    """``attempt(start, timeout)`` in slices of ``every`` s until one connects or ``timeout``
    passes: each slice closes the silent socket and sends a new SYN from the same port."""
    deadline = start + timeout
    at, tries = start, 0
    while True:
        tries += 1
        left = deadline - at
        try:
            return await attempt(at, min(every, left))
        except PunchTimeout as exc:
            at = max(time.time(), at + every)
            if at + 0.01 >= deadline:
                if tries > 1:
                    raise PunchTimeout(f"{exc} (re-armed {tries - 1}x after {every * 1e3:.0f} ms "
                                       "of silence)", exc.stats) from exc
                raise
            log.debug("simultaneous open silent for %.0f ms: re-arming", every * 1e3)


async def _let_go(tasks: Sequence[asyncio.Future[PunchResult]]) -> None:
    """Cancel an abandoned group's steps and wait (briefly) until their sockets are closed:
    an engine call submitted ahead already listens on the punch port, and left running it
    took the next session's connection on that port (#12: a cancelled connect made the next
    one relay)."""
    running = [t for t in tasks if not t.done()]
    for t in running:
        t.cancel()
    if running:
        await asyncio.wait(running, timeout=LET_GO_TIMEOUT)


def close_late_result(task: asyncio.Future[PunchResult]) -> None:
    """A punch abandoned while its engine call runs may still connect: close what it returns."""
    if task.cancelled():
        return
    exc = task.exception()
    if exc is None:
        with contextlib.suppress(OSError):
            task.result().sock.close()


def peer_target(candidates: Sequence[Candidate], family: str = "ipv4",
                mapped: Address | None = None) -> PunchTarget:
    """The peer's ``family`` ends: its public candidate and its host (LAN) addresses;
    ``mapped``: the router port mapping in the peer's NAT profile of that family, if any."""
    public = public_candidate(candidates, family)
    if public is None:
        raise PunchError(f"the peer announced no {family} address")
    return PunchTarget(public.ip, public.port,
                       tuple(c.address for c in host_candidates(candidates, family)), mapped)
