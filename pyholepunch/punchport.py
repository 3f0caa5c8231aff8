"""Our punch port in each address family: reserving it, asking the server what it maps to,
and the candidates announced from it (docs/architecture.md).

A peer keeps one reserved TCP port per family it can reach the server in; STUN over TCP
from that port tells the server-observed address (the public IPv4 mapping, or the global
IPv6 address as the server saw it); the candidates are those mappings plus every usable
interface address of the family with its punch port.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import struct
from dataclasses import dataclass

from .address import Address, family_of, format_address, route_source, unusable_peer_ip
from .nat.classify import classify_nat
from .nat.interfaces import local_addresses
from .nat.profile import Family, Mapping, NatProfile
from .strategy.candidates import FAMILIES, Candidate, family_name
from .stun.client import CONNECT_REARM, BindingResult, StunTcpConnection, silence_rearm

log = logging.getLogger(__name__)

PROBE_ATTEMPTS = 3          # STUN over TCP from the punch port (see probe)
PROBE_RETRY_PAUSE = 0.2
MAX_PER_FAMILY = 8          # candidates announced per family (the server's bound)
OTHER_FAMILY_TIMEOUT = 1.5  # first STUN contact in the server's other family (a blackholed
                            # IPv6 uplink costs this much at start, once)


@dataclass
class PunchPort:
    """Our punch port in one address family, and what the server saw of it."""

    family: str
    server: Address                          # the server's STUN address in this family
    local_ip: str
    port: int = 0
    reservation: socket.socket | None = None   # holds the port while we live
    announced: Address | None = None            # what it maps to outside
    other_family: Address | None = None         # the server's address in the other family

    def close(self) -> None:
        if self.reservation is not None:
            self.reservation.close()
            self.reservation = None


def reserve_port(local_ip: str) -> socket.socket:
    """A fresh local port held for punching, so the kernel never hands it to anyone else."""
    sock = socket.socket(family_of(local_ip), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((local_ip, 0))
    except BaseException:
        sock.close()
        raise
    return sock



async def probe(server: Address, local_ip: str, port: int, *,
                rtt: float | None = None) -> BindingResult:
    """Our mapping for ``port``, asked again (PROBE_ATTEMPTS in all) when the server's
    connection breaks: one unlucky connection on a lossy path must not fail a peer's
    start. A timeout is not retried: it has waited long enough (connect() may be
    waiting for this probe)."""
    for attempt in range(1, PROBE_ATTEMPTS + 1):
        try:
            return await probe_once(server, local_ip, port, rtt=rtt)
        except ConnectionError as exc:
            if attempt == PROBE_ATTEMPTS:
                raise
            log.info("STUN probe from punch port %d failed (%s): asking again", port, exc)
            await asyncio.sleep(PROBE_RETRY_PAUSE)
    raise AssertionError("unreachable")


async def probe_once(server: Address, local_ip: str, port: int, *,
                     rtt: float | None = None) -> BindingResult:
    """One STUN Binding over TCP from (local_ip, port); ends with an RST (SO_LINGER 0): a
    TIME_WAIT would block the next probe from that port. With the server's ``rtt`` known, a
    lost SYN is sent again after ~3 of them, and again soon (a lost SYN-ACK needs two)."""
    conn = await StunTcpConnection.open(server, local=(local_ip, port),
                                        rearm=silence_rearm(rtt) if rtt else CONNECT_REARM,
                                        growth=1.25 if rtt else 2.0)
    try:
        return await conn.binding()
    finally:
        sock = conn.writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.writer.transport.abort()


def candidates(ports: dict[str, PunchPort]) -> list[Candidate]:
    """Every address we can be reached at: per family (IPv6 first), the server-observed
    mapping of the punch port, then the address the punch port is bound to (the first host
    candidate: the one a peer on our network dials) and every other usable interface
    address of the family with that port."""
    out: list[Candidate] = []
    ifaces = local_addresses()
    for fam in FAMILIES:
        pp = ports.get(fam)
        if pp is None or pp.announced is None:
            continue
        out.append(Candidate(pp.announced[0], pp.announced[1], "stun",
                             ifaces.get(pp.local_ip, "")))
        if fam == "ipv4" or pp.local_ip != pp.announced[0]:     # (a global IPv6 is both)
            out.append(Candidate(pp.local_ip, pp.port, "host", ifaces.get(pp.local_ip, "")))
        others = [ip for ip in ifaces if family_name(ip) == fam
                  and ip not in (pp.local_ip, pp.announced[0]) and unusable_peer_ip(ip) is None]
        out += [Candidate(ip, pp.port, "host", ifaces[ip])
                for ip in others[:max(0, MAX_PER_FAMILY - 2)]]
    return out


async def classify_family(server: Address, *, timeout: float = OTHER_FAMILY_TIMEOUT
                          ) -> tuple[str, NatProfile] | None:
    """(our source address, TCP profile) towards ``server`` in its family, or None when we
    have no route there or its STUN does not answer (a blackholed uplink): that family is
    then left out, and the log says why."""
    fam = family_name(server[0])
    try:
        local_ip = await asyncio.to_thread(route_source, server[0])
    except OSError as exc:
        log.info("%s left out: no route to the server's %s (%s)", fam, format_address(server), exc)
        return None
    profile = await classify_nat(server, transport="tcp", local_ip=local_ip, timeout=timeout)
    if profile.mapping is Mapping.UNKNOWN and profile.not_learned and \
            profile.not_learned[0].startswith("everything:"):
        log.info("%s left out: the server's %s does not answer (%s)", fam,
                 format_address(server), profile.not_learned[0])
        return None
    return local_ip, profile.evolve(family=Family(fam))
