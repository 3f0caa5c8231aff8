"""The peer: one call from a name to an authenticated TCP connection, direct when possible.

``async with Peer(server, name="alice") as peer``: loads (or creates) the identity, classifies
the NAT against the server's STUN service, reserves a punch port and announces the external
port it maps to, and registers. ``await peer.connect("bob")`` sends ONE request; the server
pushes PUNCH (plan + common start time) to both sides, which run the plan's direct steps on
the same schedule (punch.py), then TLS 1.3 pinned to the peer ids. Only when every direct
step fails does the relay step run — with a WARNING saying why, in the report and in the
server's metrics.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from . import address
from . import engine as engine_mod
from ._process import raise_fd_limit
from ._service import Service
from .address import Address, format_address, route_source
from .announce import Announcing, Probed
from .connection import DEFAULT_KEEPALIVE, Connection, KeepAlive
from .errors import ConfigDirInUse, HolePunchError, SignalingError, StartFailed
from .identity import ConfigLock, Identity, default_config_dir
from .nat.classify import classify_nat
from .nat.hops import nat_hops
from .nat.profile import Allocation, Family, Mapping, NatProfile
from .punch import LET_GO_TIMEOUT
from .punch_mapping import PunchPortMapping
from .punch_sequential import AllocationTracker, sequential_side, stale, tracker_for
from .punchport import PunchPort, probe
from .relay_step import peer_relay, reachable_grant
from .report import ConnectionReport, Route, start_failed
from .security import Streams, certificate_for
from .session import (
    STEP_KINDS,
    SessionEnd,
    check_strategies,
    punch_or_relay,
    restrict_plan,
)
from .signal.client import PunchInstruction, RelayInstruction, SessionAborted, SignalClient
from .signal.protocol import ErrorCode
from .strategy import Plan, plan_race
from .strategy.candidates import FAMILIES, family_name

log = logging.getLogger(__name__)

RELAY_TIMEOUT = 10.0
DEFAULT_SERVER_PORT = 3478  # a server address given without a port
FD_LIMIT = 8192             # the common soft limit of 1024 is too low for sweeps
RESPONDER_TIMEOUT = 30.0    # an incoming session (PUNCH received) ends by then, whatever it was told
DIRECT_KINDS = tuple(k for k in STEP_KINDS if k != "relay")   # Connection.upgrade()'s plan


def _discard_probe(task: asyncio.Future[Probed]) -> None:
    """A punch-port probe the start will not use: its port's reservation is closed."""
    if not task.cancelled() and task.exception() is None:
        task.result().discard()


def parse_address(value: str | Address, default_port: int = 3478) -> Address:
    """``"host:port"`` / ``"[v6]:port"`` / ``"host"`` / ``(host, port)`` -> ``(host, port)``:
    the package's one parser (address.parse_address); AddressError when it is not one."""
    return address.parse_address(value, default_port=default_port)


