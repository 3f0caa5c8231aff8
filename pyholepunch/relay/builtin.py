"""The built-in relay: two peers introduced by the server, spliced together by the engine.

The wire protocol and the client are in ``builtin_wire``. Tokens are issued in pairs per
session (one per side), are single-use and expire after ``token_ttl``; the hub pairs a
connection only with the other token of the same session, so nobody can splice themselves
onto a connection the server did not introduce. A hub given a ``secret`` also takes tokens
the two sides minted themselves (``minted``: ``Punch`` without a rendezvous server), held
to the same rules — single use per session side, expiring, paired only with the other side
of their session — and counted against quotas per source address and in all.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import socket
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..engine import Engine, RelayStats
from ..engine import get as get_engine
from ..errors import QuotaError
from . import builtin_wire as wire
from ._sockio import either_readable, recv_exactly, shutdown
from ._tap import Tap, tap_pump
from .builtin_wire import MAGIC, OK, TOKEN_LEN, open_builtin_relay
from .minted import MINT_MAGIC, MINTED_LEN, parse_minted, secret_bytes, verify

log = logging.getLogger(__name__)
__all__ = ["MAGIC", "OK", "TOKEN_LEN", "RelayHub", "RelayMetrics", "RelayServer", "open_builtin_relay"]


@dataclass(slots=True)
class _Token:
    session_id: str
    side: int               # 0 or 1
    expires_at: float
    used: bool = False


@dataclass(slots=True)
class _Session:
    waiting: asyncio.Future[tuple[socket.socket, asyncio.Future[RelayStats]]] | None = None
    expires_at: float = 0.0
    owners: tuple[str, ...] = ()    # quota keys this session counts against until it ends
    pumping: bool = False
    tokens: tuple[bytes, ...] = ()


@dataclass
class RelayMetrics:
    """Counters for the server's metrics endpoint."""

    active_relays: int = 0
    relays_total: int = 0
    bytes_relayed: int = 0
    refused: dict[str, int] = field(default_factory=dict)   # wire.LABELS word -> count
    unpaired: int = 0                                       # first side waited in vain
    ended: dict[str, int] = field(default_factory=dict)     # pump end reason -> count

    def as_dict(self) -> dict[str, object]:
        return {"active_relays": self.active_relays, "relays_total": self.relays_total,
                "bytes_relayed": self.bytes_relayed, "refused": dict(self.refused),
                "unpaired": self.unpaired, "ended": dict(self.ended)}


