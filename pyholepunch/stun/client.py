"""asyncio STUN clients: UDP with RFC 8489 retransmission, TCP with a single send.

``StunUdpClient`` owns one UDP socket and runs any number of concurrent transactions on it
(to different servers, with or without CHANGE-REQUEST); datagrams that are not answers to
our transactions (e.g. our own request coming back through a hairpinning NAT) go to
``incoming``. ``StunTcpConnection`` is one TCP connection from a chosen local port
(SO_REUSEADDR + SO_REUSEPORT, so several probes and a listener can share that port).
Timeouts and retry counts are arguments, never module globals.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..address import Address
from ..errors import ProtocolError, StateError, TransactionFailed, TransactionTimeout
from .codec import (
    AttrType,
    ChangeRequest,
    MessageClass,
    StreamFramer,
    StunMessage,
    binding_request,
)

log = logging.getLogger(__name__)
CONNECT_REARM = 0.25     # s of silence before a TCP connect sends a fresh SYN (then doubled)
SILENCE_REARM_MIN = 0.15   # s: a fresh SYN after this much silence at the least
SILENCE_REARM_DEFAULT = 0.3   # s: without an RTT estimate
TCP_RTO_MIN_US = 45        # <linux/tcp.h>, Linux 6.15: a socket's own minimum RTO
QUICK_RTO_MIN_US = 50_000  # ~ a delayed ACK's 40 ms: fewer would re-send what is only late

# RFC 8489 §6.2.1 / §6.2.2 defaults.
DEFAULT_RTO = 0.5
DEFAULT_RC = 7
DEFAULT_RM = 16
DEFAULT_TI = 39.5


def retransmit_schedule(rto: float, rc: int, rm: int) -> tuple[list[float], float]:
    """Send offsets and the give-up offset of one UDP transaction (RFC 8489 §6.2.1):
    sends at 0, RTO, 3 RTO, 7 RTO, ... (Rc sends), give up Rm x RTO after the last."""
    if rto <= 0 or rc < 1 or rm < 1:
        raise ValueError(f"bad retransmission parameters rto={rto} rc={rc} rm={rm}")
    sends = [rto * ((1 << i) - 1) for i in range(rc)]
    return sends, sends[-1] + rm * rto


@dataclass(frozen=True, slots=True)
class BindingResult:
    """What one Binding transaction taught us."""

    mapped: Address                       # XOR-MAPPED-ADDRESS (or MAPPED-ADDRESS)
    local: Address                        # the local address we sent from
    source: Address                       # where the answer came from (IP/TCP source)
    response_origin: Address | None       # RESPONSE-ORIGIN (RFC 5780)
    other_address: Address | None         # OTHER-ADDRESS (RFC 5780)
    software: str | None
    rtt: float                            # first send to answer, seconds
    response: StunMessage

    @property
    def other_family(self) -> Address | None:
        """OTHER-FAMILY-ADDRESS: the server's primary address in the other IP family."""
        value: Address | None = self.response.get(AttrType.OTHER_FAMILY_ADDRESS)
        return value


def _result(resp: StunMessage, local: Address, source: Address, rtt: float) -> BindingResult:
    if resp.cls is MessageClass.ERROR:
        err = resp.error
        code = err.code if err else None
        raise TransactionFailed(f"STUN error {code} {err.reason if err else ''}".strip(),
                                response=resp, code=code)
    if resp.unknown_required:
        raise TransactionFailed(f"response has unknown attributes {list(resp.unknown_required)}",
                                response=resp)
    mapped = resp.mapped_address
    if mapped is None:
        raise TransactionFailed("response has no (XOR-)MAPPED-ADDRESS", response=resp)
    return BindingResult(mapped, local, source, resp.get(AttrType.RESPONSE_ORIGIN),
                         resp.get(AttrType.OTHER_ADDRESS), resp.get(AttrType.SOFTWARE), rtt, resp)


def format_address(addr: Address) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def new_transaction_id() -> bytes:
    return os.urandom(12)


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, owner: StunUdpClient) -> None:
        self.owner = owner

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.owner._on_datagram(data, (addr[0], addr[1]))

    def error_received(self, exc: Exception) -> None:
        log.debug("STUN/UDP client: %r", exc)   # ICMP: the retransmission timer decides


