"""The passive halves of punch steps: accepting the peer's connection on our punch port, and
a sweep follower keeping the connection its chooser marks (punch.py runs the steps)."""
from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time

from .address import Address, family_of
from .engine import PunchResult, PunchStats
from .engine._base import count_failure
from .errors import PunchTimeout

log = logging.getLogger(__name__)

MARK = b"\x01"             # a sweep's chooser sends this on the one connection it keeps


async def sleep_until(at: float) -> None:
    delay = at - time.time()
    if delay > 0:
        await asyncio.sleep(delay)


async def accept_from(ip: str, port: int, peer_ips: set[str], *, deadline: float) -> PunchResult:
    """Listen on (ip, port) and accept the first connection from one of ``peer_ips``."""
    stats = PunchStats(local_port=port)
    lsock = socket.socket(family_of(ip), socket.SOCK_STREAM)
    try:
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        lsock.bind((ip, port))
        lsock.listen(16)
        lsock.setblocking(False)
        loop = asyncio.get_running_loop()
        started = time.time()
        while True:
            left = deadline - time.time()
            try:
                if left > 0:
                    conn, addr = await asyncio.wait_for(loop.sock_accept(lsock), left)
                else:
                    # The window is over, but closing the listener would reset what the
                    # kernel completed meanwhile: a late loop (a loaded host) must not turn
                    # the peer's connection of the next step, which met this listener on the
                    # same port, into a reset. Take it instead.
                    conn, addr = lsock.accept()
            except TimeoutError:
                continue
            except (BlockingIOError, InterruptedError):
                break
            if addr[0] not in peer_ips:
                log.info("dropping a connection from %s:%d: not the peer", *addr)
                conn.close()
                continue
            conn.setblocking(True)
            stats.accepted = True
            stats.remote = (addr[0], addr[1])
            stats.time_to_established_ns = int((time.time() - started) * 1e9)
            return PunchResult(conn, stats)
    finally:
        lsock.close()
    raise PunchTimeout(f"no connection from the peer on port {port}", stats)


async def follow(ip: str, pairs: list[tuple[int, Address]], peer_ips: set[str], *,
                 start: float, deadline: float, syn_ttl: int | None = None) -> PunchResult:
    """The follower's half of a sweep: connect every pair and keep what the chooser marks.

    Each pair's socket stays open (a SYN_SENT socket completes by simultaneous open when the
    chooser's SYN meets it; a listener would not do: the NAT's conntrack only passes the
    SYN-ACK of the socket whose SYN opened the entry). Several may come up; the first to
    carry the chooser's MARK wins and every other one is closed.
    """
    loop = asyncio.get_running_loop()
    stats = PunchStats()
    socks: dict[int, socket.socket] = {}
    found: asyncio.Future[socket.socket] = loop.create_future()

    def on_readable(sock: socket.socket) -> None:
        fd = sock.fileno()
        try:
            data = sock.recv(1)
        except BlockingIOError:
            return
        except OSError as exc:
            count_failure(stats, exc.errno)
            data = b""
        loop.remove_reader(fd)
        if data == MARK and not found.done() and sock.getpeername()[0] in peer_ips:
            found.set_result(socks.pop(fd))
        else:
            socks.pop(fd).close()

    try:
        await sleep_until(start)
        stats.first_syn_at = time.time()
        stats.first_syn_delay_ns = int((stats.first_syn_at - start) * 1e9)
        for lport, remote in pairs:
            sock = _bound(ip, lport)
            sock.setblocking(False)
            ttl_opt = ((socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS)
                       if sock.family == socket.AF_INET6 else (socket.IPPROTO_IP, socket.IP_TTL))
            if syn_ttl is not None:
                default_ttl = sock.getsockopt(*ttl_opt)
                sock.setsockopt(*ttl_opt, syn_ttl)
            err = sock.connect_ex(remote)
            if syn_ttl is not None:
                sock.setsockopt(*ttl_opt, default_ttl)
            stats.attempts += 1
            stats.sockets_opened += 1
            if err not in (0, errno.EINPROGRESS):
                count_failure(stats, err)
                sock.close()
                continue
            stats.syns_sent += 1
            socks[sock.fileno()] = sock
            loop.add_reader(sock.fileno(), on_readable, sock)
        try:
            winner = await asyncio.wait_for(asyncio.shield(found), max(0.0, deadline - time.time()))
        except TimeoutError:
            raise PunchTimeout(f"follower: no marked connection over {len(pairs)} pairs "
                               f"({stats.syns_sent} SYNs, {stats.rsts_seen} RST, "
                               f"{stats.icmp_errors} ICMP)", stats) from None
    finally:
        for fd, sock in socks.items():
            loop.remove_reader(fd)
            sock.close()
        if not found.done():
            found.cancel()
    winner.setblocking(True)
    stats.local_port = winner.getsockname()[1]
    peer = winner.getpeername()
    stats.remote = (peer[0], peer[1])
    stats.time_to_established_ns = int((time.time() - start) * 1e9)
    return PunchResult(winner, stats)


def _bound(ip: str, port: int) -> socket.socket:
    sock = socket.socket(family_of(ip), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((ip, port))
    except BaseException:
        sock.close()
        raise
    return sock
