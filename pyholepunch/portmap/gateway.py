"""Which router to ask: the gateway of the route towards the rendezvous server.

Only the router that our traffic to the server crosses can map a port the server (and so a
peer) sees. No gateway on that route (the server is on-link or loopback) means no router to
ask, and nothing is sent at all.
"""
from __future__ import annotations

import ipaddress
import socket
import struct

# The calling thread's namespace: /proc/net follows the process's main thread.
ROUTE_TABLE = "/proc/thread-self/net/route"


def gateway_for(dest_ip: str, route_table: str = ROUTE_TABLE) -> str | None:
    """The IPv4 next hop towards ``dest_ip`` (longest prefix of the main table), or None when
    ``dest_ip`` is on-link, loopback, not IPv4, or the table cannot be read."""
    try:
        dest = ipaddress.IPv4Address(dest_ip)
    except ValueError:
        return None
    if dest.is_loopback:
        return None
    try:
        with open(route_table) as f:
            rows = f.read().splitlines()[1:]
    except OSError:
        return None
    best: tuple[int, int, str | None] | None = None     # (prefix length, -metric, gateway)
    for row in rows:
        cols = row.split()
        if len(cols) < 8:
            continue
        try:
            net, gw, flags, metric, mask = (int(cols[1], 16), int(cols[2], 16), int(cols[3], 16),
                                            int(cols[6]), int(cols[7], 16))
        except ValueError:
            continue
        if not flags & 0x1:           # RTF_UP
            continue
        # The file holds little-endian words: turn them into addresses the portable way.
        net_ip = ipaddress.IPv4Address(socket.inet_ntoa(struct.pack("<I", net)))
        mask_ip = ipaddress.IPv4Address(socket.inet_ntoa(struct.pack("<I", mask)))
        if int(dest) & int(mask_ip) != int(net_ip):
            continue
        plen = bin(int(mask_ip)).count("1")
        gateway = socket.inet_ntoa(struct.pack("<I", gw)) if flags & 0x2 else None   # RTF_GATEWAY
        key = (plen, -metric, gateway)
        if best is None or key[:2] > best[:2]:
            best = key
    return best[2] if best is not None else None