class StunUdpClient:
    """One UDP socket, many concurrent STUN transactions."""

    def __init__(self, *, rto: float = DEFAULT_RTO, rc: int = DEFAULT_RC, rm: int = DEFAULT_RM,
                 software: str | None = None) -> None:
        retransmit_schedule(rto, rc, rm)   # validate early
        self.rto, self.rc, self.rm, self.software = rto, rc, rm, software
        self._transport: asyncio.DatagramTransport | None = None
        self._pending: dict[bytes, asyncio.Future[tuple[StunMessage, Address, float]]] = {}
        self.incoming: asyncio.Queue[tuple[bytes, Address]] = asyncio.Queue(maxsize=256)
        self.local: Address = ("0.0.0.0", 0)
        self.on_unmatched: Callable[[bytes, Address], None] | None = None

    @classmethod
    async def open(cls, local: Address = ("0.0.0.0", 0), **kwargs: Any) -> StunUdpClient:
        self = cls(**kwargs)
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: _UdpProtocol(self), local_addr=local)
        self._transport = transport
        sockname = transport.get_extra_info("sockname")
        self.local = (sockname[0], sockname[1])
        return self

    def _on_datagram(self, data: bytes, addr: Address) -> None:
        try:
            msg = StunMessage.parse(data)
        except ProtocolError as exc:
            log.debug("STUN/UDP client: ignoring %d bytes from %s: %s", len(data), addr, exc)
            return
        fut = self._pending.get(msg.transaction_id)
        if fut is not None and msg.cls in (MessageClass.SUCCESS, MessageClass.ERROR):
            if not fut.done():
                fut.set_result((msg, addr, time.monotonic()))
            return
        if self.on_unmatched is not None:
            self.on_unmatched(data, addr)
        with contextlib.suppress(asyncio.QueueFull):
            self.incoming.put_nowait((data, addr))

    def send_raw(self, data: bytes, addr: Address) -> None:
        if self._transport is None:
            raise StateError("client is closed")
        self._transport.sendto(data, addr)

    async def request(self, server: Address, msg: StunMessage, *, rto: float | None = None,
                      rc: int | None = None, rm: int | None = None,
                      timeout: float | None = None) -> BindingResult:
        """Run one transaction; ``timeout`` caps the whole schedule (TransactionTimeout)."""
        sends, give_up = retransmit_schedule(rto or self.rto, rc or self.rc, rm or self.rm)
        if timeout is not None:
            give_up = min(give_up, timeout)
            sends = [s for s in sends if s < give_up]
        data = msg.encode(fingerprint=True)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[tuple[StunMessage, Address, float]] = loop.create_future()
        tid = msg.transaction_id
        self._pending[tid] = fut
        start = time.monotonic()
        try:
            for i, offset in enumerate(sends):
                if i:
                    await asyncio.wait([fut], timeout=max(0.0, start + offset - time.monotonic()))
                    if fut.done():
                        break
                self.send_raw(data, server)
            if not fut.done():
                await asyncio.wait([fut], timeout=max(0.0, start + give_up - time.monotonic()))
            if not fut.done():
                raise TransactionTimeout(f"no STUN answer from {format_address(server)} "
                                         f"after {len(sends)} sends in {give_up:.2f} s")
            resp, source, at = fut.result()
        finally:
            self._pending.pop(tid, None)
            if not fut.done():
                fut.cancel()
        return _result(resp, self.local, source, at - start)

    async def binding(self, server: Address, *, change: ChangeRequest | None = None,
                      **kwargs: Any) -> BindingResult:
        req = binding_request(new_transaction_id(), change=change, software=self.software)
        return await self.request(server, req, **kwargs)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        for fut in self._pending.values():
            if not fut.done():
                fut.cancel()

    async def __aenter__(self) -> StunUdpClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


