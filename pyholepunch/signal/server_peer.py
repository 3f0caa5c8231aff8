"""One peer's connection to the rendezvous server: registration, clock sync, punch
coordination, relay grants, results.

A thin asyncio driver around ``SignalConnection``, messages handled in order: at once
(eager.run_eager) when the store never waits, else by a task that exists while there is work.
"""
from __future__ import annotations

import asyncio
import contextvars
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import AuthenticationError, ProtocolError, QuotaError, Refusal
from ..identity import verify_signature
from .admission import is_loopback, source_key
from .auth import TokenBucket, check_token
from .eager import run_eager
from .machine import ClockEstimator, ConnectionClosed, Role, SignalConnection, State, common_start
from .plan import make_plan
from .protocol import (
    PEER_ID_RE,
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
    check_candidates,
    clamp_start,
    registration_message,
)
from .store import PeerRecord, cached_peer_id
from .tls import check_peer_cert
from .tlsproto import TlsTransport

if TYPE_CHECKING:
    from .server import SignalServer

log = logging.getLogger(__name__)
MAX_GAVE_UP_REASON = 200     # characters of a peer's failure reason passed on to the other
MAX_OUTSTANDING_PINGS = 4    # pings whose pong we still accept (a pong must echo one of them)
_TIMER_CONTEXT = contextvars.Context()


def _other_peer(session: dict[str, Any], peer_id: str) -> str:
    """The session's participant that is not ``peer_id``."""
    other: str = session["responder"] if peer_id == session["initiator"] else session["initiator"]
    return other


