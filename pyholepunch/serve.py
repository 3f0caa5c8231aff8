"""`pyholepunch serve`: rendezvous + STUN + built-in relay behind one address.

One TCP port (and, with ``--alt-ip``, the RFC 5780 set ip:port, alt:port, ip:port+1,
alt:port+1) accepts raw sockets and looks at the first bytes before deciding who gets them:

* ``0x16`` (a TLS handshake record)        -> signaling over TLS (``SignalServer.accept``)
* top two bits ``00`` (a STUN header)       -> ``StunServer.serve_tcp_stream(reader, writer)``
* ``b"HPR1"`` or ``b"HPM1"`` (minted token)  -> ``RelayHub.handle_connection(sock)``

STUN over UDP listens on the same port numbers. Metrics: Prometheus exposition on
``http://HOST:PORT/metrics`` with ``--metrics HOST:PORT`` (pyholepunch.metrics, extra
``[metrics]``): the one metrics interface of the command (``--metrics-port N`` is a
deprecated alias of ``--metrics 127.0.0.1:N``). ``Rendezvous(metrics_port=N)`` also serves
every internal counter, admission budgets included, as JSON on ``http://127.0.0.1:N/metrics``:
a debugging aid for programs and tests that run the server in-process, not a stable interface.
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import json
import logging
import socket
import struct
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from ._process import raise_fd_limit
from ._service import Service
from .address import Address, family_of, format_address
from .errors import HolePunchError
from .signal.admission import SourceBudget, source_key
from .signal.server import ServerConfig, SignalServer
from .signal.store import open_store
from .signal.tls import format_fingerprint, load_or_create_credentials
from .stun.client import quick_rto

log = logging.getLogger(__name__)
RELAY_MAGIC = b"HPR1"
RELAY_MAGICS = (RELAY_MAGIC, b"HPM1")     # an issued token; a minted one (relay/minted.py)
TRIM_INTERVAL, TRIM_AFTER = 1.0, 256
TLS_HANDSHAKE = 0x16


def _port_sets(listen: Address | Sequence[Address],
               alt_ip: str | Sequence[str] | None) -> list[tuple[Address, str | None]]:
    """(listen address, alternate IP) per family: at most one of each per family, and an
    alternate IP only for a family that has a listen address. ValueError names the problem."""
    listens: list[Address] = ([listen] if isinstance(listen, tuple) and isinstance(listen[0], str)
                              else list(listen))  # type: ignore[arg-type]
    alts = [] if alt_ip is None else [alt_ip] if isinstance(alt_ip, str) else list(alt_ip)
    if not listens:
        raise ValueError("serve needs a listen address")
    by_family: dict[int, tuple[Address, str | None]] = {}
    for addr in listens:
        host, port = addr[0], addr[1]
        fam = family_of(host)
        if fam in by_family:
            raise ValueError(f"one listen address per IP family: {format_address(by_family[fam][0])} "
                             f"and {format_address((host, port))}")
        by_family[fam] = ((host, port), None)
    for ip in alts:
        fam = family_of(ip)
        if fam not in by_family:
            raise ValueError(f"alternate IP {ip} has no listen address of its family")
        if by_family[fam][1] is not None:
            raise ValueError(f"one alternate IP per IP family: {by_family[fam][1]} and {ip}")
        by_family[fam] = (by_family[fam][0], ip)
    return [by_family[family_of(a[0])] for a in listens]


class _AllStun:
    """The STUN servers of every family, counted as one (for the metrics)."""

    def __init__(self, stuns: list[Any]) -> None:
        self.stuns = stuns

    @property
    def stats(self) -> dict[str, int]:
        return {k: sum(st.stats[k] for st in self.stuns) for k in self.stuns[0].stats}


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def _readable(sock: socket.socket) -> None:
    """Wait once until ``sock`` has a byte or EOF to read (one reader callback, no polling)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    loop.add_reader(sock.fileno(), _wake, fut)
    try:
        await fut
    finally:
        loop.remove_reader(sock.fileno())