class RelayHub:
    """Pairs the two token holders of a session and pumps bytes between them.

    ``handshake_timeout`` bounds reading the preamble; ``pair_timeout`` bounds how long the
    first side waits for the second (at most the token's remaining life plus ``pair_timeout``).
    ``tap`` copies every relayed chunk to a callback through an in-process pump (slow; for
    tests proving the relay sees only ciphertext); without it the engine's ``relay_pump``
    runs in a worker thread.
    """

    def __init__(self, *, engine: Engine | None = None, token_ttl: float = 30.0,
                 max_bytes: int = 0, idle_timeout: float = 300.0,
                 clock: Callable[[], float] = time.monotonic, pair_timeout: float = 30.0,
                 handshake_timeout: float = 2.0, max_relays: int = 256,
                 first_byte_timeout: float = 10.0, tap: Tap | None = None,
                 secret: str | bytes | None = None, minted_max_ttl: float = 300.0,
                 minted_per_source: int = 16, max_minted: int = 1024,
                 wall: Callable[[], float] = time.time) -> None:
        if min(token_ttl, idle_timeout, pair_timeout, handshake_timeout, max_relays,
               first_byte_timeout, minted_max_ttl, minted_per_source, max_minted) <= 0 \
                or max_bytes < 0:
            raise ValueError("token_ttl, idle_timeout, pair_timeout, handshake_timeout, "
                             "first_byte_timeout, max_relays and the minted_ limits must be "
                             "> 0, max_bytes >= 0")
        # Minted tokens (``secret``): their expiry is wall-clock time (``wall``), at most
        # ``minted_max_ttl`` ahead; live minted sessions are bounded per source address and
        # in all (the quota keys "source:IP" and "minted").
        self._secret = secret_bytes(secret) if secret is not None else None
        self.minted_max_ttl = float(minted_max_ttl)
        self.minted_limits = {"per_source": int(minted_per_source), "all": int(max_minted)}
        self._wall = wall
        # A paired relay in which neither side sends within first_byte_timeout ends: an idle
        # pair must not hold a slot for the whole idle_timeout.
        self.first_byte_timeout = float(first_byte_timeout)
        self._owned: Counter[str] = Counter()     # quota key -> live sessions
        self._engine = engine
        self.token_ttl = float(token_ttl)
        self.max_bytes = int(max_bytes)
        self.idle_timeout = float(idle_timeout)
        self.pair_timeout = float(pair_timeout)
        self.handshake_timeout = float(handshake_timeout)
        self._clock = clock
        self._tap = tap
        self._tokens: dict[bytes, _Token] = {}
        self._sessions: dict[str, _Session] = {}
        self._socks: set[socket.socket] = set()     # every socket we own right now
        self._pumps: set[asyncio.Future[RelayStats]] = set()
        # One pump thread per relay, never queued: the loop's default executor has only a
        # handful of workers, and a queued relay would silently stall.
        self.max_relays = int(max_relays)
        self._executor = ThreadPoolExecutor(max_workers=self.max_relays,
                                            thread_name_prefix="hp-relay")
        self._closing = False
        self.metrics = RelayMetrics()

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = get_engine()
        return self._engine

    # --- tokens ---------------------------------------------------------------------------

    def issue(self, session_id: str,
              quotas: Sequence[tuple[str, int]] = ()) -> tuple[bytes, bytes]:
        """Two fresh single-use tokens for ``session_id``: one per side, expiring together.

        ``quotas``: (key, limit) pairs, e.g. the asking peer and its address; QuotaError
        when a key already holds ``limit`` live sessions (issued, not yet ended or expired).
        """
        if not session_id:
            raise ValueError("session_id must be a non-empty string")
        if session_id in self._sessions:
            raise ValueError(f"relay session {session_id!r} already issued")
        self._purge()
        for key, limit in quotas:
            if self._owned[key] >= limit:
                raise QuotaError(f"{key.split(':', 1)[0]} holds {limit} relay sessions already")
        expires = self._clock() + self.token_ttl
        pair = (secrets.token_bytes(TOKEN_LEN), secrets.token_bytes(TOKEN_LEN))
        for side, tok in enumerate(pair):
            self._tokens[tok] = _Token(session_id, side, expires)
        owners = tuple(key for key, _ in quotas)
        self._owned.update(owners)
        self._sessions[session_id] = _Session(expires_at=expires, owners=owners, tokens=pair)
        return pair

    def release(self, session_id: str) -> bool:
        """The session's peers are done with it before it carried anything (they connected
        directly, or gave up): its quota is free at once and its tokens are refused, where
        they had counted until they expired (a relay prepared beside every punch, #19, or a
        cancelled connect, used up a peer's relay quota). A pumping relay is left alone."""
        session = self._sessions.get(session_id)
        if session is None or session.pumping:
            return False
        now = self._clock()
        session.expires_at = min(session.expires_at, now)
        for tok in session.tokens:
            if (entry := self._tokens.get(tok)) is not None:
                entry.expires_at = min(entry.expires_at, now)
        if session.waiting is not None and not session.waiting.done():
            session.waiting.cancel()        # the side waiting for its peer is refused now
        self._end_session(session)
        return True

    def _end_session(self, session: _Session) -> None:
        """The session no longer counts against its owners' quotas (idempotent)."""
        for key in session.owners:
            self._owned[key] -= 1
            if self._owned[key] <= 0:
                del self._owned[key]
        session.owners = ()

    def _purge(self) -> None:
        # Keep spent/expired tokens for one extra TTL so a late client hears "expired" or
        # "already used" rather than "unknown"; then forget them (memory stays bounded).
        now = self._clock()
        horizon = now - self.token_ttl
        for tok in [t for t, e in self._tokens.items() if e.expires_at < horizon]:
            del self._tokens[tok]
        for sid, e in list(self._sessions.items()):
            if e.expires_at < now and e.waiting is None and not e.pumping:
                self._end_session(e)       # never paired: its tokens are dead now
                if e.expires_at < horizon:
                    del self._sessions[sid]

    def _check_minted(self, body: bytes, source: str) -> tuple[int, _Token | None]:
        """A minted token (the preamble after its magic) from ``source``: admitted, opening
        or joining its session, or the status it is refused with."""
        if self._secret is None:
            return wire.ERR_NOT_MINTING, None
        token = parse_minted(body)
        if token is None:
            return wire.ERR_BAD_PREAMBLE, None
        wall = self._wall()
        why = verify(self._secret, token, now=wall, max_ttl=self.minted_max_ttl)
        if why is not None:
            return {"forged": wire.ERR_FORGED, "expired": wire.ERR_EXPIRED,
                    "too long": wire.ERR_TOO_LONG}[why], None
        # One connection per session side, ever (until the token is long dead): an
        # eavesdropped preamble replayed, or a second mint for the same side, is refused.
        used = b"M" + token.session + bytes([token.side])
        if used in self._tokens:
            return wire.ERR_REUSED, None
        self._purge()
        sid = "minted:" + token.session.hex()
        session = self._sessions.get(sid)
        if session is not None and session.expires_at <= self._clock():
            return wire.ERR_NO_PEER, None     # its other side came and left: nobody to pair
        key = f"source:{source}"
        keys = [k for k in ((key,) if session is not None else ("minted", key))
                if session is None or k not in session.owners]
        limits = {"minted": self.minted_limits["all"], key: self.minted_limits["per_source"]}
        if any(self._owned[k] >= limits[k] for k in keys):
            return wire.ERR_QUOTA, None
        expires = self._clock() + (token.expires - wall)
        if session is None:
            session = self._sessions[sid] = _Session(expires_at=expires)
        session.owners += tuple(keys)
        self._owned.update(keys)
        entry = self._tokens[used] = _Token(sid, token.side, expires, used=True)
        return OK, entry

    def _check(self, token: bytes) -> tuple[int, _Token | None]:
        entry = self._tokens.get(token)
        if entry is None:
            return wire.ERR_UNKNOWN, None
        if entry.used:
            return wire.ERR_REUSED, None
        if self._clock() > entry.expires_at:
            return wire.ERR_EXPIRED, None
        entry.used = True
        return OK, entry

    # --- connections ----------------------------------------------------------------------

    async def handle_connection(self, sock: socket.socket, preread: bytes = b"") -> None:
        """Serve one accepted connection whose first bytes are ``HPR1``; closes ``sock``.
        ``preread``: the preamble bytes a demultiplexer already read from it.

        Returns when the relay it joined has ended (or it was refused).
        """
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        self._socks.add(sock)
        owned = True
        try:
            if self._closing:
                await self._refuse(sock, wire.ERR_CLOSING)
                return
            preamble = await self._preamble(sock, preread)
            if preamble.startswith(MINT_MAGIC):
                status, entry = self._check_minted(preamble[len(MINT_MAGIC):], _source(sock))
            elif len(preamble) == wire.PREAMBLE_LEN and preamble.startswith(MAGIC):
                status, entry = self._check(preamble[len(MAGIC):])
            else:
                status, entry = wire.ERR_BAD_PREAMBLE, None
            if entry is None:
                await self._refuse(sock, status)
                return
            session = self._sessions.get(entry.session_id)
            if session is None:             # purged under us: treat as expired
                await self._refuse(sock, wire.ERR_EXPIRED)
                return
            if session.waiting is None:
                owned = False               # the second side's coroutine takes it over
                await self._wait_for_peer(sock, session, entry)
                return
            # Second side: hand our socket to the waiter and start the pump.
            waiter, session.waiting = session.waiting, None
            done: asyncio.Future[RelayStats] = loop.create_future()
            if waiter.done():               # the first side gave up a moment ago
                owned = True
                await self._refuse(sock, wire.ERR_NO_PEER)
                return
            waiter.set_result((sock, done))
            owned = False
            with contextlib.suppress(Exception):
                await asyncio.shield(done)
        finally:
            if owned:
                self._release(sock)

    async def _preamble(self, sock: socket.socket, preread: bytes) -> bytes:
        """The whole preamble (issued or minted token), ``preread`` first; b"" when it is
        not one or does not come within ``handshake_timeout``."""
        loop = asyncio.get_running_loop()
        preamble = preread[:MINTED_LEN]
        try:
            # Judge the magic first: a stray client is refused without waiting for more.
            if len(preamble) < len(MAGIC):
                preamble += await asyncio.wait_for(
                    recv_exactly(loop, sock, len(MAGIC) - len(preamble)), self.handshake_timeout)
            size = {MAGIC: wire.PREAMBLE_LEN, MINT_MAGIC: MINTED_LEN}.get(preamble[:len(MAGIC)])
            if size is None:
                return b""
            if len(preamble) < size:
                preamble += await asyncio.wait_for(
                    recv_exactly(loop, sock, size - len(preamble)), self.handshake_timeout)
            return preamble if len(preamble) == size else b""
        except (TimeoutError, ConnectionError, OSError):
            return b""

    async def _wait_for_peer(self, sock: socket.socket, session: _Session, entry: _Token) -> None:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[tuple[socket.socket, asyncio.Future[RelayStats]]] = \
            loop.create_future()
        session.waiting = waiter
        # An issued token's peer may come until its token expires; minted sides both join
        # when their relay step comes, so pair_timeout alone bounds a minted wait.
        budget = self.pair_timeout if entry.session_id.startswith("minted:") else \
            max(0.0, entry.expires_at - self._clock()) + self.pair_timeout
        # Watch the waiting socket too: a client that leaves (EOF) must not be paired, and
        # one that talks before the OK byte breaks the protocol.
        watch = asyncio.ensure_future(loop.sock_recv(sock, 1))
        paired = asyncio.ensure_future(asyncio.shield(waiter))
        pending: set[asyncio.Future[Any]] = {paired, watch}
        try:
            await asyncio.wait(pending, timeout=budget, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            self._abandon(session, waiter)
            self._release(sock)
            raise
        finally:
            for f in (paired, watch):
                f.cancel()
        early = None
        if watch.done() and not watch.cancelled():
            early = b"" if watch.exception() is not None else watch.result()
        if waiter.done() and not waiter.cancelled() and not early:
            other, done = waiter.result()
            a, b = (sock, other) if entry.side == 0 else (other, sock)
            await self._run_relay(entry.session_id, a, b, done)
            return
        self._abandon(session, waiter)
        if entry.session_id.startswith("minted:"):
            self.release(entry.session_id)     # its quota is free now; nobody can pair later
        if early == b"":
            log.info("relay session %s: side %d left before its peer came", entry.session_id,
                     entry.side)
            self.metrics.unpaired += 1
            self._release(sock)
            return
        status = wire.ERR_EARLY_DATA if early else wire.ERR_CLOSING if self._closing else wire.ERR_NO_PEER
        if status == wire.ERR_NO_PEER:
            self.metrics.unpaired += 1
            log.info("relay session %s: side %d waited %.1f s, no peer", entry.session_id,
                     entry.side, budget)
        try:
            await self._refuse(sock, status)
        finally:
            self._release(sock)

    def _abandon(self, session: _Session,
                 waiter: asyncio.Future[tuple[socket.socket, asyncio.Future[RelayStats]]]) -> None:
        """Give up waiting; if the second side slipped in meanwhile, close it as well."""
        if session.waiting is waiter:
            session.waiting = None
        if not waiter.done():
            waiter.cancel()
        elif not waiter.cancelled():
            other, done = waiter.result()
            if not done.done():
                done.set_result(RelayStats(reason="peer left"))
            self._release(other)

    async def _run_relay(self, session_id: str, a: socket.socket, b: socket.socket,
                         done: asyncio.Future[RelayStats]) -> None:
        loop = asyncio.get_running_loop()
        if self.metrics.active_relays >= self.max_relays:
            log.warning("relay session %s refused: %d relays active", session_id,
                        self.metrics.active_relays)
            try:
                await asyncio.gather(self._refuse(a, wire.ERR_FULL), self._refuse(b, wire.ERR_FULL))
            finally:
                self._release(a)
                self._release(b)
                if not done.done():
                    done.set_result(RelayStats(reason="full"))
            return
        self.metrics.active_relays += 1
        self.metrics.relays_total += 1
        stats = RelayStats(reason="error: not started")
        session = self._sessions.get(session_id)
        if session is not None:
            session.pumping = True
        try:
            ok = bytes([OK])
            await asyncio.gather(loop.sock_sendall(a, ok), loop.sock_sendall(b, ok))
            if not await either_readable(loop, a, b, self.first_byte_timeout):
                stats = RelayStats(reason="idle: no byte within first_byte_timeout")
                return
            log.info("relay session %s: paired, pumping", session_id)
            if self._tap is None:
                pump = loop.run_in_executor(self._executor, functools.partial(
                    self.engine.relay_pump, a.fileno(), b.fileno(),
                    idle_timeout=self.idle_timeout, max_bytes=self.max_bytes))
            else:
                pump = asyncio.ensure_future(tap_pump(a, b, self._tap, idle_timeout=self.idle_timeout,
                                                      max_bytes=self.max_bytes))
            self._pumps.add(pump)
            try:
                stats = await asyncio.shield(pump)
            except asyncio.CancelledError:
                # Unblock the worker thread before the fds are closed: never close an fd a
                # thread is still using (it could be reused by another socket).
                shutdown(a, b)
                stats = await pump
                raise
            finally:
                self._pumps.discard(pump)
        except OSError as exc:
            stats = RelayStats(reason=f"error: {exc}")
        finally:
            if session is not None:
                session.pumping = False
                self._end_session(session)
            self.metrics.active_relays -= 1
            self.metrics.bytes_relayed += stats.bytes_a_to_b + stats.bytes_b_to_a
            key = stats.reason.split(":", 1)[0]
            self.metrics.ended[key] = self.metrics.ended.get(key, 0) + 1
            log.info("relay session %s ended (%s): %d bytes a>b, %d bytes b>a", session_id,
                     stats.reason, stats.bytes_a_to_b, stats.bytes_b_to_a)
            self._release(a)
            self._release(b)
            if not done.done():
                done.set_result(stats)

    async def _refuse(self, sock: socket.socket, status: int) -> None:
        reason, label = wire.REASONS[status], wire.LABELS[status]
        self.metrics.refused[label] = self.metrics.refused.get(label, 0) + 1
        log.info("relay connection refused: %s", reason)
        msg = bytes([status, len(reason)]) + reason.encode("ascii")
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(loop.sock_sendall(sock, msg), 2.0)
            # Closing with unread input would send RST and could destroy the reason before
            # the client reads it: FIN first, then swallow a little input (bounded).
            sock.shutdown(socket.SHUT_WR)
            async with asyncio.timeout(0.5):
                for _ in range(16):
                    if not await loop.sock_recv(sock, 4096):
                        break

    def _release(self, sock: socket.socket) -> None:
        if sock in self._socks:
            self._socks.discard(sock)
            sock.close()

    async def close(self) -> None:
        """Refuse new connections, end every relay and close every socket the hub owns."""
        self._closing = True
        for session in self._sessions.values():
            if session.waiting is not None and not session.waiting.done():
                session.waiting.cancel()
        for s in list(self._socks):
            shutdown(s)
        pumps = list(self._pumps)
        if pumps:
            await asyncio.gather(*pumps, return_exceptions=True)
        await asyncio.sleep(0)      # let handle_connection coroutines run their finally
        for s in list(self._socks):
            self._release(s)
        self._tokens.clear()
        self._sessions.clear()
        self._executor.shutdown(wait=False)


def _source(sock: socket.socket) -> str:
    try:
        return str(sock.getpeername()[0])
    except OSError:
        return "?"


# The stand-alone listener lives in server.py; importable from here as it always was.
from .server import RelayServer  # noqa: E402
