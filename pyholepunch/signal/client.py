"""Signaling client: register, stay registered, ask for punches, surface the server's pushes.

The server measures our clock (ping/pong at registration and on keepalive), so every PUNCH
``start_at`` arrives already in *our* clock (``clock``, default ``time.time``; a test injects
skew here). The client answers pings, reconnects with exponential backoff when the server goes
away, and re-registers; PUNCH/RELAY_GRANT pushes for the peer layer arrive in ``incoming``.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..address import Address
from ..errors import AuthenticationError, ProtocolError, SignalingError
from ..identity import Identity, default_config_dir
from ..nat.profile import NatProfile
from ..strategy.candidates import Candidate, parse_candidates
from ..stun.client import connect_rearming, silence_rearm
from .check import CHECK_FLOOR, CHECK_RTTS, Checked, check_server
from .machine import ConnectionClosed, Role, SignalConnection, State
from .protocol import (
    DEFAULT_MAX_FRAME,
    VERSION,
    Connect,
    Error,
    ErrorCode,
    Hello,
    Message,
    Ping,
    Pong,
    Punch,
    Register,
    Registered,
    Relay,
    RelayGrant,
    Result,
    Update,
    clamp_start,
    refusal,
    registration_message,
)
from .tls import KNOWN_SERVERS, KnownServers, client_context, parse_fingerprint, verify_server

log = logging.getLogger(__name__)
MAX_ABANDONED = 256         # given-up sessions remembered, to drop a PUNCH that comes late
NO_RETRY = {ErrorCode.BAD_SIGNATURE, ErrorCode.NAME_TAKEN, ErrorCode.TOKEN_REQUIRED,
            ErrorCode.TOKEN_INVALID, ErrorCode.TOKEN_EXPIRED, ErrorCode.BAD_NAME,
            ErrorCode.REPLACED, ErrorCode.VERSION, ErrorCode.QUOTA_EXCEEDED}


@dataclass(frozen=True, slots=True)
class PeerInfo:
    peer_id: str
    name: str
    public_key: bytes
    cert: bytes | None
    candidates: tuple[Candidate, ...]
    profiles: tuple[dict[str, Any], ...]

    @property
    def tcp_profile(self) -> NatProfile:
        for p in self.profiles:
            if p.get("transport", "tcp") == "tcp":
                return NatProfile.from_dict(p)
        return NatProfile()


@dataclass(frozen=True, slots=True)
class SessionAborted:
    """The session's other peer gave up (ERROR PEER_GAVE_UP): stop punching or waiting."""

    session: str
    reason: str


@dataclass(frozen=True, slots=True)
class PunchInstruction:
    """One PUNCH: who, how (plan), when (``start_at`` in this client's clock), our role."""

    session: str
    role: str
    start_at: float
    peer: PeerInfo
    plan: dict[str, Any] | None
    spread: float = 0.0     # how late either PUNCH may arrive (the server's measurement)


@dataclass(frozen=True, slots=True)
class RelayInstruction:
    """RELAY_GRANT: join the built-in relay at ``relay`` with ``token`` (via "builtin"), or
    dial the TURN relayed address ``relay`` with plain TCP (via "turn", empty token)."""

    session: str
    token: bytes
    relay: Address
    via: str = "builtin"


Event = PunchInstruction | RelayInstruction | SessionAborted   # what ``incoming`` carries


def _punch(msg: Punch, now: float) -> PunchInstruction:
    p = msg.peer
    return PunchInstruction(    # a start far ahead is not waited for (protocol.clamp_start)
        session=msg.session, role=msg.role, start_at=clamp_start(msg.start_at, now), plan=msg.plan,
        spread=max(msg.spread, 0.0),
        peer=PeerInfo(p["peer_id"], p["name"], p["public_key"], p["cert"],
                      tuple(parse_candidates(p["candidates"])), tuple(p["profiles"])))