class PeerProtocol(asyncio.Protocol):
    def __init__(self, server: SignalServer) -> None:
        self.server = server
        self.cfg = server.config
        self.conn = SignalConnection(Role.SERVER, max_frame=self.cfg.max_frame)
        self.conn_id = os.urandom(8).hex()
        self.transport: TlsTransport | None = None
        self.nonce = os.urandom(32)
        self.clock = ClockEstimator()
        self.record: PeerRecord | None = None
        self.bucket: TokenBucket | None = None
        # Plain lists, not deques: a deque allocates a 624-byte block at once, and every
        # registered peer holds these (a queue of a message or two, at most 4 pings).
        self._queue: list[tuple[Message, float]] = []
        self._worker: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._last_rx = 0.0
        self._closing = False
        # t1 of the last MAX_OUTSTANDING_PINGS pings sent; a tuple of floats, replaced at each
        # ping: the collector stops tracking it (a list would be traversed forever, #18)
        self._pings: tuple[float, ...] = ()
        self.source = ""           # the peer's address as admission counts it
        self.loopback = False      # connected over loopback (from the server's own host)

    # -- transport callbacks ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, TlsTransport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        host = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        self.source, self.loopback = source_key(host), is_loopback(host)
        now = self.server.clock()
        self._last_rx = now
        self.bucket = TokenBucket(self.cfg.rate, self.cfg.burst, now)
        self.server.connections.add(self)
        self.send(Hello(nonce=self.nonce, server_time=now, server_id=self.server.server_id))
        self._arm(self.cfg.handshake_timeout, lambda: self.fail(
            ErrorCode.TIMEOUT, f"registration not completed in {self.cfg.handshake_timeout:g}s"))

    def data_received(self, data: bytes) -> None:
        now = self.server.clock()
        self._last_rx = now
        before = self.conn.frames_in
        try:
            events = self.conn.receive_data(data)
        except ProtocolError as exc:
            self.fail(ErrorCode(exc.code) if exc.code in ErrorCode._value2member_map_
                      else ErrorCode.MALFORMED, str(exc))
            return
        self.server.metrics["frames_in"] += self.conn.frames_in - before
        for msg in events:
            if isinstance(msg, ConnectionClosed):
                self.close()
                return
            assert self.bucket is not None
            if not self.bucket.take(now):
                self.fail(ErrorCode.RATE_LIMITED, f"more than {self.cfg.rate:g} messages/s")
                return
            self._queue.append((msg, now))
        if self._queue and self._worker is None:
            self._worker = (run_eager(self._drain()) if self.server.eager
                            else asyncio.get_running_loop().create_task(self._drain()))

    def eof_received(self) -> bool | None:
        self.close()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self.server.connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._worker is not None:
            self._worker.cancel()
            self._worker = None
        rec = self.record
        if rec is not None and self.server.peers.get(rec.peer_id) is self:
            del self.server.peers[rec.peer_id]
            asyncio.get_running_loop().create_task(self._drop(rec))

    async def _drop(self, rec: PeerRecord) -> None:
        try:
            await self.server.store.drop_online(rec.peer_id, self.server.node_id)
        except Exception:
            log.warning("could not drop %s from the store", rec.peer_id, exc_info=True)

    # -- sending / closing -----------------------------------------------------------------
    def send(self, msg: Message) -> None:
        try:
            self.deliver(msg)
        except ProtocolError as exc:
            # Nothing was sent and the state did not move: drop this message, keep the peer
            # (a push that cannot be framed is refused to its sender in SignalServer.push).
            log.warning("cannot send %s to %s: %s", msg.TYPE, self.name, exc)

    def deliver(self, msg: Message) -> None:
        """``send``, except that a message that cannot be framed raises LocalProtocolError
        (nothing sent, the state unmoved): SignalServer.push refuses it to its sender."""
        if self._closing or self.transport is None or self.conn.state is State.CLOSED:
            return
        data = self.conn.send(msg)
        self.transport.write(data)
        self.server.metrics["frames_out"] += 1
        if self.transport.get_write_buffer_size() > self.cfg.max_write_buffer:
            log.warning("peer %s does not read; dropping it", self.name)
            self.close()

    def fail(self, code: ErrorCode, reason: str, session: str | None = None) -> None:
        """Answer a fatal ERROR and close; the server carries on with everyone else."""
        if self._closing:
            return
        self.server.refuse(code.name)
        log.info("refusing %s: %s %s", self.name, code.name, reason)
        if self.conn.state is not State.CLOSED:
            self.send(Error(code=int(code), reason=reason[:200], session=session, fatal=True))
        self.close()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._queue.clear()
        if self.transport is not None:
            self.transport.close()

    @property
    def name(self) -> str:
        if self.record is not None:
            return f"{self.record.name}({self.record.peer_id[:8]})"
        peer = self.transport.get_extra_info("peername") if self.transport else None
        return str(peer)

    # -- timers ----------------------------------------------------------------------------
    def _arm(self, delay: float, fn: Callable[[], None]) -> None:
        if self._timer is not None:
            self._timer.cancel()
        # One shared empty context: call_later would copy the current one for each timer, an
        # object more for the collector per registered peer (#18); the server's callbacks
        # read no context variable.
        self._timer = asyncio.get_running_loop().call_later(delay, fn, context=_TIMER_CONTEXT)

    def _keepalive(self) -> None:
        now = self.server.clock()
        if now - self._last_rx > self.cfg.idle_timeout:
            self.fail(ErrorCode.TIMEOUT, f"idle for {self.cfg.idle_timeout:g}s")
            return
        self._ping(now, offset=self.clock.offset, rtt=self.clock.rtt)
        self._arm(self.cfg.keepalive, self._keepalive)

    def _ping(self, now: float, **estimate: float | None) -> None:
        self._pings = (*self._pings[1 - MAX_OUTSTANDING_PINGS:], now)
        self.send(Ping(t1=now, **estimate))

    # -- message handling ------------------------------------------------------------------
    async def _drain(self) -> None:
        try:
            while self._queue and not self._closing:
                msg, at = self._queue.pop(0)
                try:
                    await self._handle(msg, at)
                except Refusal as r:
                    code = ErrorCode(r.code)
                    if r.fatal:
                        self.fail(code, r.reason, r.session)
                    else:
                        self.server.refuse(code.name)
                        self.send(Error(code=int(r.code), reason=r.reason, session=r.session,
                                        fatal=False))
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("internal error handling %s from %s", msg.TYPE, self.name)
                    self.fail(ErrorCode.INTERNAL, "internal server error")
        finally:
            self._worker = None

    async def _handle(self, msg: Message, at: float) -> None:
        if isinstance(msg, Pong):
            sampled = self._on_pong(msg, at)
            if self.conn.state is State.SYNCING:
                await self._sync_step()
            elif sampled and self.record is not None and self.clock.best is not None:
                self.record.offset, self.record.rtt = self.clock.offset, self.clock.rtt or 0.0
                self.record.spread = self.clock.spread
                await self.server.store.put_online(self.record)   # also refreshes a Redis TTL
        elif isinstance(msg, Ping):
            self.send(Pong(t1=msg.t1, t2=at, t3=self.server.clock()))
        elif isinstance(msg, Register):
            await self._register(msg)
        elif isinstance(msg, Connect):
            await self._connect(msg)
        elif isinstance(msg, Result):
            await self._result(msg)
        elif isinstance(msg, Relay):
            await self._relay(msg)
        elif isinstance(msg, Update):
            assert self.record is not None
            if msg.candidates is not None:
                self.record.candidates = [list(c) for c in self._candidates(msg.candidates)]
            if msg.profiles is not None:
                self.record.profiles = msg.profiles
            if msg.cert is not None:
                self._check_cert(msg.cert, self.record.public_key)
                self.record.cert = msg.cert
            await self.server.store.put_online(self.record)

    def _on_pong(self, msg: Pong, at: float) -> bool:
        """Take a clock sample only from a pong that echoes a ping we sent (once) and whose
        times make sense: the peer's hold time within our measured round trip, the round
        trip within max_rtt. Anything else is discarded: a peer cannot claim its RTT."""
        if msg.t1 not in self._pings:
            log.debug("pong from %s echoes no ping of ours; ignored", self.name)
            return False
        i = self._pings.index(msg.t1)
        self._pings = self._pings[:i] + self._pings[i + 1:]
        held, measured = msg.t3 - msg.t2, at - msg.t1
        if not (0.0 <= held <= measured and measured - held <= self.cfg.max_rtt):
            log.info("discarding clock sample from %s: held %.3f s of a %.3f s round trip",
                     self.name, held, measured)
            return False
        self.clock.add(msg.t1, msg.t2, msg.t3, at)
        return True

    def _candidates(self, value: list[list[Any]], session: str | None = None,
                    fatal: bool = False) -> list[list[Any]]:
        """protocol.check_candidates; loopback only from a peer on the server's own host."""
        policy = self.cfg.loopback_candidates
        allow = self.loopback if policy is None else policy
        if allow:       # every caller passes a message's field: the wire check was this one
            return value
        try:
            return check_candidates(value, allow_loopback=allow)
        except ValueError as exc:
            raise Refusal(ErrorCode.BAD_REQUEST, f"candidates: {exc}", session=session,
                          fatal=fatal) from None

    @staticmethod
    def _check_cert(cert: bytes, public_key: bytes, fatal: bool = False) -> None:
        try:
            check_peer_cert(cert, public_key)
        except AuthenticationError as exc:
            raise Refusal(ErrorCode.BAD_REQUEST, f"cert: {exc}", fatal=fatal) from None

    async def _register(self, msg: Register) -> None:
        srv = self.server
        code = check_token(self.cfg.token, msg.token, srv.clock())
        if code is not None:
            raise Refusal(code, {ErrorCode.TOKEN_REQUIRED: "access token required",
                                 ErrorCode.TOKEN_EXPIRED: "access token expired"}.get(
                                     code, "access token invalid"))
        if msg.challenge != self.nonce:
            raise Refusal(ErrorCode.REPLAYED_CHALLENGE, "signed challenge is not this connection's")
        try:
            verify_signature(msg.public_key, msg.signature,
                             registration_message(self.nonce, srv.server_id, msg.name, msg.public_key))
        except AuthenticationError:
            raise Refusal(ErrorCode.BAD_SIGNATURE, "registration signature does not verify") from None
        if PEER_ID_RE.fullmatch(msg.name):
            raise Refusal(ErrorCode.BAD_NAME, "a name must not look like a peer_id")
        if msg.cert is not None:
            self._check_cert(msg.cert, msg.public_key, fatal=True)
        candidates = self._candidates(msg.candidates, fatal=True)
        if len(srv.peers) >= self.cfg.max_peers:
            raise Refusal(ErrorCode.SERVER_FULL, f"server full ({self.cfg.max_peers} peers)")
        try:
            owner = await srv.store.bind_name(msg.name, msg.public_key, self.source)
        except QuotaError as exc:
            raise Refusal(ErrorCode.QUOTA_EXCEEDED, str(exc)) from None
        if owner is not None:
            raise Refusal(ErrorCode.NAME_TAKEN, f"name {msg.name!r} belongs to another key")
        self.record = PeerRecord(peer_id=cached_peer_id(msg.public_key), name=msg.name,
                                 public_key=msg.public_key, node=srv.node_id, cert=msg.cert,
                                 candidates=[list(c) for c in candidates], profiles=msg.profiles,
                                 source=self.source)
        await self._sync_step()

    async def _sync_step(self) -> None:
        """Registration clock sync: rounds of pings (the samples missing, at once), then REGISTERED."""
        cfg, count, agreeing = self.cfg, self.clock.count, self.clock.agreeing(self.cfg.sync_agree)
        if count < cfg.sync_pings and agreeing < cfg.sync_min_pings:
            for _ in range(0 if self._pings else min(cfg.sync_min_pings - agreeing,
                                                     cfg.sync_pings - count)):
                self._ping(self.server.clock())     # a new round once its pongs are all in
            return
        srv, rec = self.server, self.record
        assert rec is not None
        rec.offset, rec.rtt = self.clock.offset, self.clock.rtt or 0.0
        rec.spread = self.clock.spread
        previous = await srv.store.get_online(rec.peer_id)
        old_local = srv.peers.get(rec.peer_id)
        if old_local is not None and old_local is not self:
            old_local.fail(ErrorCode.REPLACED, "registered again on a new connection")
        elif previous is not None and previous.node != srv.node_id:
            await srv.store.route(previous.node, {"kind": "kick", "to": rec.peer_id, "conn": ""})
        srv.peers[rec.peer_id] = self
        srv.registered(self.transport)       # leaves the unregistered budget of its source
        await srv.store.put_online(rec)
        srv.metrics["registrations"] += 1
        self.send(Registered(peer_id=rec.peer_id, offset=rec.offset, rtt=rec.rtt))
        log.info("registered %s offset %+.1f ms rtt %.1f ms", self.name, rec.offset * 1e3,
                 rec.rtt * 1e3)
        self._arm(self.cfg.keepalive, self._keepalive)

    async def _connect(self, msg: Connect) -> None:
        srv, me = self.server, self.record
        assert me is not None
        target = await srv.store.find(msg.target)
        if target is None:
            raise Refusal(ErrorCode.UNKNOWN_TARGET, f"no peer {msg.target!r} online",
                          session=msg.session, fatal=False)
        if target.peer_id == me.peer_id:
            raise Refusal(ErrorCode.BAD_REQUEST, "cannot connect to yourself",
                          session=msg.session, fatal=False)
        candidates = self._candidates(msg.candidates, session=msg.session)
        if not srv.punch_allowed(target.peer_id):
            raise Refusal(ErrorCode.RATE_LIMITED, f"peer {msg.target!r} is being asked too often; "
                          "try again shortly", session=msg.session, fatal=False)
        if not await srv.store.put_session(msg.session, {"initiator": me.peer_id,
                                                         "responder": target.peer_id}):
            raise Refusal(ErrorCode.SESSION_EXISTS, "session id already used",
                          session=msg.session, fatal=False)
        # This session's view of the initiator: what the CONNECT says, else what it registered.
        my_candidates, my_profiles = candidates or me.candidates, msg.profiles or me.profiles
        plan = make_plan(my_profiles, target.profiles, my_candidates, target.candidates,
                         rtt=max(me.rtt, target.rtt))
        now = srv.clock()
        start = clamp_start(common_start(now, [me.rtt, target.rtt], self.cfg.margin,
                                          [me.spread, target.spread]), now)
        spread = max(me.spread, target.spread)
        to_b = Punch(session=msg.session, role="responder", start_at=start,
                     peer=me.peer_info(my_candidates, my_profiles), plan=plan, spread=spread)
        try:
            delivered = await srv.push(target, "punch", to_b)
        except ProtocolError as exc:     # refused to the sender; the target never hears of it
            raise Refusal(ErrorCode.BAD_REQUEST, f"cannot build the punch: {exc}",
                          session=msg.session, fatal=False) from None
        if not delivered:
            raise Refusal(ErrorCode.UNKNOWN_TARGET, f"peer {msg.target!r} is no longer reachable",
                          session=msg.session, fatal=False)
        self.send(Punch(session=msg.session, role="initiator", start_at=start + self.clock.offset,
                        peer=target.peer_info(), plan=plan, spread=spread))
        srv.metrics["punches"] += 1
        srv.emit("coordination", session=msg.session,
                 profiles=(my_profiles, target.profiles))
        if log.isEnabledFor(logging.INFO):      # the names are formatted only to be logged
            log.info("punch %s: %s -> %s start in %.1f ms", msg.session, me.name, target.name,
                     (start - srv.clock()) * 1e3)

    async def _session_of(self, session: str) -> dict[str, Any]:
        assert self.record is not None
        info = await self.server.store.get_session(session)
        if info is None or self.record.peer_id not in (info["initiator"], info["responder"]):
            raise Refusal(ErrorCode.UNKNOWN_SESSION, "no such session for this peer",
                          session=session, fatal=False)
        return info

    async def _result(self, msg: Result) -> None:
        info = await self._session_of(msg.session)
        key = {"direct": "successes", "relay": "relayed", "failed": "failures"}[msg.outcome]
        self.server.metrics[key] += 1
        assert self.record is not None
        self.server.emit("result", session=msg.session, outcome=msg.outcome, stats=msg.stats,
                         initiator=info["initiator"] == self.record.peer_id)
        log.info("result %s from %s: %s", msg.session, self.name, msg.outcome)
        if msg.outcome != "relay" and self.server.relay_hub is not None:
            self.server.relay_hub.release(msg.session)    # granted beside the punch, unused
        if msg.outcome == "failed":
            await self._tell_gave_up(msg, info)

    async def _tell_gave_up(self, msg: Result, info: dict[str, Any]) -> None:
        """Pass a failure on to the session's other peer, which may still be punching or
        waiting for a relay that will never come: it stops now, saying why."""
        srv, me = self.server, self.record
        assert me is not None
        other = _other_peer(info, me.peer_id)
        why = (msg.reason or "no reason given")[:MAX_GAVE_UP_REASON]
        err = Error(code=ErrorCode.PEER_GAVE_UP, reason=f"{me.name} gave up: {why}",
                    session=msg.session, fatal=False)
        rec = await srv.store.get_online(other)
        if rec is not None:
            await srv.push(rec, "abort", err)

    async def _relay(self, msg: Relay) -> None:
        srv = self.server
        info = await self._session_of(msg.session)
        if msg.relayed is not None:
            await self._turn_offer(msg, info)
            return
        hub = srv.relay_hub
        if hub is None:
            raise Refusal(ErrorCode.RELAY_UNAVAILABLE, "this server has no relay",
                          session=msg.session, fatal=False)
        records = [await srv.store.get_online(info[role]) for role in ("initiator", "responder")]
        if any(rec is None for rec in records):   # a relay the other side can never join
            raise Refusal(ErrorCode.UNKNOWN_TARGET, "the other peer of this session is offline",
                          session=msg.session, fatal=False)
        # Quotas count against the peer asking (and its address), never the other side.
        assert self.record is not None
        quotas = ((f"peer:{self.record.peer_id}", self.cfg.relays_per_peer),
                  (f"source:{self.source}", self.cfg.relays_per_source))
        try:
            token_a, token_b = hub.issue(msg.session, quotas=quotas)
        except QuotaError as exc:
            raise Refusal(ErrorCode.QUOTA_EXCEEDED, f"relay: {exc}", session=msg.session,
                          fatal=False) from None
        except ValueError:      # the hub issues one token pair per session
            raise Refusal(ErrorCode.SESSION_EXISTS, "relay already granted for this session",
                          session=msg.session, fatal=False) from None
        assert self.transport is not None
        host, port = self.transport.get_extra_info("sockname")[:2]
        srv.metrics["relays"] += 1
        log.info("relay %s granted via %s:%d", msg.session, host, port)
        for rec, token in zip(records, (token_a, token_b), strict=True):
            assert rec is not None
            await srv.push(rec, "grant", RelayGrant(session=msg.session, token=token,
                                                    relay=(host, port)))

    async def _turn_offer(self, msg: Relay, info: dict[str, Any]) -> None:
        """Hand the sender's TURN relayed address to the session's other peer; echo it back
        as the acknowledgement. One offer per session, so a peer cannot make the other dial
        address after address."""
        srv, me = self.server, self.record
        assert me is not None and msg.relayed is not None
        other = _other_peer(info, me.peer_id)
        # Session ids never contain ":", so this marker cannot collide with a session.
        if not await srv.store.put_session(f"turn:{msg.session}", {"by": me.peer_id}):
            raise Refusal(ErrorCode.SESSION_EXISTS, "a relay was already offered for this session",
                          session=msg.session, fatal=False)
        grant = RelayGrant(session=msg.session, token=b"", relay=msg.relayed, via="turn")
        rec = await srv.store.get_online(other)
        if rec is None or not await srv.push(rec, "grant", grant):
            raise Refusal(ErrorCode.UNKNOWN_TARGET, "the other peer of this session is offline",
                          session=msg.session, fatal=False)
        srv.metrics["turn_offers"] += 1
        log.info("relay %s: %s offers TURN address %s:%d", msg.session, self.name, *msg.relayed)
        self.send(grant)