def quick_rto(sock: socket.socket) -> None:
    """Retransmit a lost segment after the measured RTT and its variance, not 0.2 s more:
    Linux's RTO is SRTT + max(4 x RTTVAR, rto_min), rto_min 200 ms by default. Each lost
    request, answer or TLS flight of a short exchange cost that (#19: 10 % loss). Linux 6.15
    and later (TCP_RTO_MIN_US); a no-op elsewhere. A listening socket passes it on."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, TCP_RTO_MIN_US, QUICK_RTO_MIN_US)


def reusable_socket(local: Address, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A non-blocking socket bound to ``local`` with SO_REUSEADDR + SO_REUSEPORT (and, for
    TCP, TCP_NODELAY and ``quick_rto``)."""
    family = socket.AF_INET6 if ":" in local[0] else socket.AF_INET
    sock = socket.socket(family, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if kind == socket.SOCK_STREAM:
            # asyncio sets it only on sockets made with proto IPPROTO_TCP, not these: two
            # small writes in a row (a binding and its change requests, two pongs) waited
            # for the first one's ACK
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            quick_rto(sock)
        sock.setblocking(False)
        sock.bind(local)
    except BaseException:
        sock.close()
        raise
    return sock


def silence_rearm(rtt: float | None) -> float:
    """Silence after which a TCP connect (a simultaneous open too) sends a fresh SYN: ~3 x RTT
    (the kernel's own retransmission waits 1 s: a lost SYN on each side cost seconds)."""
    return max(SILENCE_REARM_MIN, 3 * rtt) if rtt else SILENCE_REARM_DEFAULT


async def connect_rearming(server: Address, *, local: Address | None = None, timeout: float = 5.0,
                           rearm: float = CONNECT_REARM, any_port: bool = False,
                           growth: float = 2.0,
                           new_socket: Callable[[], socket.socket] | None = None,
                           ) -> tuple[socket.socket, float, int]:
    """A connected non-blocking TCP socket to ``server``, the RTT its handshake took, and how
    many fresh SYNs were sent after silence (each may have cost a NAT mapping).

    A lost SYN (or SYN-ACK) costs the kernel's 1 s retransmission: after ``rearm`` s of silence
    (times ``growth`` each time, so a long path still gets through: 2 when the RTT is a guess;
    with a measured RTT behind ``rearm`` a gentler growth keeps the retries close, as the
    lost-SYN-ACK case below needs two of them) a fresh socket on the same local
    address sends a new SYN at once (#19: a lossy start must not cost seconds). Raises
    TransactionTimeout after ``timeout`` s; a refusal raises at once (ConnectionRefusedError).

    ``any_port`` (no ``local``; the signaling client): each new SYN leaves from a new port and
    the earlier attempts stay in flight, the first to connect wins. On one port a re-sent SYN
    after a lost SYN-ACK meets the server's half-open request, which it answers with an ACK
    our new socket resets: that case costs a second again (the STUN probes must keep their
    port: it is the mapping they measure). ``new_socket``: the same race, each attempt on
    a socket it returns (bound to a port of its choice).
    """
    if new_socket is not None:
        return await _connect_racing(server, timeout, rearm, new_socket)
    if any_port and local is None:
        return await _connect_racing(server, timeout, rearm,
                                     lambda: reusable_socket(any_address(server)))
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + timeout
    slice_s = rearm
    rearms = 0
    while True:
        sock = reusable_socket(local or any_address(server))
        local = local or sock.getsockname()[:2]    # the same port again: no new mapping
        t0 = time.monotonic()
        left = deadline - t0
        try:
            await asyncio.wait_for(loop.sock_connect(sock, server), min(slice_s, left))
            return sock, time.monotonic() - t0, rearms
        except TimeoutError:
            sock.close()
            if left <= slice_s:
                raise TransactionTimeout(f"TCP connect to {format_address(server)} timed out "
                                         f"after {timeout:.2f} s") from None
            slice_s *= growth
            rearms += 1
        except BaseException:
            sock.close()
            raise


async def _connect_racing(server: Address, timeout: float, rearm: float,
                          new_socket: Callable[[], socket.socket]
                          ) -> tuple[socket.socket, float, int]:
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + timeout
    attempts: dict[asyncio.Future[None], tuple[socket.socket, float]] = {}
    slice_s = rearm
    try:
        while True:
            sock = new_socket()
            t0 = time.monotonic()
            attempts[asyncio.ensure_future(loop.sock_connect(sock, server))] = (sock, t0)
            left = deadline - t0
            done, _ = await asyncio.wait(attempts, timeout=min(slice_s, left),
                                         return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                won, started = attempts.pop(fut)
                error = fut.exception()
                if error is not None:     # an answer (refused, unreachable): final
                    won.close()
                    raise error
                return won, time.monotonic() - started, len(attempts)
            if left <= slice_s:
                raise TransactionTimeout(f"TCP connect to {format_address(server)} timed out "
                                         f"after {timeout:.2f} s")
            slice_s *= 2
    finally:
        for fut, (sock, _) in attempts.items():
            fut.cancel()
            sock.close()


class StunTcpConnection:
    """One STUN-over-TCP connection; requests are sent once and wait up to ``ti``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 *, ti: float = DEFAULT_TI, software: str | None = None) -> None:
        self.reader, self.writer = reader, writer
        self.ti, self.software = ti, software
        self._framer = StreamFramer()
        self._queue: list[StunMessage] = []
        sock = writer.get_extra_info("sockname")
        peer = writer.get_extra_info("peername")
        self.local: Address = (sock[0], sock[1])
        self.remote: Address = (peer[0], peer[1])
        self.connect_time = 0.0     # from open() to connected, re-armed SYNs included
        self.handshake_rtt = 0.0    # the winning SYN's round trip: an RTT sample loss left alone
        self.rearms = 0             # fresh SYNs after silence: each may have cost a NAT mapping

    @classmethod
    async def open(cls, server: Address, *, local: Address | None = None,
                   connect_timeout: float = 5.0, rearm: float = CONNECT_REARM,
                   growth: float = 2.0, new_socket: Callable[[], socket.socket] | None = None,
                   **kwargs: Any) -> StunTcpConnection:
        """Connected (connect_rearming: ``new_socket`` races fresh ports, the losers'
        fresh SYNs count in ``rearms``)."""
        start = time.monotonic()
        sock, handshake, rearms = await connect_rearming(server, local=local, timeout=connect_timeout,
                                                         rearm=rearm, growth=growth,
                                                         new_socket=new_socket)
        reader, writer = await asyncio.open_connection(sock=sock)
        self = cls(reader, writer, **kwargs)
        self.connect_time = time.monotonic() - start
        self.handshake_rtt = handshake
        self.rearms = rearms
        return self

    async def read_message(self, timeout: float) -> StunMessage:
        """The next whole message (TimeoutError / ConnectionError / ProtocolError)."""
        deadline = time.monotonic() + timeout
        while not self._queue:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no STUN message")
            data = await asyncio.wait_for(self.reader.read(4096), remaining)
            if not data:
                raise ConnectionResetError(f"{format_address(self.remote)} closed the connection")
            self._queue += [StunMessage.parse(f) for f in self._framer.feed(data)]
        return self._queue.pop(0)

    def send(self, msg: StunMessage) -> None:
        self.writer.write(msg.encode(fingerprint=True))

    async def request(self, msg: StunMessage, *, timeout: float | None = None) -> BindingResult:
        wait = self.ti if timeout is None else timeout
        start = time.monotonic()
        self.send(msg)
        await self.writer.drain()
        deadline = start + wait
        while True:
            try:
                resp = await self.read_message(deadline - time.monotonic())
            except TimeoutError:
                raise TransactionTimeout(f"no STUN answer over TCP from {format_address(self.remote)} "
                                         f"in {wait:.2f} s") from None
            if resp.transaction_id == msg.transaction_id and resp.cls in (
                    MessageClass.SUCCESS, MessageClass.ERROR):
                return _result(resp, self.local, self.remote, time.monotonic() - start)

    async def binding(self, *, change: ChangeRequest | None = None,
                      timeout: float | None = None) -> BindingResult:
        req = binding_request(new_transaction_id(), change=change, software=self.software)
        return await self.request(req, timeout=timeout)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 1.0)

    async def __aenter__(self) -> StunTcpConnection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def any_address(server: Address) -> Address:
    """The wildcard local address of the server's family."""
    return ("::", 0) if ":" in server[0] else ("0.0.0.0", 0)


async def stun_binding(server: Address, *, transport: str = "udp", local: Address | None = None,
                       change: ChangeRequest | None = None, rto: float = DEFAULT_RTO,
                       rc: int = DEFAULT_RC, rm: int = DEFAULT_RM, ti: float = DEFAULT_TI,
                       software: str | None = None) -> BindingResult:
    """One Binding transaction over ``transport`` (udp | tcp): the simple public entry."""
    local = local or any_address(server)
    if transport == "udp":
        async with await StunUdpClient.open(local, rto=rto, rc=rc, rm=rm, software=software) as c:
            return await c.binding(server, change=change)
    if transport == "tcp":
        conn = await StunTcpConnection.open(server, local=local, connect_timeout=ti, ti=ti,
                                            software=software)
        async with conn:
            return await conn.binding(change=change)
    raise ValueError(f"transport must be 'udp' or 'tcp', got {transport!r}")
