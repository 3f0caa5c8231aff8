"""Candidates: every address a peer can be reached at, with family, interface and origin.

A peer announces, per IP family it has, the address the server observed for its punch port
(origin ``stun``: the public IPv4 mapping, or the global IPv6 address, which a NPTv6 router
may have rewritten) and every usable address of every interface with that family's punch
port (origin ``host``: LAN addresses for a peer behind the same NAT, other global IPv6
addresses). A router port mapping (origin ``portmap``) is a public address too.

Wire form (signaling, inside REGISTER/UPDATE/CONNECT and PUNCH's peer info): the v1 pair
``[ip, port]`` extended to five items, one list each::

    ["2001:db8:0:2::10", 40001, "ipv6", "eth0", "stun"]      # ip, port, family, iface, origin

``family`` must agree with ``ip``; ``iface`` may be empty. A v1 pair ``[ip, port]`` is still
read: the first entry as the ``stun`` candidate, the others as ``host`` ones (what v1 peers
announced). Pure data: no sockets.
"""
from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ..nat.profile import Family

IPV4, IPV6 = "ipv4", "ipv6"
FAMILIES = (IPV6, IPV4)                  # Happy Eyeballs order: IPv6 first (RFC 8305)
ORIGINS = ("stun", "host", "portmap")
PUBLIC_ORIGINS = ("stun", "portmap")     # reachable from outside the peer's own network
MAX_IFACE = 32                           # characters (Linux IFNAMSIZ is 16)


def family_name(ip: str) -> str:
    """``ipv6`` for an IPv6 literal, ``ipv4`` otherwise."""
    return str(Family.of(ip))


@dataclass(frozen=True, slots=True)
class Candidate:
    ip: str
    port: int
    origin: str = "host"
    iface: str = ""

    @property
    def family(self) -> str:
        return family_name(self.ip)

    @property
    def address(self) -> tuple[str, int]:
        return (self.ip, self.port)

    @property
    def public(self) -> bool:
        return self.origin in PUBLIC_ORIGINS

    def to_wire(self) -> list[Any]:
        return [self.ip, self.port, self.family, self.iface, self.origin]

    @classmethod
    def from_wire(cls, value: Any, index: int = 0) -> Candidate:
        """One wire entry (``[ip, port, family, iface, origin]``, or a v1 ``[ip, port]`` at
        position ``index``); ValueError names what is wrong. The IP is only checked to be a
        literal here: whether a remote peer may announce it is the signaling check's call
        (address.unusable_peer_ip)."""
        if not isinstance(value, (list, tuple)) or len(value) not in (2, 5):
            raise ValueError(f"a candidate is [ip, port, family, iface, origin], got {value!r:.60}")
        ip, port = value[0], value[1]
        family: Any
        if len(value) == 2:
            family, iface, origin = None, "", ("stun" if index == 0 else "host")
        else:
            family, iface, origin = value[2], value[3], value[4]
        if not isinstance(ip, str) or type(port) is not int or not 0 < port < 65536:
            raise ValueError(f"bad candidate address {ip!r:.50}:{port!r:.10}")
        try:
            parsed = ipaddress.ip_address(ip)
        except ValueError:
            raise ValueError(f"candidate ip {ip!r:.50} is not an IP address") from None
        if origin not in ORIGINS:
            raise ValueError(f"candidate origin {origin!r:.20} is not one of {', '.join(ORIGINS)}")
        if not isinstance(iface, str) or len(iface) > MAX_IFACE or not iface.isprintable():
            raise ValueError(f"bad candidate iface {iface!r:.40}")
        ip = str(parsed)
        if family is not None and family != family_name(ip):
            raise ValueError(f"candidate family {family!r:.10} does not match {ip}")
        return cls(ip, port, origin, iface)


def parse_candidates(values: Iterable[Any]) -> list[Candidate]:
    """Wire entries (five-item lists or v1 pairs) -> candidates, in order."""
    return [Candidate.from_wire(v, i) for i, v in enumerate(values)]


def families(candidates: Iterable[Candidate]) -> set[str]:
    """The families a peer can be dialled in: those with a public (non-host) candidate."""
    return {c.family for c in candidates if c.public}


def common_families(a: Iterable[Candidate], b: Iterable[Candidate]) -> list[str]:
    """Families both peers have a public candidate in, IPv6 first."""
    both = families(a) & families(b)
    return [f for f in FAMILIES if f in both]


def public_candidate(candidates: Sequence[Candidate], family: str) -> Candidate | None:
    """The peer's public candidate of ``family`` (the server-observed one first)."""
    found = [c for c in candidates if c.family == family and c.public]
    found.sort(key=lambda c: PUBLIC_ORIGINS.index(c.origin))
    return found[0] if found else None


def host_candidates(candidates: Sequence[Candidate], family: str) -> list[Candidate]:
    """The peer's interface addresses of ``family`` (for peers on the same network)."""
    return [c for c in candidates if c.family == family and c.origin == "host"]
