"""Socket plumbing shared by the pure engine's simultaneous open and sweep."""
from __future__ import annotations

import errno
import ipaddress
import socket
import struct
import time

from ..address import Address, sockaddr
from ._base import PunchStats

IN_PROGRESS = frozenset({0, errno.EINPROGRESS, errno.EALREADY})
FD_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


def reuse_socket(ip: str, port: int, *, defer_port: bool = False) -> socket.socket:
    """A non-blocking TCP socket with SO_REUSEADDR + SO_REUSEPORT, bound to ``(ip, port)``.

    Port 0 on the wildcard address is left unbound (connect picks the port); with
    ``defer_port`` a concrete ip with port 0 uses IP_BIND_ADDRESS_NO_PORT so that thousands
    of sweep sockets share ephemeral ports by 4-tuple instead of exhausting them at bind().
    The family is ``ip``'s; an IPv6 socket is IPV6_V6ONLY, so it never takes IPv4 traffic.
    """
    v6 = ":" in ip
    sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if v6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setblocking(False)
        if port == 0 and defer_port:
            if ip in ("0.0.0.0", "::"):
                return sock
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind(sockaddr((ip, port)))
    except BaseException:
        sock.close()
        raise
    return sock


def start_connect(sock: socket.socket, remote: Address, ttl: int | None) -> tuple[int, float]:
    """Non-blocking connect; with ``ttl`` only the SYN sent now carries it.

    The TTL is restored on the same socket right after connect() has put the SYN on the wire,
    so kernel retransmissions and the SYN-ACK of a simultaneous open use the default TTL.
    Returns (errno or 0, time the SYN left): read as connect() is entered, like the C engine,
    since the SYN leaves inside the call.
    """
    saved = None
    level, opt = ((socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS)
                  if sock.family == socket.AF_INET6 else (socket.IPPROTO_IP, socket.IP_TTL))
    if ttl is not None:
        saved = sock.getsockopt(level, opt)
        sock.setsockopt(level, opt, ttl)
    sent_at = time.time()
    rc = sock.connect_ex(sockaddr(remote))
    if saved is not None:
        try:
            sock.setsockopt(level, opt, saved)
        except OSError:
            pass
    return rc, sent_at


def same_endpoint(peer: tuple[object, ...], remote: Address) -> bool:
    """Is an accepted peer (a 2- or 4-tuple, as the family reports it) ``remote``?"""
    host, port = peer[0], peer[1]
    if port != remote[1] or not isinstance(host, str):
        return False
    if host == remote[0]:
        return True
    try:
        return (ipaddress.ip_address(host.split("%")[0])
                == ipaddress.ip_address(remote[0].split("%")[0]))
    except ValueError:
        return False


def connect_outcome(sock: socket.socket) -> int:
    """0 if a writable connecting socket is established, else the errno that ended it."""
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        return err
    try:
        sock.getpeername()
    except OSError as exc:      # writable but not connected: treat as a failed attempt
        return exc.errno or errno.ENOTCONN
    return 0


def note_syn(stats: PunchStats, rc: int, sent_at: float, start: float) -> None:
    """Count a connect(); it put a SYN on the wire unless it failed on the spot."""
    stats.attempts += 1
    if rc not in IN_PROGRESS:
        return
    stats.syns_sent += 1
    if stats.first_syn_at is None:
        stats.first_syn_at = sent_at
        stats.first_syn_delay_ns = int(round((sent_at - start) * 1e9))


def note_won(stats: PunchStats, sock: socket.socket, remote: Address, start: float) -> None:
    stats.time_to_established_ns = int(round((time.time() - start) * 1e9))
    stats.local_port = sock.getsockname()[1]
    stats.remote = remote
    sock.setblocking(True)


def abort(sock: socket.socket) -> None:
    """Close at once with SO_LINGER 0 (as csrc/sock.c hp_sock_abort): a connection not yet
    established leaves with a RST, not a FIN that lingers on its 4-tuple."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def close_all(socks: object) -> None:
    for s in list(socks):  # type: ignore[call-overload]
        try:
            s.close()
        except OSError:
            pass
