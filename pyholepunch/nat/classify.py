"""NAT classification (RFC 4787 terms, RFC 5780 method) over UDP and TCP.

Two halves: ``Observations`` -> ``build_profile`` is pure (the verdict logic, tested without
a network); ``classify_nat`` runs the probes (nat/probe.py) and builds the profile.

Probes, per transport, from the same local IP:
  * mapping: one local port sends Binding requests to the primary address, the alternate IP
    (same port) and the alternate IP+port (OTHER-ADDRESS) and compares the mapped addresses;
  * filtering: a *second* local port, which only ever talked to the primary address, asks
    for answers from the other IP+port and from the other port (CHANGE-REQUEST); over TCP the
    server connects back and reports how a failed connect-back ended (RST / drop / ICMP),
    which is also the NAT's unsolicited-SYN behaviour;
  * allocation: several fresh local ports in quick succession, alone on the wire, so that a
    sequential allocator shows its delta;
  * hairpin: a packet / connection to our own mapped address.
Whatever cannot be measured (plain STUN server, no answer, lost probes) is left ``unknown``
and explained in ``not_learned``; nothing is guessed.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

from ..address import Address, parse_address
from ..stun.codec import ConnectBack
from .profile import Allocation, Filtering, Mapping, NatProfile, SynResponse, Transport

log = logging.getLogger(__name__)

STUN_PORT = 3478
ALLOCATION_PROBES = 5
MAX_SEQUENTIAL_DELTA = 64


class Outcome(StrEnum):
    PASSED = "passed"              # the changed-address answer reached us
    BLOCKED = "blocked"            # it did not (no answer / connect-back failed)
    UNSUPPORTED = "unsupported"    # server cannot change address (420, no alternate)
    INVALID = "invalid"            # server answered from the wrong address / odd reply
    NOT_RUN = "not-run"


@dataclass
class FilterProbe:
    outcome: Outcome = Outcome.NOT_RUN
    connect_back: ConnectBack | None = None     # TCP: how a failed connect-back ended
    detail: str = ""


@dataclass
class Observations:
    """Everything the probes saw; input of the pure verdict."""

    transport: Transport
    server: Address
    local_ip: str = ""
    error: str = ""                              # set when the server could not be used at all
    rtt: float | None = None
    other_address: Address | None = None
    alt_server: Address | None = None
    mapping_local: Address | None = None
    mapped_primary: Address | None = None
    mapped_alt_ip: Address | None = None         # to (other IP, primary port)
    mapped_alt_both: Address | None = None       # to OTHER-ADDRESS
    mapped_alt_server: Address | None = None     # to a second plain server
    filter_local: Address | None = None
    mapped_filter: Address | None = None
    filter_both: FilterProbe = field(default_factory=FilterProbe)     # change IP and port
    filter_port: FilterProbe = field(default_factory=FilterProbe)     # change port only
    allocation: list[tuple[int, int]] = field(default_factory=list)   # (local port, mapped port)
    allocation_lost: int = 0
    allocation_rearms: int = 0      # re-sent TCP SYNs: a NAT may allocate a port for each
    hairpin: bool | None = None
    hairpin_detail: str = ""
    notes: list[str] = field(default_factory=list)


# --- the pure verdict -------------------------------------------------------------------

def _decide_mapping(o: Observations, nl: list[str], conf: dict[str, float]) -> Mapping:
    m1, local = o.mapped_primary, o.mapping_local
    if m1 is None or local is None:
        nl.append("mapping: no mapped address from the primary server")
        return Mapping.UNKNOWN
    if m1 == local or (m1[1] == local[1] and _is_local_ip(m1[0], o.local_ip)):
        conf["mapping"] = 1.0
        return Mapping.NONE
    if o.other_address is not None:
        m2, m3 = o.mapped_alt_ip, o.mapped_alt_both
        if m2 is not None and m3 is not None:
            conf["mapping"] = 1.0
            if m1 == m2 == m3:
                return Mapping.ENDPOINT_INDEPENDENT
            if m1 != m2 and m2 == m3:
                return Mapping.ADDRESS_DEPENDENT
            return Mapping.ADDRESS_AND_PORT_DEPENDENT
        known = m2 if m2 is not None else m3
        if known is None:
            nl.append("mapping: no answer from the server's alternate address")
            return Mapping.UNKNOWN
        conf["mapping"] = 0.7
        nl.append("mapping: one alternate-address probe lost; "
                  "address- vs address-and-port-dependent not distinguished")
        return Mapping.ENDPOINT_INDEPENDENT if known == m1 else Mapping.ADDRESS_AND_PORT_DEPENDENT
    if o.mapped_alt_server is not None:
        if o.mapped_alt_server == m1:
            conf["mapping"] = 0.9
            return Mapping.ENDPOINT_INDEPENDENT
        conf["mapping"] = 0.6
        nl.append("mapping: address- vs address-and-port-dependent not distinguished "
                  "(two plain servers, no alternate port)")
        return Mapping.ADDRESS_AND_PORT_DEPENDENT
    if o.alt_server is not None:
        nl.append(f"mapping: no answer from the second server {_fmt(o.alt_server)}")
    else:
        nl.append("mapping: the server has no alternate address (no OTHER-ADDRESS, not RFC 5780); "
                  "give a second server to compare")
    return Mapping.UNKNOWN


def _decide_filtering(o: Observations, nl: list[str], conf: dict[str, float]) -> Filtering:
    both, port = o.filter_both, o.filter_port
    if both.outcome is Outcome.PASSED:
        conf["filtering"] = 1.0
        return Filtering.ENDPOINT_INDEPENDENT
    if both.outcome is Outcome.BLOCKED:
        if port.outcome is Outcome.PASSED:
            conf["filtering"] = 0.9
            return Filtering.ADDRESS_DEPENDENT
        if port.outcome is Outcome.BLOCKED:
            # silence can also be loss: retransmissions make that unlikely, not impossible
            conf["filtering"] = 0.9 if o.transport is Transport.UDP else 0.95
            return Filtering.ADDRESS_AND_PORT_DEPENDENT
        nl.append(f"filtering: address-dependent or stricter; the change-port test {port.outcome}"
                  + (f" ({port.detail})" if port.detail else ""))
        return Filtering.UNKNOWN
    why = {Outcome.UNSUPPORTED: "the server cannot answer from another address (CHANGE-REQUEST "
                                "unsupported or no alternate address)",
           Outcome.INVALID: "the server did not answer from the requested address",
           Outcome.NOT_RUN: "not tested"}[both.outcome]
    nl.append(f"filtering: {why}" + (f" ({both.detail})" if both.detail else ""))
    return Filtering.UNKNOWN


def _decide_syn(o: Observations, nl: list[str], conf: dict[str, float]) -> SynResponse:
    if o.transport is not Transport.TCP:
        return SynResponse.UNKNOWN
    seen = [p.connect_back for p in (o.filter_both, o.filter_port)
            if p.outcome is Outcome.BLOCKED and p.connect_back is not None]
    if seen:
        # a RST or an ICMP error is positive evidence; a timeout may also be a lost RST
        answered = [cb for cb in seen if cb is not ConnectBack.TIMEOUT]
        cb = answered[0] if answered else ConnectBack.TIMEOUT
        verdict = {ConnectBack.REFUSED: SynResponse.RST, ConnectBack.TIMEOUT: SynResponse.DROP,
                   ConnectBack.UNREACHABLE: SynResponse.ICMP}.get(cb)
        if verdict is not None:
            conf["unsolicited_syn"] = 0.9 if len(set(seen)) == 1 else 0.7
            return verdict
    elif o.filter_both.outcome is Outcome.PASSED:
        conf["unsolicited_syn"] = 1.0
        return SynResponse.ACCEPT
    nl.append("unsolicited_syn: no connect-back result from the server")
    return SynResponse.UNKNOWN


def _decide_allocation(o: Observations, mapping: Mapping, nl: list[str],
                       conf: dict[str, float]) -> tuple[Allocation, int | None]:
    if mapping is Mapping.NONE:
        conf["allocation"] = 1.0
        return Allocation.PRESERVING, None
    pairs = o.allocation
    if len(pairs) < 3:
        nl.append(f"allocation: only {len(pairs)} of {len(pairs) + o.allocation_lost} "
                  "allocation probes answered")
        return Allocation.UNKNOWN, None
    preserved = sum(1 for lp, mp in pairs if lp == mp)
    if preserved == len(pairs):
        conf["allocation"] = 1.0
        return Allocation.PRESERVING, None
    deltas = [(b[1] - a[1] + 32768) % 65536 - 32768 for a, b in zip(pairs, pairs[1:], strict=False)]
    delta, count = Counter(deltas).most_common(1)[0]
    sequential = delta != 0 and abs(delta) <= MAX_SEQUENTIAL_DELTA
    if sequential and count == len(deltas):
        conf["allocation"] = 1.0
        return Allocation.SEQUENTIAL, delta
    step = _reordered_step(pairs, o.allocation_lost + o.allocation_rearms)
    if step is not None:
        # a retransmitted (lost) probe got its mapping late: sequential, out of order
        conf["allocation"] = 0.8
        return Allocation.SEQUENTIAL, step
    if sequential and count >= max(2, len(deltas) - 1):   # one foreign allocation in between
        conf["allocation"] = round(count / len(deltas), 2)
        return Allocation.SEQUENTIAL, delta
    if preserved >= len(pairs) - 1:
        conf["allocation"] = round(preserved / len(pairs), 2)
        return Allocation.PRESERVING, None
    step = _step_without_one(pairs, o.allocation_lost + o.allocation_rearms)
    if len(pairs) >= 5 and step is not None:     # 4 left: no random allocator's luck
        # one mapping from elsewhere (a flow of before still alive, a retransmission's
        # own mapping) among a progression: sequential, less sure
        conf["allocation"] = 0.7
        return Allocation.SEQUENTIAL, step
    conf["allocation"] = 0.8 if len(pairs) >= 4 else 0.6
    return Allocation.RANDOM, None


def _reordered_step(pairs: list[tuple[int, int]], lost: int) -> int | None:
    """The allocator's step if the mapped ports, in any order, form a progression with at
    most ``lost + 1`` gaps (lost probes and one foreign allocation use ports too); its sign
    comes from the send order."""
    ports = sorted(mp for _, mp in pairs)
    diffs = [b - a for a, b in zip(ports, ports[1:], strict=False)]
    step = min(diffs)
    if step <= 0 or step > MAX_SEQUENTIAL_DELTA or any(d % step for d in diffs):
        return None
    if sum(d // step - 1 for d in diffs) > lost + 1:
        return None
    ups = sum(1 for a, b in zip(pairs, pairs[1:], strict=False) if b[1] > a[1])
    return step if ups * 2 >= len(pairs) - 1 else -step


def _step_without_one(pairs: list[tuple[int, int]], lost: int) -> int | None:
    """``_reordered_step`` of the pairs with one of them left out, if exactly one choice
    gives a progression (a single outlier, not a random allocator's luck)."""
    steps = {step for i in range(len(pairs))
             if (step := _reordered_step(pairs[:i] + pairs[i + 1:], lost)) is not None}
    return steps.pop() if len(steps) == 1 else None


def build_profile(o: Observations) -> NatProfile:
    """The verdict: a NatProfile from what the probes saw (pure)."""
    nl: list[str] = []
    conf: dict[str, float] = {}
    server = f"{o.transport}://{_fmt(o.server)}"
    local_ips = (o.local_ip,) if o.local_ip else ()
    if o.error:
        return NatProfile(transport=o.transport, local_ips=local_ips, server=server,
                          not_learned=(f"everything: {o.error}",))
    mapping = _decide_mapping(o, nl, conf)
    filtering = _decide_filtering(o, nl, conf)
    if mapping is Mapping.NONE and filtering is Filtering.ENDPOINT_INDEPENDENT:
        filtering = Filtering.NONE
    syn = _decide_syn(o, nl, conf)
    allocation, delta = _decide_allocation(o, mapping, nl, conf)
    hairpin = o.hairpin
    if hairpin is None:
        nl.append(f"hairpin: {o.hairpin_detail or 'not tested'}")
    else:
        # a "no" is weaker: some NATs hairpin between hosts but not back to the sender itself
        conf["hairpin"] = 1.0 if hairpin else 0.6
    publics = []
    for addr in (o.mapped_primary, o.mapped_filter, o.mapped_alt_ip, o.mapped_alt_both):
        if addr is not None and addr[0] not in publics:
            publics.append(addr[0])
    return NatProfile(
        transport=o.transport, mapping=mapping, filtering=filtering, allocation=allocation,
        delta=delta, hairpin=hairpin, unsolicited_syn=syn, public_ips=tuple(publics),
        local_ips=local_ips, confidence=conf, not_learned=tuple(nl + o.notes), server=server)


def _is_local_ip(ip: str, local_ip: str) -> bool:
    return ip == local_ip and not ipaddress.ip_address(ip).is_unspecified


def _fmt(addr: Address) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --- the driver ---------------------------------------------------------------------------

async def classify_nat(server: Address | str, *, transport: str = "udp", local_ip: str | None = None,
                       alt_server: Address | str | None = None, timeout: float = 3.0,
                       allocation_probes: int = ALLOCATION_PROBES,
                       on_mapped: Callable[[], None] | None = None) -> NatProfile:
    """Classify the NAT between this host and ``server`` for one transport (udp | tcp).

    ``server`` and ``alt_server`` take the forms ``Peer`` takes: ``"host:port"``,
    ``"[v6]:port"``, ``"host"`` (port 3478) or a ``(host, port)`` tuple; AddressError if not.

    ``timeout`` bounds the first contact with the server; later probes wait in proportion
    to the measured RTT. Never raises for network trouble: an unreachable server gives a
    profile whose ``not_learned`` says so. ``on_mapped`` (TCP): called once the probes that
    take NAT mappings are done (a new mapping may be made from then on without disturbing
    them) while the filtering test may still wait for the server's connect-backs.
    """
    from . import probe, probe_udp  # the I/O half

    kind = Transport(transport)
    server = parse_address(server, default_port=STUN_PORT)
    if alt_server is not None:
        alt_server = parse_address(alt_server, default_port=STUN_PORT)
    obs = Observations(kind, server, alt_server=alt_server)
    try:
        if kind is Transport.UDP:
            await probe_udp.probe_udp(obs, local_ip=local_ip, timeout=timeout,
                                  allocation_probes=allocation_probes)
        else:
            await probe.probe_tcp(obs, local_ip=local_ip, timeout=timeout,
                                  allocation_probes=allocation_probes, on_mapped=on_mapped)
    except OSError as exc:
        obs.error = obs.error or f"local socket error: {exc}"
    profile = build_profile(obs)
    log.info("%s NAT via %s: %s", kind, _fmt(server), profile.label)
    return profile


async def classify_both(server: Address | str, **kwargs: object) -> dict[str, NatProfile]:
    """UDP then TCP (one after the other, so allocation probes never interleave)."""
    out: dict[str, NatProfile] = {}
    for kind in ("udp", "tcp"):
        out[kind] = await classify_nat(server, transport=kind, **kwargs)  # type: ignore[arg-type]
    return out


def run_sync(server: Address, **kwargs: object) -> NatProfile:
    """Blocking wrapper (for lab.call and scripts)."""
    return asyncio.run(classify_nat(server, **kwargs))  # type: ignore[arg-type]