class Peer(Announcing, Service):
    """A registered peer. See the module docstring; ``connect``/``accept`` give Connections."""

    def __init__(
        self,
        server: str | Address,
        *,
        name: str | None = None,
        identity: Identity | None = None,
        config_dir: str | Path | None = None,
        server_fingerprint: str | bytes | None = None,
        token: str | None = None,
        engine: str | engine_mod.Engine | None = None,
        relay: str = "builtin",
        turn_user: str | None = None,
        turn_password: str | None = None,
        turn_secret: str | None = None,
        insecure_plain: bool = False,
        clock: Callable[[], float] = time.time,
        classify_udp: bool = False,
        keepalive: KeepAlive | None = DEFAULT_KEEPALIVE,
        families: Sequence[str] | None = None,
        portmap: bool = True,
    ) -> None:
        self.server = parse_address(server, default_port=DEFAULT_SERVER_PORT)
        self.families = tuple(families) if families else FAMILIES
        if not self.families or any(f not in FAMILIES for f in self.families):
            raise ValueError(f"families must be among {', '.join(FAMILIES)}, got {families!r}")
        self.config_dir = Path(config_dir) if config_dir is not None else default_config_dir()
        self.identity = identity or Identity.load_or_create(self.config_dir)
        self._lock = ConfigLock(self.config_dir)
        self.name = name or f"peer-{self.identity.peer_id[:8]}"
        self.engine = engine if isinstance(engine, engine_mod.Engine) else engine_mod.get(engine)
        if relay not in ("builtin", "none") and not relay.startswith("turn:"):
            raise ValueError(f"relay must be builtin, none or turn:HOST:PORT, got {relay!r}")
        self.relay = relay
        self.turn = (turn_user, turn_password, turn_secret)
        self.insecure_plain = insecure_plain
        self.clock = clock
        self.classify_udp = classify_udp
        self.keepalive = keepalive
        self.cert = certificate_for(self.identity)
        self.profiles: dict[str, NatProfile] = {}          # "tcp" / "udp": the server's family
        self.family_profiles: dict[str, NatProfile] = {}   # "ipv4" / "ipv6": TCP, per family
        self.ports: dict[str, PunchPort] = {}              # per family: our punch port
        self._primary = family_name(self.server[0])
        self.portmap = portmap                  # ask the router to map the (IPv4) punch port
        self.port_mapping: PunchPortMapping | None = None
        self._signal = SignalClient(
            self.server, self.identity, name=self.name, server_fingerprint=server_fingerprint,
            known_hosts=self.config_dir / "known_servers", token=token, clock=clock,
            cert=self.cert)
        self._accepted: asyncio.Queue[Connection | BaseException] = asyncio.Queue()
        self._grants: dict[str, asyncio.Future[RelayInstruction]] = {}
        self._aborts: dict[str, asyncio.Future[str]] = {}   # session -> why the peer gave up
        self._running: dict[str, asyncio.Future[None]] = {}  # session -> done letting go
        self._tasks: set[asyncio.Task[Any]] = set()
        self._events: asyncio.Task[None] | None = None
        self._announcing = asyncio.Lock()
        self._port_spent = False    # a connect given up after its CONNECT: rotate before the next
        self.last_report: ConnectionReport | None = None   # of the latest connect(), even failed
        # Called with every new ConnectionReport (connect and accept) before anything is
        # recorded in it, so a caller can observe it as it grows (the HTTP API's events).
        self.report_hooks: list[Callable[[ConnectionReport], None]] = []

    # -- identity --------------------------------------------------------------------------
    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    # The server's family's punch port (what a one-family peer had): kept for callers.
    local_ip = property(lambda self: self._port().local_ip)
    local_port = property(lambda self: self._port().port)
    announced = property(lambda self: self._port().announced)

    def _port(self) -> PunchPort:
        return self.ports.get(self._primary) or PunchPort(self._primary, self.server, "0.0.0.0")

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        self._lock.acquire()        # ConfigDirInUse: one running peer per config dir
        raise_fd_limit(FD_LIMIT)      # sweeps hold up to a few thousand sockets
        if self._primary not in self.families:
            raise ValueError(f"the server {format_address(self.server)} is {self._primary} "
                             f"but this peer uses {', '.join(self.families)} only")
        local_ip = await asyncio.to_thread(route_source, self.server[0])
        if self.portmap and self._primary == "ipv4":  # its probe runs while we classify
            self.port_mapping = PunchPortMapping(
                self.server[0], local_ip,
                on_change=lambda: self._spawn(self._reannounce(new_port=False)))
            self.port_mapping.probe_task()
        hops = asyncio.ensure_future(asyncio.to_thread(nat_hops, self.server[0], local_ip=local_ip))
        # Is it our server at all? Asked alongside the classification, whose probes would
        # otherwise wait out their timeouts against a server of another kind.
        check = asyncio.ensure_future(self._signal.check_server())
        mapped = asyncio.Event()    # the classification's mapping probes are done
        classify = asyncio.ensure_future(self._classify(local_ip, mapped))
        self.ports[self._primary] = PunchPort(self._primary, self.server, local_ip)
        # The punch port's STUN probe takes a mapping, which the classification's mapping
        # probes must not see; it runs during the filtering test's wait (the server's
        # connect-back: 0.6 s on a filtering NAT), which takes none.
        punch_probe = asyncio.ensure_future(self._probe_when(mapped))
        try:
            await asyncio.wait([check, classify], return_when=asyncio.FIRST_EXCEPTION)
            with self._start_step("signaling"):
                await check
            with self._start_step("classify"):
                await classify
        except BaseException:
            hops.cancel()       # nobody will wait for it (its thread ends on its own)
            punch_probe.cancel()
            punch_probe.add_done_callback(_discard_probe)
            raise
        finally:
            mapped.set()        # classified without it (an error, or another transport)
            for task in (check, classify):
                task.cancel()
            await asyncio.gather(check, classify, return_exceptions=True)
        self.family_profiles[self._primary] = self.profiles["tcp"]
        # Our sequential NAT's positions (None for other NATs); NAT routers in front of us.
        self._tracker: AllocationTracker | None = tracker_for(self.tcp_profile)
        with self._start_step("hops"):
            self.nat_hops: int | None = await hops
        with self._start_step("announce"):
            await self._learn_punch_address(self._primary, new_port=True, probed=punch_probe)
            await self._add_other_family()
        # Registered with its address already: no CONNECT can find us without one.
        self._signal.profiles = [p.to_dict() for p in self._all_profiles()]
        self._signal.candidates = [c.to_wire() for c in self._candidates()]
        with self._start_step("register"):
            await self._signal.start()
        # Learned again now that the signaling connection has taken its own mapping: a
        # sequential NAT's prediction base has moved. An endpoint-independent mapping keeps
        # the punch port's, and a random allocator's is nobody's prediction base (its peer
        # sweeps at random): nothing to learn (a STUN round trip, 0.3 s median under loss).
        p = self.tcp_profile
        if p.mapping not in (Mapping.ENDPOINT_INDEPENDENT, Mapping.NONE) \
                and p.allocation is not Allocation.RANDOM:
            with self._start_step("announce"):
                await self.announce()
        self._events = asyncio.create_task(self._dispatch_events())

    @contextlib.contextmanager
    def _start_step(self, step: str) -> Iterator[None]:
        """A failure inside names the start step, why, and what to do (StartFailed)."""
        t = time.monotonic()
        try:
            yield
        except (HolePunchError, OSError, TimeoutError) as exc:
            if isinstance(exc, (StartFailed, ConfigDirInUse)):
                raise
            raise start_failed(step, exc, format_address(self.server)) from exc
        log.debug("start step %s done in %.3f s", step, time.monotonic() - t)

    async def _classify(self, local_ip: str, mapped: asyncio.Event) -> None:
        kinds = ["tcp", "udp"] if self.classify_udp else ["tcp"]
        for kind in kinds:    # one after the other: allocation probes must not interleave
            profile = await classify_nat(self.server, transport=kind, local_ip=local_ip,
                                         on_mapped=mapped.set if kind == "tcp" else None)
            self.profiles[kind] = profile.evolve(family=Family(self._primary))

    async def _probe_when(self, mapped: asyncio.Event) -> Probed:
        await mapped.wait()
        return await self._probe_punch_port(self._primary, new_port=True)

    async def close(self) -> None:
        if self._events is not None:
            self._events.cancel()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, *([self._events] if self._events else []),
                             return_exceptions=True)
        await self._signal.close()
        while not self._accepted.empty():    # accepted, never handed out: nobody else closes them
            item = self._accepted.get_nowait()
            if isinstance(item, Connection):
                await item.close()
        if self.port_mapping is not None:
            await self.port_mapping.close()
        for pp in self.ports.values():
            pp.close()
        self._lock.release()

    def _predictable_symmetric(self) -> bool:
        p = self.tcp_profile
        return (p.mapping in (Mapping.ADDRESS_DEPENDENT, Mapping.ADDRESS_AND_PORT_DEPENDENT)
                and p.allocation is Allocation.SEQUENTIAL)

    # -- connecting ------------------------------------------------------------------------
    async def connect(self, target: str, *, timeout: float = 15.0,
                      strategies: Sequence[str] | None = None) -> Connection:
        """A connection to ``target`` (name or peer_id): direct if possible, else relayed.

        ``strategies``: the step kinds to use (``lan``, ``direct``, ``simopen``,
        ``simopen-low-ttl``, ``predict-sweep``, ``birthday``, ``relay``); StrategyError for an
        unknown kind, or when none of them is in this pair's plan."""
        chosen = check_strategies(strategies)
        report = self._new_report("initiator")
        self.last_report = report
        sent = False
        try:
            with report.failing(f"connect to {target}", timeout):
                async with asyncio.timeout(timeout):
                    if self._port_spent:
                        # The last connect was given up after its CONNECT: the peer may still
                        # punch at the port it announced; the same 4-tuple again met that
                        # session's sockets (#12: the next connect relayed).
                        self._port_spent = False
                        await self.announce(new_port=True)
                    elif self._predictable_symmetric() and stale(self._tracker, time.time()):
                        await self.announce()   # the prediction needs our latest mapping
                    async with self._announcing:    # a port rotation in flight ends first
                        ports, candidates = self._lane_ends(), self._candidates()
                    sent = True
                    instr = await self._signal.connect(target, candidates, self._all_profiles())
                    sent = False            # from here on the session rotates the port itself
                    conn = await self._run_session(instr, report, ports, chosen)
                    if conn.route is Route.RELAY:   # Connection.upgrade(): direct steps only
                        conn.upgrader = functools.partial(self.connect, target, timeout=timeout,
                                                          strategies=DIRECT_KINDS)
                    return conn
        finally:
            self._port_spent = self._port_spent or sent

    async def accept(self) -> Connection:
        """The next connection another peer made to us."""
        item = await self._accepted.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def __aiter__(self) -> AsyncIterator[Connection]:
        """``async for conn in peer:``: every connection another peer makes to us."""
        return self._incoming()

    async def _incoming(self) -> AsyncIterator[Connection]:
        while True:
            yield await self.accept()

    # seed-style names
    async def connect_to_peer(self, target: str, **kwargs: Any) -> Connection:
        return await self.connect(target, **kwargs)

    async def connect_to_rendezvous(self, server: str | Address | None = None) -> None:
        if server is not None and parse_address(server, default_port=DEFAULT_SERVER_PORT) != self.server:
            raise ValueError("a Peer talks to the server it was made with")
        if self._events is None:
            await self.start()

    async def _dispatch_events(self) -> None:
        while True:
            event = await self._signal.incoming.get()
            if isinstance(event, RelayInstruction):
                event = reachable_grant(event, self.server)
                fut = self._grants.setdefault(event.session,
                                              asyncio.get_running_loop().create_future())
                if not fut.done():
                    fut.set_result(event)
            elif isinstance(event, PunchInstruction):
                self._abort_of(event.session)   # now: its abort may be next in the queue
                self._spawn(self._respond(event))
            elif isinstance(event, SessionAborted):
                abort = self._aborts.get(event.session)
                if abort is None:
                    log.debug("session %s is over already: %s", event.session, event.reason)
                elif not abort.done():
                    abort.set_result(event.reason)

    async def _respond(self, instr: PunchInstruction) -> None:
        report = self._new_report("responder")
        await self._let_go_of_ended_sessions()
        try:   # bounded like a connect(): an incoming session never holds us longer
            async with asyncio.timeout(RESPONDER_TIMEOUT):
                conn = await self._run_session(instr, report, self._lane_ends())
        except Exception as exc:   # the initiator gets its own error; we log ours
            log.warning("incoming connection from %s failed: %s", instr.peer.name, exc)
            return
        self._accepted.put_nowait(conn)

    def _new_report(self, role: str) -> ConnectionReport:
        report = ConnectionReport(role=role, started=time.time())
        report.local_nat = self.tcp_profile.to_dict()
        for hook in self.report_hooks:
            hook(report)
        return report

    async def _let_go_of_ended_sessions(self) -> None:
        """Wait (briefly) until the sessions the other side gave up have closed their sockets:
        the next session punches from the same port, and a socket of the last one still
        listening there took its connection (#12: a cancelled connect made the next relay)."""
        ending = [done for session, done in self._running.items()
                  if (abort := self._aborts.get(session)) is not None and abort.done()]
        if ending:
            await asyncio.wait(ending, timeout=LET_GO_TIMEOUT)

    def _abort_of(self, session: str) -> asyncio.Future[str]:
        return self._aborts.setdefault(session, asyncio.get_running_loop().create_future())

    def _lane_ends(self) -> dict[str, Address]:
        """Our (local ip, punch port) per family, as they are now."""
        return {f: (pp.local_ip, pp.port) for f, pp in self.ports.items()}

    async def _run_session(self, instr: PunchInstruction, report: ConnectionReport,
                           ends: dict[str, Address],
                           strategies: Sequence[str] | None = None) -> Connection:
        """Punch or relay, until done or the other peer gives up; either side's failure is
        reported to the server, which tells the other peer so it stops at once."""
        abort = self._abort_of(instr.session)
        let_go = self._running[instr.session] = asyncio.get_running_loop().create_future()
        work = asyncio.ensure_future(self._punch_or_relay(instr, report, ends, strategies))
        try:
            pending: list[asyncio.Future[Any]] = [work, abort]
            await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                raise SignalingError(abort.result(), code=ErrorCode.PEER_GAVE_UP)
            return work.result()
        except SignalingError as exc:
            if exc.code != ErrorCode.PEER_GAVE_UP:
                await self._report(instr.session, "failed", report, reason=exc)
            raise
        except asyncio.CancelledError:
            await self._report(instr.session, "failed", report,
                               reason="stopped waiting (connect timeout or shutdown)")
            if work.done() and not work.cancelled() and work.exception() is None:
                work.result().writer.close()    # made it just as we were cancelled
            raise
        except BaseException as exc:
            await self._report(instr.session, "failed", report, reason=exc)
            raise
        finally:
            if not work.done():
                # Its punch steps close whatever they still connect (punch.close_late_result).
                work.cancel()
                with contextlib.suppress(BaseException):
                    await work
            self._aborts.pop(instr.session, None)
            self._running.pop(instr.session, None)
            let_go.set_result(None)
            if instr.role == "initiator":
                self._spawn(self._reannounce(new_port=True))
            elif self._predictable_symmetric():
                self._spawn(self._reannounce(new_port=False))

    async def _reannounce(self, *, new_port: bool) -> None:
        """After a session: the initiator takes a fresh punch port, since the 4-tuple it just
        used may sit in TIME_WAIT (a new port on one side suffices; the responder keeps its
        own, so no PUNCH can race its announcement); a sequential NAT's base has moved on."""
        try:
            await self.announce(new_port=new_port)
        except (OSError, HolePunchError) as exc:
            log.warning("could not announce a fresh punch address: %s", exc)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _punch_or_relay(self, instr: PunchInstruction, report: ConnectionReport,
                              ends: dict[str, Address],
                              strategies: Sequence[str] | None = None) -> Connection:
        """The session from the server's PUNCH on: the one punch path (session.py)."""
        peer = instr.peer
        if instr.plan:
            plan = Plan.from_dict(instr.plan)
        else:       # a server without the strategy module: plan it here, the same way
            ours = (self._all_profiles(), self._candidates())
            theirs = ([NatProfile.from_dict(p) for p in peer.profiles], list(peer.candidates))
            (pi, ci), (pr, cr) = (ours, theirs) if instr.role == "initiator" else (theirs, ours)
            plan = plan_race(pi, pr, ci, cr)
        # Only the initiator knows its choice: a left-out step keeps its slot, idle, so the
        # responder's schedule (the server's whole plan) stays aligned.
        plan = restrict_plan(plan, strategies, keep_slots=True)
        pp = self._port()
        end = SessionEnd(self.identity, self.engine, self.insecure_plain, self.keepalive,
                         rtt=self._signal.rtt, nat_hops=self.nat_hops,
                         sequential=sequential_side(
                             self._tracker, functools.partial(probe, pp.server, pp.local_ip, 0)))

        async def record(outcome: str, report: ConnectionReport) -> None:
            await self._report(instr.session, outcome, report)

        return await punch_or_relay(
            end, plan=plan, role=instr.role, ends=ends, peer=peer, report=report,
            start_at=instr.start_at - (self.clock() - time.time()),   # into the engine's clock
            join_relay=None if self.relay == "none" else functools.partial(self._relay, instr),
            record=record, spawn=self._spawn, spread=instr.spread,
            relay_grant=self._grants.setdefault(instr.session,
                                                asyncio.get_running_loop().create_future()))

    def _relay(self, instr: PunchInstruction, initiator: bool) -> Awaitable[Streams]:
        """Streams to the peer through a relay (relay_step.peer_relay)."""
        return peer_relay(self._signal, instr, initiator=initiator, relay=self.relay,
                          turn=self.turn, grants=self._grants, server=self.server,
                          timeout=RELAY_TIMEOUT)

    async def _report(self, session: str, outcome: str, report: ConnectionReport, *,
                      reason: BaseException | str | None = None) -> None:
        with contextlib.suppress(ConnectionError, SignalingError):
            await self._signal.report_result(session, outcome, {
                "time": report.total_time, "route": outcome,
                "step": (w.kind if (w := report.winning_step) else None),
                "relay_cause": report.relay_cause or None},
                reason=None if reason is None else str(reason) or type(reason).__name__)


async def create_peer(server: str | Address, **kwargs: Any) -> Peer:
    """Seed-style constructor: a started Peer (close it with ``await peer.close()``)."""
    peer = Peer(server, **kwargs)
    await peer.start()
    return peer
