"""How many NAT routers stand between us and the outside, measured (for the low-TTL step).

The low-TTL simultaneous open sends its first SYN with a TTL that passes our own NAT(s) but
dies before the peer's: 2 behind one NAT, 3 behind a home NAT inside a carrier NAT. Guessing 2
leaves a CGNAT subscriber's SYN dying at the carrier NAT, where it opens nothing.

Measured like traceroute: UDP datagrams to the rendezvous server with TTL 1, 2, ... and the
ICMP "time exceeded" each draws (read from the socket's error queue, IP_RECVERR: no raw socket,
no root). A router answering from a private (RFC 1918) or shared (RFC 6598, 100.64/10) address
is inside; the first one answering from any other address is outside, and so is the server's
own "port unreachable". The count of inside routers is the answer; None when nothing answered.
"""
from __future__ import annotations

import ipaddress
import select
import socket
import struct
import time

IP_RECVERR = getattr(socket, "IP_RECVERR", 11)
MSG_ERRQUEUE = getattr(socket, "MSG_ERRQUEUE", 0x2000)
SO_EE_ORIGIN_ICMP = 2
ICMP_TIME_EXCEEDED, ICMP_UNREACHABLE = 11, 3
PROBE_PORT = 33434            # traceroute's first port; nobody listens there
MAX_HOPS = 4
HOP_TIMEOUT = 0.3             # s per TTL without an answer
HOP_TRIES = 2                 # probes per TTL: one lost probe or ICMP answer (10 % loss) must
                              # not cut the count short (a CGNAT counted as 1 NAT)
_INSIDE = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",
                                              "100.64.0.0/10")]


def inside(ip: str) -> bool:
    """An address a router inside a private network or a carrier NAT answers from."""
    addr = ipaddress.ip_address(ip)
    return any(addr in net for net in _INSIDE)


def _answer(sock: socket.socket, deadline: float) -> tuple[int, str] | None:
    """(ICMP type, offender address) of the next error queued on ``sock``, or None."""
    while (left := deadline - time.monotonic()) > 0:
        # A queued error is POLLERR, which select() counts as readable.
        select.select([sock], [], [], left)
        try:
            _, ancdata, _, _ = sock.recvmsg(512, 512, MSG_ERRQUEUE)
        except BlockingIOError:
            continue
        for level, kind, data in ancdata:
            if level != socket.IPPROTO_IP or kind != IP_RECVERR or len(data) < 24:
                continue
            _errno, origin, icmp_type, _code = struct.unpack_from("=IBBB", data)
            if origin != SO_EE_ORIGIN_ICMP:
                continue
            offender = socket.inet_ntoa(data[20:24])    # sockaddr_in after the 16-byte header
            return icmp_type, offender
    return None


def nat_hops(server_ip: str, *, local_ip: str = "0.0.0.0", max_hops: int = MAX_HOPS,
             hop_timeout: float = HOP_TIMEOUT) -> int | None:
    """The routers between us and ``server_ip`` that answer from inside addresses (our NATs).

    None towards an IPv6 server: IPv6 has no NAT to count, and the low-TTL step is IPv4's
    (a hop-limit-expired SYN does not end an IPv6 connect, so the step cannot re-arm there).
    """
    if ":" in server_ip:
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
        sock.setblocking(False)
        sock.bind((local_ip, 0))
        count = 0
        for ttl in range(1, max_hops + 1):
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
            got = None
            for _ in range(HOP_TRIES):
                try:
                    sock.sendto(b"pyholepunch hop probe", (server_ip, PROBE_PORT + ttl))
                except OSError:
                    return None
                got = _answer(sock, time.monotonic() + hop_timeout)
                if got is not None:
                    break
            if got is None:
                return count or None
            icmp_type, offender = got
            if icmp_type != ICMP_TIME_EXCEEDED or not inside(offender):
                return count or None
            count += 1
        return count or None