def _candidates(candidates: Sequence[Candidate | Address]) -> list[list[Any]]:
    """Candidates in their wire form; a bare (ip, port) counts as in a v1 list (the first
    is the server-observed address, the others host addresses)."""
    return [c.to_wire() if isinstance(c, Candidate) else Candidate.from_wire(list(c), i).to_wire()
            for i, c in enumerate(candidates)]


def _profiles(profiles: Sequence[NatProfile | dict[str, Any]]) -> list[dict[str, Any]]:
    return [p.to_dict() if isinstance(p, NatProfile) else dict(p) for p in profiles]


class SignalClient:
    def __init__(self, server: Address, identity: Identity, *, name: str,
                 server_fingerprint: bytes | str | None = None,
                 known_hosts: str | Path | None = None, token: str | None = None,
                 clock: Callable[[], float] = time.time,
                 profiles: Sequence[NatProfile | dict[str, Any]] = (),
                 candidates: Sequence[Candidate | Address] = (), cert: bytes | None = None,
                 reconnect: bool = True, connect_timeout: float = 10.0,
                 idle_timeout: float = 90.0, backoff: tuple[float, float] = (0.25, 15.0),
                 max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.server = server
        self.identity = identity
        self.name = name
        self._pin = (parse_fingerprint(server_fingerprint) if isinstance(server_fingerprint, str)
                     else server_fingerprint)
        self._known = None if self._pin is not None else KnownServers(
            known_hosts or default_config_dir() / KNOWN_SERVERS)
        self.token = token
        self.clock = clock
        self.profiles = _profiles(profiles)
        self.candidates = _candidates(candidates)
        self.cert = cert
        self.reconnect = reconnect
        self.connect_timeout, self.idle_timeout, self.backoff = connect_timeout, idle_timeout, backoff
        self.max_frame = max_frame
        self.incoming: asyncio.Queue[Event] = asyncio.Queue()
        self.peer_id = identity.peer_id
        self.offset = 0.0          # our clock minus the server's, as the server measured it
        self.rtt: float | None = None
        self.connect_rtt: float | None = None   # the TCP handshake's, before registering
        self.registrations = 0
        self.connected = asyncio.Event()
        self.server_id: bytes | None = None
        self._conn: SignalConnection | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[tuple[str, str], asyncio.Future[Any]] = {}
        self._abandoned: OrderedDict[str, None] = OrderedDict()   # connects we gave up on
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.failure: BaseException | None = None
        self._checked: Checked | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect and register (errors raise here); then stay registered in the background."""
        reader = await self._connect_once()
        self._task = asyncio.get_running_loop().create_task(self._run(reader))

    async def close(self) -> None:
        self._closed = True
        self._drop_checked()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        self._drop_connection(ConnectionError("client closed"))

    async def __aenter__(self) -> SignalClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- requests ----------------------------------------------------------------------------
    async def connect(self, target: str, candidates: Sequence[Candidate | Address] | None = None,
                      profiles: Sequence[NatProfile | dict[str, Any]] | None = None, *,
                      session: str | None = None, timeout: float = 10.0) -> PunchInstruction:
        """Ask the server to coordinate a punch with ``target`` (name or peer_id)."""
        session = session or secrets.token_urlsafe(12)
        fut = self._expect("punch", session)
        self._send(Connect(session=session, target=target,
                           candidates=(_candidates(candidates) if candidates is not None
                                       else self.candidates),
                           profiles=_profiles(profiles) if profiles is not None else self.profiles))
        try:
            result: PunchInstruction = await self._await(fut, ("punch", session), timeout)
        except (asyncio.CancelledError, TimeoutError):
            self._abandon(session)
            raise
        return result

    def _abandon(self, session: str) -> None:
        """We gave up on ``session`` before its PUNCH: the server hears it now and tells the
        other peer (which stops punching on its port); a PUNCH still coming is dropped."""
        self._abandoned[session] = None
        if len(self._abandoned) > MAX_ABANDONED:
            self._abandoned.popitem(last=False)
        with contextlib.suppress(ConnectionError):
            self._send(Result(session=session, outcome="failed", stats={}, reason=(
                "stopped waiting before the punch (connect cancelled or timed out)")))

    async def request_relay(self, session: str, timeout: float = 10.0) -> RelayInstruction:
        fut = self._expect("relay_grant", session)
        self._send(Relay(session=session))
        result: RelayInstruction = await self._await(fut, ("relay_grant", session), timeout)
        return result

    async def offer_relay(self, session: str, relayed: Address,
                          timeout: float = 10.0) -> RelayInstruction:
        """Hand our TURN relayed address to the session's other peer (the server forwards it
        as a RELAY_GRANT via "turn"); returns the server's acknowledgement. SignalingError if
        the server refused (unknown session, already offered, the peer is offline)."""
        fut = self._expect("relay_grant", session)
        try:
            self._send(Relay(session=session, relayed=(relayed[0], relayed[1])))
        except BaseException:
            self._pending.pop(("relay_grant", session), None)
            raise
        result: RelayInstruction = await self._await(fut, ("relay_grant", session), timeout)
        return result

    async def report_result(self, session: str, outcome: str,
                            stats: dict[str, Any] | None = None, *,
                            reason: str | None = None) -> None:
        """Outcome for the server's metrics; a "failed" one with its ``reason`` is passed on
        to the other peer, which stops waiting for us."""
        self._send(Result(session=session, outcome=outcome, stats=dict(stats or {}),
                          reason=reason))

    async def update(self, candidates: Sequence[Candidate | Address] | None = None,
                     profiles: Sequence[NatProfile | dict[str, Any]] | None = None,
                     cert: bytes | None = None) -> None:
        if candidates is not None:
            self.candidates = _candidates(candidates)
        if profiles is not None:
            self.profiles = _profiles(profiles)
        if cert is not None:
            self.cert = cert
        self._send(Update(candidates=None if candidates is None else self.candidates,
                          profiles=None if profiles is None else self.profiles, cert=cert))

    async def next_event(self, timeout: float | None = None) -> Event:
        return await asyncio.wait_for(self.incoming.get(), timeout)

    async def __aiter__(self) -> AsyncIterator[Event]:
        while not self._closed:
            yield await self.incoming.get()

    def _expect(self, kind: str, session: str) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[(kind, session)] = fut
        return fut

    async def _await(self, fut: asyncio.Future[Any], key: tuple[str, str], timeout: float) -> Any:
        try:
            async with asyncio.timeout(timeout):    # no extra task per request, unlike wait_for
                return await fut
        finally:
            self._pending.pop(key, None)

    def _send(self, msg: Message) -> None:
        if self._writer is None or self._conn is None or self._conn.state is not State.READY:
            raise ConnectionError(f"not registered with {self.server[0]}:{self.server[1]}")
        self._writer.write(self._conn.send(msg))

    # -- connection --------------------------------------------------------------------------
    async def check_server(self, *, floor: float = CHECK_FLOOR, rtts: float = CHECK_RTTS) -> float:
        """Is a pyholepunch rendezvous server at ``server``? Returns the RTT it answered in
        (signal.check.check_server); its connection is kept for the registration."""
        self._drop_checked()
        rtt, self._checked = await check_server(
            self.server, pin=self._pin, known=self._known, max_frame=self.max_frame,
            connect_timeout=self.connect_timeout, floor=floor, rtts=rtts)
        self.connect_rtt = rtt
        return rtt

    def _drop_checked(self) -> None:
        if self._checked is not None:
            self._checked.close()
            self._checked = None

    async def _connect_once(self) -> asyncio.StreamReader:
        kept, self._checked = self._checked, None
        if kept is not None and kept.fresh():
            try:
                return await self._register_on(kept.reader, kept.writer, kept.conn, kept.fp,
                                               kept.hello)
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                log.debug("the checked connection did not register (%s): a fresh one", exc)
        elif kept is not None:
            kept.close()
        # A lost SYN is sent again after ~3 RTTs (check_server's or the last registration's),
        # not the kernel's 1 s; TLS and REGISTER ride on TCP's retransmission (RTO ~0.2 s).
        sock, rtt, _ = await connect_rearming(self.server, timeout=self.connect_timeout,
                                           rearm=silence_rearm(self.rtt or self.connect_rtt),
                                           any_port=True)
        self.connect_rtt = rtt
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(sock=sock, ssl=client_context(),
                                        server_hostname=self.server[0],
                                        ssl_handshake_timeout=self.connect_timeout),
                self.connect_timeout)
        except BaseException:
            sock.close()
            raise
        return await self._register_on(reader, writer,
                                       SignalConnection(Role.CLIENT, max_frame=self.max_frame),
                                       None, None)

    async def _register_on(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                           conn: SignalConnection, fp: bytes | None,
                           hello: Hello | None) -> asyncio.StreamReader:
        try:
            if fp is None:      # a fresh connection: its certificate is checked here
                ssl_obj = writer.get_extra_info("ssl_object")
                fp = verify_server(ssl_obj.getpeercert(binary_form=True) if ssl_obj else None,
                                   *self.server, pin=self._pin, known=self._known)
            self._conn, self._writer = conn, writer
            await asyncio.wait_for(self._register(reader, writer, conn, fp, hello),
                                   self.connect_timeout)
        except BaseException:
            writer.close()
            self._conn = self._writer = None
            raise
        return reader

    async def _register(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        conn: SignalConnection, fp: bytes, hello: Hello | None = None) -> None:
        if hello is not None:       # check_server's connection: HELLO is in already
            self._answer_hello(hello, writer, conn, fp)
        while True:
            data = await reader.read(65536)
            at = self.clock()
            for msg in conn.receive_data(data):
                if isinstance(msg, ConnectionClosed):
                    err = msg.error
                    if err is None:
                        raise ConnectionError("server closed the connection during registration")
                    raise refusal(err.reason, err.code, "registration refused: ")
                if isinstance(msg, Hello):
                    self._answer_hello(msg, writer, conn, fp)
                elif isinstance(msg, Ping):
                    writer.write(conn.send(Pong(t1=msg.t1, t2=at, t3=self.clock())))
                elif isinstance(msg, Registered):
                    self.offset, self.rtt = msg.offset, msg.rtt
                    self.registrations += 1
                    self.connected.set()
                    log.info("registered with %s:%d as %s (%s), rtt %.1f ms", *self.server,
                             self.name, msg.peer_id, msg.rtt * 1e3)
                    return

    def _answer_hello(self, msg: Hello, writer: asyncio.StreamWriter, conn: SignalConnection,
                      fp: bytes) -> None:
        if msg.version != VERSION:
            raise SignalingError(f"server speaks signaling v{msg.version}, we speak "
                                 f"v{VERSION}", code=ErrorCode.VERSION)
        if msg.server_id != fp:
            raise AuthenticationError("server id in HELLO does not match its certificate")
        self.server_id = fp
        sig = self.identity.sign(registration_message(
            msg.nonce, fp, self.name, self.identity.public_key))
        writer.write(conn.send(Register(
            name=self.name, public_key=self.identity.public_key, challenge=msg.nonce,
            signature=sig, token=self.token, cert=self.cert, profiles=self.profiles,
            candidates=list(self.candidates))))

    async def _run(self, reader: asyncio.StreamReader | None) -> None:
        delay = self.backoff[0]
        while not self._closed:
            if reader is not None:
                try:
                    await self._read_loop(reader)
                    err: BaseException = ConnectionError("server closed the connection")
                except (OSError, asyncio.IncompleteReadError, TimeoutError, ProtocolError) as exc:
                    err = exc
                except SignalingError as exc:
                    err = exc
                    if exc.code in NO_RETRY:
                        self.failure = exc
                        self._drop_connection(exc)
                        log.warning("signaling stopped: %s", exc)
                        return
                self._drop_connection(err)
                log.info("lost rendezvous server %s:%d (%s); reconnecting", *self.server, err)
                reader, delay = None, self.backoff[0]
            if not self.reconnect:
                self.failure = ConnectionError("lost rendezvous server")
                return
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))   # jitter: no reconnect storm
            delay = min(delay * 2, self.backoff[1])
            try:
                reader = await self._connect_once()
            except SignalingError as exc:
                if exc.code in NO_RETRY:
                    self.failure = exc
                    log.warning("re-registration refused: %s", exc)
                    return
            except (OSError, TimeoutError, ProtocolError) as exc:
                log.debug("reconnect to %s:%d failed: %s", *self.server, exc)

    def _drop_connection(self, exc: BaseException) -> None:
        self.connected.clear()
        if self._writer is not None:
            self._writer.close()
        self._conn = self._writer = None
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ConnectionError(f"signaling connection lost: {exc}"))

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        conn, writer = self._conn, self._writer
        assert conn is not None and writer is not None
        loop = asyncio.get_running_loop()
        last_rx, stale = loop.time(), False
        handle: asyncio.TimerHandle | None = None

        # One watchdog timer per connection rather than a timeout per read (cheaper): the
        # server pings well within idle_timeout, so silence means it is gone.
        def watchdog() -> None:
            nonlocal handle, stale
            if loop.time() - last_rx > self.idle_timeout:
                stale = True
                writer.transport.abort()
                return
            handle = loop.call_later(self.idle_timeout / 4, watchdog)

        handle = loop.call_later(self.idle_timeout / 4, watchdog)
        try:
            while True:
                data = await reader.read(65536)
                at, last_rx = self.clock(), loop.time()
                if stale:
                    raise TimeoutError(f"no word from the server in {self.idle_timeout:g}s")
                for msg in conn.receive_data(data):
                    if isinstance(msg, ConnectionClosed):
                        if msg.error is not None:
                            raise refusal(msg.error.reason, msg.error.code)
                        return
                    self._dispatch(msg, at, conn, writer)
        finally:
            if handle is not None:
                handle.cancel()

    def _dispatch(self, msg: Message, at: float, conn: SignalConnection,
                  writer: asyncio.StreamWriter) -> None:
        if isinstance(msg, Ping):
            writer.write(conn.send(Pong(t1=msg.t1, t2=at, t3=self.clock())))
            if msg.offset is not None and msg.rtt is not None:
                self.offset, self.rtt = msg.offset, msg.rtt
        elif isinstance(msg, Punch):
            fut = self._pending.get(("punch", msg.session))
            if fut is not None and msg.role == "initiator":
                if not fut.done():
                    fut.set_result(_punch(msg, at))
            elif msg.role == "initiator" and msg.session in self._abandoned:
                log.debug("PUNCH for %s after we gave up on it: dropped", msg.session)
            else:
                self.incoming.put_nowait(_punch(msg, at))
        elif isinstance(msg, RelayGrant):
            grant = RelayInstruction(msg.session, msg.token, msg.relay, msg.via)
            fut = self._pending.get(("relay_grant", msg.session))
            if fut is not None:
                if not fut.done():
                    fut.set_result(grant)
            else:
                self.incoming.put_nowait(grant)
        elif isinstance(msg, Error) and msg.session is not None:
            exc = refusal(msg.reason, msg.code)
            for kind in ("punch", "relay_grant"):
                fut = self._pending.get((kind, msg.session))
                if fut is not None and not fut.done():
                    fut.set_exception(exc)
            if msg.code == ErrorCode.PEER_GAVE_UP:
                self.incoming.put_nowait(SessionAborted(msg.session, msg.reason))
        elif isinstance(msg, Pong):
            pass      # we send no pings of our own; the server's pings keep us measured
