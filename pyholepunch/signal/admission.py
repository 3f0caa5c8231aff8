"""Admission budgets: how many connections one source address, and everyone together, may
hold in a stage (waiting for a first byte, in a TLS handshake, unregistered, before a relay
pairs) at once.

One rule for every stage and every protocol on the shared port: a stage has a total budget
and a per-source budget, and a source is an IPv4 address or an IPv6 /64 (one host usually
holds a whole /64). A stranger with one address can then hold at most ``per_source`` slots
of a stage, never the whole stage, and a flood of one protocol never spends another's budget.
Sans-IO: plain counters, no clock.
"""
from __future__ import annotations

import ipaddress
from collections import Counter
from dataclasses import dataclass

IPV6_SOURCE_PREFIX = 64


def source_key(host: str) -> str:
    """The address a budget is counted against: the IPv4 address, or the IPv6 /64."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, IPV6_SOURCE_PREFIX), strict=False))
    return str(ip)


def is_loopback(host: str) -> bool:
    """A peer connected from the server's own host (IPv4-mapped loopback included)."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return (mapped or ip).is_loopback


@dataclass
class SourceBudget:
    """``total`` slots, at most ``per_source`` of them held by one source."""

    total: int
    per_source: int

    def __post_init__(self) -> None:
        if self.total <= 0 or self.per_source <= 0:
            raise ValueError("a budget needs total > 0 and per_source > 0")
        self._held: Counter[str] = Counter()
        self._count = 0
        self.refused = 0

    def acquire(self, source: str) -> bool:
        """Take one slot for ``source`` (a ``source_key``); False when either bound is hit."""
        if self._count >= self.total or self._held[source] >= self.per_source:
            self.refused += 1
            return False
        self._held[source] += 1
        self._count += 1
        return True

    def release(self, source: str) -> None:
        n = self._held.get(source, 0)
        if n <= 0:
            return
        if n == 1:
            del self._held[source]       # the counter never keeps idle sources around
        else:
            self._held[source] = n - 1
        self._count -= 1

    def held(self, source: str | None = None) -> int:
        return self._count if source is None else self._held.get(source, 0)

    def as_dict(self) -> dict[str, int]:
        return {"held": self._count, "sources": len(self._held), "refused": self.refused,
                "total": self.total, "per_source": self.per_source}
