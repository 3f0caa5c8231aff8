"""asyncio STUN server, UDP and TCP, on up to two IPs x two ports (RFC 5780).

UDP CHANGE-REQUEST answers leave from the requested other address/port. Over TCP an answer
cannot change its source, so a "change" answer is delivered by *connecting back* from the
other address/port to the client's source address and port: whether that SYN gets through
the client's NAT is exactly TCP filtering. When the connect-back fails, the server says how
on the original connection: an error response 447 carrying CONNECT-BACK-RESULT (REFUSED =
the NAT answered with RST, TIMEOUT = dropped, UNREACHABLE = ICMP), which is how the client
learns the NAT's unsolicited-SYN behaviour without raw sockets. Listeners use SO_REUSEPORT
so the connect-back socket can bind the listening address.

Embedding (``pyholepunch serve``): construct, ``await start_udp()``, and hand accepted TCP
connections whose first byte is STUN to ``serve_tcp_stream(reader, writer)``. Standalone:
``async with StunServer(...)`` runs UDP and TCP listeners of its own.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import struct
from typing import Any

from ..errors import ProtocolError
from .codec import (
    Address,
    AttrType,
    ConnectBack,
    ErrorCode,
    StreamFramer,
    error_response,
)
from .responder import Layout, Reply, Responder

log = logging.getLogger(__name__)

DEFAULT_SOFTWARE = "pyholepunch"
_UNREACHABLE = {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EACCES, errno.EPERM}


class _UdpEndpoint(asyncio.DatagramProtocol):
    def __init__(self, server: StunServer, local: Address) -> None:
        self.server, self.local = server, local
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.server._on_datagram(data, self.local, (addr[0], addr[1]))

    def error_received(self, exc: Exception) -> None:
        log.debug("UDP %s: %s", self.local, exc)   # ICMP errors from earlier sends: ignore


class StunServer:
    """STUN Binding server. ``alt_ip``/``alt_port`` enable RFC 5780 (OTHER-ADDRESS,
    CHANGE-REQUEST); with ``alt_ip`` alone the alternate port is primary port + 1."""

    def __init__(self, primary: Address, alt_ip: str | None = None, alt_port: int | None = None, *,
                 software: str | None = DEFAULT_SOFTWARE, connect_back_timeout: float = 0.6,
                 idle_timeout: float = 30.0, max_connect_backs: int = 64,
                 max_tcp_connections: int = 1024, other_family: Address | None = None) -> None:
        host, port = primary
        if alt_ip is not None and _unspecified_ip(host):
            raise ValueError(f"an alternate IP ({alt_ip}) needs a specific primary address, not {host}: "
                             "CHANGE-REQUEST answers must leave from a known address")
        if alt_ip is not None and alt_port is None:
            alt_port = port + 1 if port else 0
        self._want = (host, alt_ip, port, alt_port)
        self.layout: Layout | None = None
        self.software = software
        self.other_family = other_family   # our address in the other IP family, if dual stack
        self.connect_back_timeout = connect_back_timeout
        self.idle_timeout = idle_timeout
        self._udp: dict[Address, _UdpEndpoint] = {}
        self._tcp: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._connect_backs = asyncio.Semaphore(max_connect_backs)
        self._max_tcp = max_tcp_connections
        self._responder: Responder | None = None
        self.stats = {"udp_in": 0, "udp_out": 0, "tcp_in": 0, "tcp_out": 0, "dropped": 0,
                      "connect_backs": 0, "errors": 0}

    # -- addresses ---------------------------------------------------------------------
    @property
    def primary(self) -> Address:
        return self._layout().address(0, 0)  # type: ignore[return-value]

    @property
    def other_address(self) -> Address | None:
        return self._layout().other(self.primary)

    @property
    def addresses(self) -> list[Address]:
        return self._layout().all()

    def set_other_family(self, address: Address | None) -> None:
        """Our address in the other IP family (OTHER-FAMILY-ADDRESS), once it is bound."""
        self.other_family = address
        if self._responder is not None:
            self._responder.other_family = address

    def _layout(self) -> Layout:
        if self.layout is None:
            raise RuntimeError("StunServer not started")
        return self.layout

    def _resolve(self, port: int, alt_port: int | None) -> None:
        host, alt_ip, _, _ = self._want
        self.layout = Layout((host, alt_ip), (port, alt_port))
        self._responder = Responder(self.layout, software=self.software,
                                    other_family=self.other_family)

    # -- UDP -----------------------------------------------------------------------------
    async def start_udp(self) -> None:
        loop = asyncio.get_running_loop()
        if self.layout is None:
            await self._bind_fresh()
        for addr in self._layout().all():
            if addr in self._udp:
                continue
            _, proto = await loop.create_datagram_endpoint(
                lambda a=addr: _UdpEndpoint(self, a), local_addr=addr)  # type: ignore[misc]
            self._udp[addr] = proto
        log.info("STUN/UDP on %s", ", ".join(f"{h}:{p}" for h, p in self._udp))

    def _on_datagram(self, data: bytes, local: Address, remote: Address) -> None:
        self.stats["udp_in"] += 1
        try:
            reply = self._responder.answer(data, local, remote)  # type: ignore[union-attr]
        except Exception:   # never let one datagram stop the server
            self.stats["errors"] += 1
            log.exception("STUN/UDP: failed to answer %d bytes from %s", len(data), remote)
            return
        if reply is None:
            self.stats["dropped"] += 1
            return
        endpoint = self._udp.get(reply.source)
        if endpoint is None or endpoint.transport is None:
            self.stats["dropped"] += 1
            return
        endpoint.transport.sendto(reply.data, remote)
        self.stats["udp_out"] += 1

    async def _bind_fresh(self) -> None:
        """Pick port numbers: the same numbers must be free on both IPs and for TCP and
        UDP, so with port 0 try a few ephemeral candidates."""
        host, alt_ip, port, alt_port = self._want
        for _ in range(20):
            socks: list[socket.socket] = []
            try:
                p = _probe_bind(socks, host, port)
                q = None
                if alt_port is not None:
                    q = _probe_bind(socks, host, alt_port)
                if alt_ip is not None:
                    _probe_bind(socks, alt_ip, p)
                    if q is not None:
                        _probe_bind(socks, alt_ip, q)
                self._resolve(p, q)
                return
            except OSError:
                if port and alt_port != 0:
                    raise   # fixed ports: retrying cannot help
            finally:
                for s in socks:
                    s.close()
        raise OSError(errno.EADDRINUSE, "no common free port pair for the STUN server")

    # -- TCP -----------------------------------------------------------------------------
    async def start_tcp(self) -> None:
        if self.layout is None:
            await self._bind_fresh()
        for host, port in self._layout().all():
            srv = await asyncio.start_server(
                self.serve_tcp_stream, host, port, reuse_address=True, reuse_port=True)
            self._tcp.append(srv)
        log.info("STUN/TCP on %s", ", ".join(f"{h}:{p}" for h, p in self._layout().all()))

    async def serve_tcp_stream(self, reader: asyncio.StreamReader,
                               writer: asyncio.StreamWriter, initial: bytes = b"") -> None:
        """Serve one accepted TCP connection until EOF, idle timeout or a framing error.
        ``initial``: bytes the caller already read (e.g. for demultiplexing)."""
        if len(self._writers) >= self._max_tcp:
            self.stats["dropped"] += 1
            writer.close()
            return
        self._writers.add(writer)
        try:
            local = _addr(writer.get_extra_info("sockname"))
            remote = _addr(writer.get_extra_info("peername"))
            if self.layout is None or local is None or remote is None:
                return
            framer = StreamFramer()
            data = initial
            while True:
                if data:
                    for frame in framer.feed(data):
                        self.stats["tcp_in"] += 1
                        await self._answer_tcp(frame, local, remote, writer)
                data = await asyncio.wait_for(reader.read(4096), self.idle_timeout)
                if not data:
                    break
        except ProtocolError as exc:
            log.debug("STUN/TCP %s: closing on %s", writer.get_extra_info("peername"), exc)
        except (TimeoutError, ConnectionError, OSError) as exc:
            log.debug("STUN/TCP %s: %r", writer.get_extra_info("peername"), exc)
        except Exception:
            self.stats["errors"] += 1
            log.exception("STUN/TCP: connection handler failed")
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer_tcp(self, frame: bytes, local: Address, remote: Address,
                          writer: asyncio.StreamWriter) -> None:
        reply = self._responder.answer(frame, local, remote)  # type: ignore[union-attr]
        if reply is None:
            self.stats["dropped"] += 1
            return
        if not reply.changed:
            writer.write(reply.data)
            await writer.drain()
            self.stats["tcp_out"] += 1
            return
        task = asyncio.create_task(self._connect_back(reply, remote, writer))
        self._tasks.add(task)
        task.add_done_callback(self._connect_back_done)

    def _connect_back_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.stats["errors"] += 1
            log.error("connect-back failed", exc_info=task.exception())

    async def _connect_back(self, reply: Reply, remote: Address, writer: asyncio.StreamWriter) -> None:
        """Deliver a change answer by connecting from ``reply.source`` to the client.

        A lost SYN must not read as "filtered", and the kernel would only retransmit after
        1 s: so the SYN is re-sent by fresh attempts spaced by a few RTTs (the RTT the
        kernel measured on the client's connection), within ``connect_back_timeout``
        stretched to at least 4 RTTs."""
        self.stats["connect_backs"] += 1
        rtt = _tcp_rtt(writer) or 0.05
        spacing = max(0.2, 3 * rtt)
        budget = max(self.connect_back_timeout, 4 * rtt)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        result = ConnectBack.TIMEOUT
        async with self._connect_backs:
            while result is ConnectBack.TIMEOUT and loop.time() < deadline:
                left = deadline - loop.time()
                result = await self._connect_once(reply, remote, left if left < 2 * spacing else spacing)
        log.debug("connect-back %s -> %s: %s", reply.source, remote, result.name)
        if result is ConnectBack.CONNECTED or reply.request is None or writer.is_closing():
            return
        resp = error_response(reply.request, ErrorCode.CONNECTION_TIMEOUT_OR_FAILURE,
                              f"connect-back {result.name.lower()}", software=self.software)
        resp.add(AttrType.CONNECT_BACK_RESULT, result)
        with contextlib.suppress(ConnectionError, OSError):
            writer.write(resp.encode(fingerprint=True))
            await writer.drain()

    async def _connect_once(self, reply: Reply, remote: Address, timeout: float) -> ConnectBack:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET6 if ":" in remote[0] else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.setblocking(False)
            sock.bind(reply.source)
            await asyncio.wait_for(loop.sock_connect(sock, remote), timeout)
            await asyncio.wait_for(loop.sock_sendall(sock, reply.data), max(timeout, 1.0))
            self.stats["tcp_out"] += 1
            # let the client read before our FIN; it normally closes first
            with contextlib.suppress(TimeoutError, OSError):
                await asyncio.wait_for(loop.sock_recv(sock, 1), 1.0)
            return ConnectBack.CONNECTED
        except TimeoutError:
            return ConnectBack.TIMEOUT   # closing a SYN_SENT socket sends nothing: retry is clean
        except ConnectionRefusedError:
            return ConnectBack.REFUSED
        except OSError as exc:
            log.debug("connect-back %s -> %s: %r", reply.source, remote, exc)
            return ConnectBack.UNREACHABLE if exc.errno in _UNREACHABLE else ConnectBack.FAILED
        finally:
            sock.close()

    # -- lifecycle -------------------------------------------------------------------------
    async def close(self) -> None:
        for ep in self._udp.values():
            if ep.transport is not None:
                ep.transport.close()
        self._udp.clear()
        for srv in self._tcp:
            srv.close()
        for w in list(self._writers):
            w.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for srv in self._tcp:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(srv.wait_closed(), 2.0)
        self._tcp.clear()

    async def __aenter__(self) -> StunServer:
        try:
            await self.start_udp()
            await self.start_tcp()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _probe_bind(socks: list[socket.socket], host: str, port: int) -> int:
    """Bind UDP and TCP on (host, port); the port number, the same for both."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    udp = socket.socket(family, socket.SOCK_DGRAM)
    socks.append(udp)
    udp.bind((host, port))
    port = int(udp.getsockname()[1])
    tcp = socket.socket(family, socket.SOCK_STREAM)
    socks.append(tcp)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind((host, port))
    return port


def _unspecified_ip(host: str) -> bool:
    return host in ("", "0.0.0.0", "::")


def _tcp_rtt(writer: asyncio.StreamWriter) -> float | None:
    """The kernel's smoothed RTT of a TCP connection (Linux TCP_INFO), in seconds."""
    sock = writer.get_extra_info("socket")
    if sock is None or not hasattr(socket, "TCP_INFO"):
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        rtt_us = struct.unpack_from("=I", info, 68)[0]   # tcpi_rtt: after 8 u8 and 15 u32
    except (OSError, struct.error):
        return None
    return rtt_us / 1e6 if rtt_us else None


def _addr(value: Any) -> Address | None:
    if isinstance(value, tuple) and len(value) >= 2:
        return (str(value[0]), int(value[1]))
    return None

