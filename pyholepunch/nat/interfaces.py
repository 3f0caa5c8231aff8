"""This host's interface addresses (Linux, standard library only): the candidates a peer
announces besides its server-observed mappings (docs/architecture.md).

IPv4: one address per interface (SIOCGIFADDR); IPv6: every address in /proc/net/if_inet6.
Loopback and link-local addresses are left out (no remote peer can dial them); so is
anything ``address.unusable_peer_ip`` refuses. Elsewhere than Linux: an empty map.
"""
from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import socket
import struct

from ..address import unusable_peer_ip

SIOCGIFADDR = 0x8915
IF_INET6 = "/proc/net/if_inet6"


def local_addresses() -> dict[str, str]:
    """{ip: interface name} for every usable address of every interface."""
    out: dict[str, str] = {}
    with contextlib.suppress(OSError):
        names = [name for _, name in socket.if_nameindex()]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for name in names:
                try:
                    raw = fcntl.ioctl(s.fileno(), SIOCGIFADDR,
                                      struct.pack("256s", name.encode()[:15]))
                except OSError:        # no IPv4 address on it
                    continue
                _keep(out, socket.inet_ntoa(raw[20:24]), name)
    with contextlib.suppress(OSError, ValueError), open(IF_INET6) as f:
        for line in f:
            fields = line.split()
            if len(fields) < 6:
                continue
            ip = str(ipaddress.IPv6Address(bytes.fromhex(fields[0])))
            _keep(out, ip, fields[5])
    return out


def _keep(out: dict[str, str], ip: str, iface: str) -> None:
    addr = ipaddress.ip_address(ip)
    if addr.is_link_local or unusable_peer_ip(ip) is not None:
        return
    out.setdefault(ip, iface)