def _malloc_trim() -> None:
    """Hand freed heap back to the OS (glibc only; elsewhere nothing to do). After a flood
    of TLS handshakes every object is freed, but glibc keeps the pages of thousands of
    OpenSSL allocations: measured after 2 x 4,000 abandoned handshakes, RSS 144 MB before
    one malloc_trim and 52 MB after (41 MB idle)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Rendezvous(Service):
    """The combined server application (usable in-process from tests and the lab)."""

    def __init__(self, listen: Address | Sequence[Address], *,
                 alt_ip: str | Sequence[str] | None = None, state_dir: str | None = None,
                 token: str | None = None, store: str | None = None, metrics_port: int | None = None,
                 metrics: Address | None = None, config: ServerConfig | None = None,
                 stun: bool = True, relay: bool = True,
                 demux_timeout: float = 1.5, max_pending: int = 4096,
                 max_pending_per_source: int = 32, max_stun_tcp: int = 1024,
                 max_relay_connections: int = 1024,
                 relay_options: dict[str, Any] | None = None) -> None:
        self.port_sets = _port_sets(listen, alt_ip)
        self.listen = self.port_sets[0][0]
        self.alt_ip = self.port_sets[0][1]
        self.state_dir = state_dir
        self.metrics_port = metrics_port
        # Admission on the shared port. ``demux_timeout`` is the first-byte deadline (and for
        # a relay preamble, the deadline for its magic). Each stage and protocol has its own
        # budget, in all and per source address (see signal/admission.py): connections still
        # waiting for a first byte, STUN-over-TCP streams, relay connections (waiting or
        # pumping); TLS connections go to the signaling server's unregistered budget.
        self.demux_timeout = demux_timeout
        per_source = min(max_pending_per_source, max_pending)
        self.budgets = {
            "pending": SourceBudget(max_pending, per_source),
            "stun": SourceBudget(max_stun_tcp, min(per_source, max_stun_tcp)),
            "relay": SourceBudget(max_relay_connections, min(per_source, max_relay_connections)),
        }
        cfg = config or ServerConfig()
        if token is not None:
            cfg.token = token
        self.relay_hub = self._make_relay(relay_options or {}) if relay else None
        self.signal = SignalServer(load_or_create_credentials(state_dir),
                                   open_store(store, state_dir, names=cfg.names),
                                   cfg, relay_hub=self.relay_hub)
        self._want_stun = stun
        self.stun: Any = None                    # the first family's STUN server
        self.stuns: list[Any] = []               # one per family
        self._listeners: list[socket.socket] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._metrics_server: asyncio.Server | None = None
        self.prometheus_address = metrics     # --metrics HOST:PORT (port 0: any; set on start)
        self.prometheus: Any = None           # metrics.ServerMetrics once started
        self.demux = {"tls": 0, "stun": 0, "relay": 0, "unknown": 0}
        self._ended = 0              # demuxed connections ended (TLS ones: SignalServer counts)
        self._ended_at_trim = 0
        self.address: Address = self.listen
        self.addresses: list[Address] = []       # the one address per family users type

    @staticmethod
    def _make_relay(options: dict[str, Any]) -> Any:
        """The built-in relay; ``options`` are RelayHub's (max_relays, first_byte_timeout...)."""
        try:
            from .relay.builtin import RelayHub
        except ImportError:
            log.warning("built-in relay unavailable")
            return None
        return RelayHub(**options)

    @property
    def fingerprint(self) -> str:
        return format_fingerprint(self.signal.server_id)

    def _bind(self, host: str, port: int) -> socket.socket:
        s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # The STUN server connects back *from* these addresses (RFC 5780 over TCP).
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        quick_rto(s)        # every accepted connection re-sends a lost answer in RTT time
        s.bind((host, port))
        s.listen(4096)
        s.setblocking(False)
        return s

    async def _open_port_set(self, listen: Address, alt_ip: str | None, port: int) -> None:
        """STUN first (it picks port numbers free for UDP and TCP on every address), then
        our TCP listeners on exactly its addresses; without STUN, just ip:port."""
        host = listen[0]
        stun = self._make_stun((host, port), alt_ip) if self._want_stun else None
        socks: list[socket.socket] = []
        try:
            if stun is not None:
                await stun.start_udp()
                addresses = list(stun.addresses)
            else:
                addresses = [(host, port)]
                if alt_ip:
                    log.warning("--alt-ip without the STUN server has no effect")
            for h, p in addresses:
                socks.append(self._bind(h, p))
        except BaseException:
            for s in socks:
                s.close()
            if stun is not None:
                await stun.close()
            raise
        self._listeners += socks
        if stun is not None:
            self.stuns.append(stun)
        self.addresses.append((host, socks[0].getsockname()[1]))

    def _make_stun(self, primary: Address, alt_ip: str | None) -> Any:
        try:
            from .stun.server import StunServer
        except ImportError:
            log.warning("STUN server unavailable")
            return None
        # alt port: port + 1 (StunServer's default), an ephemeral one when port is 0
        return StunServer(primary, alt_ip)

    async def start(self) -> None:
        raise_fd_limit()              # each peer holds a socket
        for listen, alt_ip in self.port_sets:
            port = listen[1]
            for attempt in range(20):  # port 0: the same number must be free for TCP and UDP
                try:
                    await self._open_port_set(listen, alt_ip, port)
                    break
                except OSError:
                    if port or attempt == 19:
                        raise
        self.address = self.addresses[0]
        self.stun = self.stuns[0] if self.stuns else None
        if len(self.stuns) == 2:       # dual stack: each family's STUN names the other's address
            for stun, other in zip(self.stuns, reversed(self.addresses), strict=True):
                stun.set_other_family(other)
        await self.signal.start()
        for lsock in self._listeners:
            self._spawn(self._accept_loop(lsock))
        self._spawn(self._trim_after_floods())
        if self.metrics_port is not None:
            self._metrics_server = await asyncio.start_server(
                self._serve_metrics, "127.0.0.1", self.metrics_port)
            self.metrics_port = self._metrics_server.sockets[0].getsockname()[1]
        if self.prometheus_address is not None:
            try:
                from .metrics import ServerMetrics
            except ImportError as exc:
                raise HolePunchError(f"--metrics needs prometheus_client ({exc}): "
                                     "pip install 'pyholepunch[metrics]'") from None
            self.prometheus = ServerMetrics(self.signal, relay_hub=self.relay_hub,
                                            stun=_AllStun(self.stuns) if self.stuns else None,
                                            demux=self.demux)
            host, port = self.prometheus_address
            self.prometheus_address = (host, self.prometheus.serve(host, port))

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self) -> None:
        for s in self._listeners:
            s.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._metrics_server is not None:
            self._metrics_server.close()
            await self._metrics_server.wait_closed()
        if self.prometheus is not None:
            await asyncio.to_thread(self.prometheus.close)
        await self.signal.close()
        for stun in self.stuns:
            await stun.close()
        if self.relay_hub is not None:
            await self.relay_hub.close()

    # -- demultiplexing ----------------------------------------------------------------------
    async def _accept_loop(self, lsock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        pending = self.budgets["pending"]
        while True:
            try:
                sock, peer = await loop.sock_accept(lsock)
            except OSError as exc:   # EMFILE and friends: back off instead of spinning
                log.warning("accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            source = source_key(str(peer[0]))
            if not pending.acquire(source):
                # Over its source's (or everyone's) budget: closed at once, costing nothing.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
                continue
            # Small frames (PUNCH, ERROR, a relay's first bytes) must leave at once: with Nagle
            # one held behind an unacknowledged one waits for the peer's delayed ACK (~40 ms),
            # and asyncio sets TCP_NODELAY only on sockets created with proto IPPROTO_TCP.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._spawn(self._demux(sock, source))

    async def _trim_after_floods(self) -> None:
        """At most every TRIM_INTERVAL s, and only once TRIM_AFTER connections have ended
        since the last time: return the memory a burst of connections freed (a few ms)."""
        while True:
            await asyncio.sleep(TRIM_INTERVAL)
            ended = self._ended + self.signal.ended_connections
            if ended - self._ended_at_trim >= TRIM_AFTER:
                self._ended_at_trim = ended
                _malloc_trim()

    def _stun_for(self, sock: socket.socket) -> Any:
        """The STUN server of the family ``sock`` arrived in (None without STUN)."""
        for stun in self.stuns:
            if family_of(stun.primary[0]) == sock.family:
                return stun
        return None

    async def _demux(self, sock: socket.socket, source: str) -> None:
        """Look at the first byte (within ``demux_timeout``), then hand the connection to its
        protocol under that protocol's budget. Nothing polls: one wait for readability, and
        a relay preamble is read (consumed), not re-peeked."""
        owned, pending, head = True, True, b""
        try:
            sock.setblocking(False)
            loop = asyncio.get_running_loop()
            try:
                async with asyncio.timeout(self.demux_timeout):
                    await _readable(sock)
                    head = sock.recv(1, socket.MSG_PEEK)
                    if head[:1] == RELAY_MAGIC[:1] and self.relay_hub is not None:
                        head = await loop.sock_recv(sock, len(RELAY_MAGIC))
                        while head and len(head) < len(RELAY_MAGIC) and \
                                any(m.startswith(head) for m in RELAY_MAGICS):
                            more = await loop.sock_recv(sock, len(RELAY_MAGIC) - len(head))
                            if not more:
                                break
                            head += more
            except (TimeoutError, OSError):
                self.demux["unknown"] += 1
                return
            self.budgets["pending"].release(source)
            pending = False
            if head and head[0] == TLS_HANDSHAKE:
                self.demux["tls"] += 1
                owned = False
                with contextlib.suppress(OSError, TimeoutError, ConnectionError):
                    await self.signal.accept(sock)
            elif head and head[0] >> 6 == 0 and (stun := self._stun_for(sock)) is not None:
                self.demux["stun"] += 1
                owned = False
                await self._serve_budgeted("stun", source, sock, functools.partial(
                    self._serve_stun, stun))
            elif head in RELAY_MAGICS and self.relay_hub is not None:
                self.demux["relay"] += 1
                owned = False
                await self._serve_budgeted("relay", source, sock, functools.partial(
                    self.relay_hub.handle_connection, preread=head))
            else:
                self.demux["unknown"] += 1
        except Exception:
            log.exception("demux failed")
        finally:
            if pending:
                self.budgets["pending"].release(source)
            if owned:
                sock.close()
            if owned or head[:1] != bytes([TLS_HANDSHAKE]):
                self._ended += 1

    async def _serve_budgeted(self, kind: str, source: str, sock: socket.socket,
                              serve: Callable[[socket.socket], Awaitable[None]]) -> None:
        budget = self.budgets[kind]
        if not budget.acquire(source):
            sock.close()
            return
        try:
            await serve(sock)
        finally:
            budget.release(source)

    @staticmethod
    async def _serve_stun(stun: Any, sock: socket.socket) -> None:
        reader, writer = await asyncio.open_connection(sock=sock)
        await stun.serve_tcp_stream(reader, writer)

    # -- metrics ---------------------------------------------------------------------------
    def metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {"signal": self.signal.snapshot(), "demux": dict(self.demux),
                               "admission": {k: b.as_dict() for k, b in self.budgets.items()},
                               "address": list(self.address),
                               "addresses": [list(a) for a in self.addresses],
                               "fingerprint": self.fingerprint}
        if self.relay_hub is not None:
            out["relay"] = self.relay_hub.metrics.as_dict()
        if self.stuns:
            out["stun"] = _AllStun(self.stuns).stats
        return out

    async def _serve_metrics(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5.0)
            path = request.split(b" ")[1] if request.count(b" ") >= 2 else b""
            if path in (b"/", b"/metrics"):
                body, status = json.dumps(self.metrics()).encode(), b"200 OK"
            else:
                body, status = b'{"error": "not found"}', b"404 Not Found"
            writer.write(b"HTTP/1.0 " + status + b"\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            await writer.drain()
        except (OSError, TimeoutError, IndexError):
            pass
        finally:
            writer.close()
