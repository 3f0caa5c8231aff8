"""Connection: an established, authenticated peer-to-peer byte stream (docs/python-api.md).

What ``peer.connect()`` / ``peer.accept()`` return: asyncio streams (``reader``/``writer``)
over TLS 1.3 pinned to ``peer_id`` (see security.py), plus how the connection was made
(``route``, ``report``). The streams stay available for code that wants them; ``send`` /
``recv`` are the short way.

NATs forget idle TCP mappings (home routers after minutes, some carriers sooner), so the
underlying socket gets TCP keepalive with an idle time well below those timeouts (20 s by
default; :meth:`Connection.keepalive` tunes it). Keepalive probes are empty TCP segments:
they refresh the NAT's conntrack entry without touching the TLS stream.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from .errors import StateError
from .report import ConnectionReport, Route, parse_route

log = logging.getLogger(__name__)


async def both_ways(there: Coroutine[Any, Any, None], back: Coroutine[Any, Any, None]) -> None:
    """Run the two directions of a copy between a connection and another stream until either
    ends (EOF or an error), then stop the other: one half-closed side ends the bridge."""
    tasks = [asyncio.ensure_future(there), asyncio.ensure_future(back)]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass(frozen=True)
class KeepAlive:
    """TCP keepalive settings. ``idle``: seconds of silence before the first probe;
    ``interval`` between probes; ``count`` unanswered probes before the connection is dead;
    ``user_timeout``: seconds unacknowledged data may wait before the connection is dropped
    (TCP_USER_TIMEOUT; None leaves the system default)."""

    idle: float = 20.0
    interval: float = 5.0
    count: int = 3
    user_timeout: float | None = None

    def __post_init__(self) -> None:
        for name in ("idle", "interval"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 1 <= value <= 32767:
                raise ValueError(f"keepalive {name} must be 1..32767 seconds, got {value!r}")
        if isinstance(self.count, bool) or not isinstance(self.count, int) or not 1 <= self.count <= 127:
            raise ValueError(f"keepalive count must be an integer 1..127, got {self.count!r}")
        ut = self.user_timeout
        if ut is not None and (isinstance(ut, bool) or not isinstance(ut, (int, float))
                               or not 0 < ut <= 86400):
            raise ValueError(f"user_timeout must be 0..86400 seconds, got {ut!r}")

    def apply(self, sock: Any) -> None:
        """Set the options on ``sock`` (a socket or asyncio's TransportSocket)."""
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        # Linux names; macOS has TCP_KEEPALIVE for the idle time and the same two others.
        idle_opt = getattr(socket, "TCP_KEEPIDLE", None) or getattr(socket, "TCP_KEEPALIVE", None)
        if idle_opt is not None:
            sock.setsockopt(socket.IPPROTO_TCP, idle_opt, max(1, round(self.idle)))
        if hasattr(socket, "TCP_KEEPINTVL"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, round(self.interval)))
        if hasattr(socket, "TCP_KEEPCNT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, self.count)
        if self.user_timeout is not None and hasattr(socket, "TCP_USER_TIMEOUT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                            max(1, round(self.user_timeout * 1000)))


DEFAULT_KEEPALIVE = KeepAlive()


class Connection:
    """An established connection to one peer. Use as ``async with conn: ...``."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        peer_id: str,
        route: Route | str,
        report: ConnectionReport,
        peer_name: str = "",
        keepalive: KeepAlive | None = DEFAULT_KEEPALIVE,
        upgrader: Callable[[], Awaitable[Connection]] | None = None,
    ) -> None:
        self.reader = reader
        self.upgrader = upgrader        # a relayed initiator's: see upgrade()
        self.writer = writer
        self.peer_id = peer_id
        self.peer_name = peer_name
        self.route = parse_route(route)   # a StrEnum: compares equal to "direct" / "relay"
        self.report = report
        self._closed = False
        self._keepalive: KeepAlive | None = None
        if keepalive is not None:
            try:
                self._apply_keepalive(keepalive)
            except (ValueError, OSError) as exc:    # never lose a live connection over it
                log.warning("TCP keepalive not set on the connection to %s: %s", peer_id, exc)

    # --- data ------------------------------------------------------------------------------

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        """Write all of ``data`` and wait until the transport has room again."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"send() takes bytes, got {type(data).__name__}")
        if self._closed or self.writer.is_closing():
            raise ConnectionResetError(f"connection to peer {self.peer_id} is closed")
        try:
            self.writer.write(data)
            await self.writer.drain()
        except ssl.SSLError as exc:
            raise ConnectionResetError(f"TLS failure on the connection to peer {self.peer_id}: "
                                       f"{exc.reason or exc}") from None

    async def recv(self, n: int = 65536) -> bytes:
        """Up to ``n`` bytes as soon as any arrive; ``b""`` once the peer has closed."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"recv size must be a positive integer, got {n!r}")
        try:
            return await self.reader.read(n)
        except ssl.SSLError as exc:
            raise ConnectionResetError(f"TLS failure on the connection to peer {self.peer_id}: "
                                       f"{exc.reason or exc}") from None

    receive = recv                       # seed-style name (docs/python-api.md)

    async def recv_exactly(self, n: int) -> bytes:
        """Exactly ``n`` bytes; asyncio.IncompleteReadError if the peer closes first."""
        try:
            return await self.reader.readexactly(n)
        except ssl.SSLError as exc:
            raise ConnectionResetError(f"TLS failure on the connection to peer {self.peer_id}: "
                                       f"{exc.reason or exc}") from None

    # --- moving off the relay ----------------------------------------------------------------

    @property
    def direct_seen(self) -> bool:
        """A direct path came up while this relayed connection carried the data (the report's
        ``direct_after_relay_s``): upgrade() will likely succeed."""
        return self.report.direct_after_relay_s is not None

    async def upgrade(self) -> Connection:
        """A new, direct connection to the same peer (relayed connections of ``connect()``).

        It is a new session with the direct step kinds only (PunchError when no direct path
        comes up, StrategyError when the pair's plan has no direct step), authenticated like
        any other; the other peer gets it from ``accept()``.
        This connection stays open: moving the application's bytes is the caller's, at a
        point both ends agree on (e.g. before any data flowed, or at a message boundary of
        its own protocol), then it closes this one. A transparent mid-stream move (libp2p's
        DCUtR) would need a cut-over handshake in the wire protocol, which pyholepunch does not
        have.
        """
        if self.route is Route.DIRECT:
            raise StateError(f"the connection to {self.peer_name or self.peer_id} is direct already")
        if self.upgrader is None:
            raise StateError("only the connecting side of a relayed connection can upgrade it")
        return await self.upgrader()

    # --- lifetime --------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    async def close(self, timeout: float = 5.0) -> None:
        """Close (TLS close_notify, then TCP FIN); idempotent, never hangs past ``timeout``."""
        if self._closed:
            return
        self._closed = True
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), timeout)
        except (TimeoutError, ConnectionError, ssl.SSLError, OSError) as exc:
            log.debug("closing the connection to %s: %r", self.peer_id, exc)
            self.writer.transport.abort()

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    # --- socket details --------------------------------------------------------------------

    def keepalive(self, idle: float = DEFAULT_KEEPALIVE.idle,
                  interval: float = DEFAULT_KEEPALIVE.interval,
                  count: int = DEFAULT_KEEPALIVE.count,
                  user_timeout: float | None = None) -> KeepAlive:
        """Set TCP keepalive on the underlying socket; returns what was applied."""
        return self._apply_keepalive(KeepAlive(idle, interval, count, user_timeout))

    @property
    def keepalive_settings(self) -> KeepAlive | None:
        return self._keepalive

    def _apply_keepalive(self, settings: KeepAlive) -> KeepAlive:
        sock = self.writer.get_extra_info("socket")
        if sock is None:
            raise ValueError("this connection has no socket to set keepalive on")
        if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
            log.debug("keepalive skipped: not a TCP socket (%s)", sock.family)
            return settings
        settings.apply(sock)
        self._keepalive = settings
        return settings

    @property
    def local_address(self) -> tuple[str, int] | None:
        addr = self.writer.get_extra_info("sockname")
        return (addr[0], addr[1]) if isinstance(addr, tuple) else None

    @property
    def remote_address(self) -> tuple[str, int] | None:
        """The TCP peer: the other peer when direct, the relay server when relayed."""
        addr = self.writer.get_extra_info("peername")
        return (addr[0], addr[1]) if isinstance(addr, tuple) else None

    @property
    def encrypted(self) -> bool:
        return self.writer.get_extra_info("ssl_object") is not None

    def __repr__(self) -> str:
        name = f" {self.peer_name!r}" if self.peer_name else ""
        state = "closed" if self._closed else "open"
        return f"<Connection{name} peer_id={self.peer_id} route={self.route} {state}>"


__all__ = ["DEFAULT_KEEPALIVE", "Connection", "KeepAlive"]
