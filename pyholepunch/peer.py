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
from .announce import Announcing
from .connection import DEFAULT_KEEPALIVE, Connection, KeepAlive
from .engine import PunchResult
from .errors import ConfigDirInUse, HolePunchError, PunchError, SignalingError, StartFailed
from .identity import ConfigLock, Identity, default_config_dir
from .nat.classify import classify_nat
from .nat.hops import nat_hops
from .nat.profile import Allocation, Family, Mapping, NatProfile
from .punch import Punch
from .punch_mapping import PunchPortMapping
from .punch_sequential import AllocationTracker, sequential_side, tracker_for
from .punchport import PunchPort, probe
from .relay_race import direct_or_relay, punch_or_grant
from .relay_step import peer_relay, reachable_grant
from .report import ConnectionReport, Route, start_failed
from .security import Streams, certificate_for, secure_stream, warm_tls_context
from .signal.client import PunchInstruction, RelayInstruction, SessionAborted, SignalClient
from .signal.protocol import ErrorCode
from .strategy import Plan, plan_race
from .strategy.candidates import FAMILIES, family_name

log = logging.getLogger(__name__)

TLS_TIMEOUT = 5.0
RELAY_TIMEOUT = 10.0
DEFAULT_SERVER_PORT = 3478  # a server address given without a port
FD_LIMIT = 8192             # the common soft limit of 1024 is too low for sweeps
RESPONDER_TIMEOUT = 30.0    # an incoming session (PUNCH received) ends by then, whatever it was told


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
        self._tasks: set[asyncio.Task[Any]] = set()
        self._events: asyncio.Task[None] | None = None
        self._announcing = asyncio.Lock()
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
        classify = asyncio.ensure_future(self._classify(local_ip))
        try:
            await asyncio.wait([check, classify], return_when=asyncio.FIRST_EXCEPTION)
            with self._start_step("signaling"):
                await check
            with self._start_step("classify"):
                await classify
        except BaseException:
            hops.cancel()       # nobody will wait for it (its thread ends on its own)
            raise
        finally:
            for task in (check, classify):
                task.cancel()
            await asyncio.gather(check, classify, return_exceptions=True)
        self.family_profiles[self._primary] = self.profiles["tcp"]
        self.ports[self._primary] = PunchPort(self._primary, self.server, local_ip)
        # Our sequential NAT's positions (None for other NATs); NAT routers in front of us.
        self._tracker: AllocationTracker | None = tracker_for(self.tcp_profile)
        with self._start_step("hops"):
            self.nat_hops: int | None = await hops
        with self._start_step("announce"):
            await self._learn_punch_address(self._primary, new_port=True)
            await self._add_other_family()
        # Registered with its address already: no CONNECT can find us without one.
        self._signal.profiles = [p.to_dict() for p in self._all_profiles()]
        self._signal.candidates = [c.to_wire() for c in self._candidates()]
        with self._start_step("register"):
            await self._signal.start()
        # Learned again now that the signaling connection has taken its own mapping: a
        # sequential NAT's prediction base has moved. (Without this round trip a CONNECT
        # right after registration was also seen to reach the responder one RTT late.)
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

    async def _classify(self, local_ip: str) -> None:
        kinds = ["tcp", "udp"] if self.classify_udp else ["tcp"]
        for kind in kinds:    # one after the other: allocation probes must not interleave
            profile = await classify_nat(self.server, transport=kind, local_ip=local_ip)
            self.profiles[kind] = profile.evolve(family=Family(self._primary))

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
    async def connect(self, target: str, *, timeout: float = 15.0, relay: bool = True) -> Connection:
        """A connection to ``target`` (name or peer_id): direct if possible, else relayed
        (``relay=False``: direct or PunchError; a relayed one's ``upgrade()`` uses it)."""
        report = self._new_report("initiator")
        self.last_report = report
        try:
            async with asyncio.timeout(timeout):
                if self._predictable_symmetric():
                    await self.announce()   # the prediction needs our latest mapping
                async with self._announcing:    # a port rotation in flight ends first
                    ports, candidates = self._lane_ends(), self._candidates()
                instr = await self._signal.connect(target, candidates, self._all_profiles())
                conn = await self._run_session(instr, report, ports, relay)
                if conn.route is Route.RELAY:
                    conn.upgrader = functools.partial(self.connect, target, timeout=timeout,
                                                      relay=False)
                return conn
        except TimeoutError as exc:
            report.fail(f"connect to {target} took longer than {timeout} s", timed_out=True)
            raise TimeoutError(report.error) from exc
        except BaseException as exc:
            if report.ended is None:
                report.fail(exc)
            raise

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

    def _abort_of(self, session: str) -> asyncio.Future[str]:
        return self._aborts.setdefault(session, asyncio.get_running_loop().create_future())

    def _lane_ends(self) -> dict[str, Address]:
        """Our (local ip, punch port) per family, as they are now."""
        return {f: (pp.local_ip, pp.port) for f, pp in self.ports.items()}

    async def _run_session(self, instr: PunchInstruction, report: ConnectionReport,
                           ends: dict[str, Address], relay: bool = True) -> Connection:
        """Punch or relay, until done or the other peer gives up; either side's failure is
        reported to the server, which tells the other peer so it stops at once."""
        abort = self._abort_of(instr.session)
        work = asyncio.ensure_future(self._punch_or_relay(instr, report, ends, relay))
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
            self._aborts.pop(instr.session, None)
            if not work.done():
                # Its punch steps close whatever they still connect (punch.close_late_result).
                work.cancel()
                with contextlib.suppress(BaseException):
                    await work
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
                              ends: dict[str, Address], relay: bool = True) -> Connection:
        relaying = relay and self.relay != "none"
        peer = instr.peer
        report.peer_id, report.peer_name = peer.peer_id, peer.name
        report.remote_nat = peer.tcp_profile.to_dict()
        if instr.plan:
            plan = Plan.from_dict(instr.plan)
        else:       # a server without the strategy module: plan it here, the same way
            ours = (self._all_profiles(), self._candidates())
            theirs = ([NatProfile.from_dict(p) for p in peer.profiles], list(peer.candidates))
            (pi, ci), (pr, cr) = (ours, theirs) if instr.role == "initiator" else (theirs, ours)
            plan = plan_race(pi, pr, ci, cr)
        report.set_plan(plan.to_dict())
        report.tls = not self.insecure_plain
        initiator = instr.role == "initiator"
        start_at = instr.start_at - (self.clock() - time.time())   # into the engine's clock
        if peer.cert is not None and not self.insecure_plain:   # warm the TLS context meanwhile
            self._spawn(warm_tls_context(self.identity, peer.cert, initiator, start_at))
        direct_error: BaseException | None = None
        cause = "no_direct_plan"
        if plan.direct_steps:
            relay_grant = self._grants.setdefault(instr.session,
                                                  asyncio.get_running_loop().create_future())
            try:
                def secure(won: PunchResult) -> Awaitable[Streams]:
                    return secure_stream(won.sock, identity=self.identity, peer_id=peer.peer_id,
                                         peer_cert=peer.cert, initiator=initiator,
                                         timeout=TLS_TIMEOUT, insecure_plain=self.insecure_plain)
                punch = Punch.for_session(self.engine, plan, instr.role, start_at, ends,
                                          peer.candidates, peer.profiles, report, secure)
                pp = self._port()
                punch.rtt, punch.nat_hops = self._signal.rtt, self.nat_hops
                punch.sequential = sequential_side(
                    self._tracker, functools.partial(probe, pp.server, pp.local_ip, 0))
                if plan.has_relay and relaying:    # the relay ready alongside
                    route, (reader, writer) = await direct_or_relay(
                        punch=punch, secure=secure, initiator=initiator, start_at=start_at,
                        spread=instr.spread, report=report,
                        join_relay=lambda: self._relay(instr, initiator),
                        relay_tls=lambda streams: secure_stream(
                            streams, identity=self.identity, peer_id=peer.peer_id,
                            peer_cert=peer.cert, initiator=initiator, timeout=TLS_TIMEOUT,
                            insecure_plain=self.insecure_plain))
                    await self._report(instr.session, str(route), report)
                    return self._connection(reader, writer, peer, route, report)
                result = await punch_or_grant(punch.run(), relay_grant)
            except (PunchError, OSError) as exc:
                direct_error = exc
                cause = "punch_failed" if isinstance(exc, PunchError) else "socket_error"
            else:
                if isinstance(result, RelayInstruction):   # the initiator gave up first
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
                        await self._report(instr.session, "direct", report)
                        return self._connection(reader, writer, peer, Route.DIRECT, report)
        if not plan.has_relay or not relaying:
            raise PunchError(f"no direct path to {peer.name} ({direct_error or plan.reason}) "
                             "and relaying is off")
        reason = str(direct_error) if direct_error else plan.reason
        # The one WARNING of this connection's fallback (its reason also goes to the report,
        # the server's metrics and the API's events).
        log.warning("falling back to the relay for %s: %s", peer.name, reason)
        report.fallback(reason, cause)
        record = report.step_started("relay")
        try:
            streams = await self._relay(instr, initiator)
            reader, writer = await secure_stream(
                streams, identity=self.identity, peer_id=peer.peer_id, peer_cert=peer.cert,
                initiator=initiator, timeout=TLS_TIMEOUT, insecure_plain=self.insecure_plain)
        except BaseException as exc:
            report.step_finished(record, "error", error=exc)
            raise
        report.step_finished(record, "success")
        report.finish(Route.RELAY, relay_reason=reason)
        await self._report(instr.session, "relay", report)
        return self._connection(reader, writer, peer, Route.RELAY, report)

    def _relay(self, instr: PunchInstruction, initiator: bool) -> Awaitable[Streams]:
        """Streams to the peer through a relay (relay_step.peer_relay)."""
        return peer_relay(self._signal, instr, initiator=initiator, relay=self.relay,
                          turn=self.turn, grants=self._grants, server=self.server,
                          timeout=RELAY_TIMEOUT)

    def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: Any,
                    route: Route, report: ConnectionReport) -> Connection:
        return Connection(reader, writer, peer_id=peer.peer_id, peer_name=peer.name, route=route,
                          report=report, keepalive=self.keepalive)

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
