"""NatProfile: what is known about one NAT for one transport, and how sure we are.

Findings are RFC 4787 / RFC 5780 terms; ``nat_type`` folds them into the classic names used
in reports and the CLI. Anything not measured stays ``unknown`` and is listed in
``not_learned`` — a profile never guesses silently.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from typing import Any


class Mapping(StrEnum):
    NONE = "none"                     # no NAT: the local address is public
    ENDPOINT_INDEPENDENT = "endpoint-independent"
    ADDRESS_DEPENDENT = "address-dependent"
    ADDRESS_AND_PORT_DEPENDENT = "address-and-port-dependent"
    UNKNOWN = "unknown"


class Filtering(StrEnum):
    NONE = "none"                     # nothing filtered (open host, or full cone)
    ENDPOINT_INDEPENDENT = "endpoint-independent"
    ADDRESS_DEPENDENT = "address-dependent"
    ADDRESS_AND_PORT_DEPENDENT = "address-and-port-dependent"
    UNKNOWN = "unknown"


class Allocation(StrEnum):
    PRESERVING = "preserving"         # external port == local port
    SEQUENTIAL = "sequential"         # next mapping = last + delta
    RANDOM = "random"
    UNKNOWN = "unknown"


class SynResponse(StrEnum):
    """What the NAT does with an unsolicited inbound SYN (TCP only)."""

    ACCEPT = "accept"                 # reaches the host
    DROP = "drop"
    RST = "rst"
    ICMP = "icmp"
    UNKNOWN = "unknown"


class Transport(StrEnum):
    TCP = "tcp"
    UDP = "udp"


class Family(StrEnum):
    IPV4 = "ipv4"
    IPV6 = "ipv6"

    @classmethod
    def of(cls, ip: str) -> Family:
        """The family of an IP literal (host names count as IPv4, as address.family_of)."""
        return cls.IPV6 if ":" in ip else cls.IPV4


NAT_TYPES = ("open", "full-cone", "restricted-cone", "port-restricted", "symmetric", "unknown",
             "firewall", "nptv6")


@dataclass(frozen=True)
class NatProfile:
    transport: Transport = Transport.TCP
    mapping: Mapping = Mapping.UNKNOWN
    filtering: Filtering = Filtering.UNKNOWN
    allocation: Allocation = Allocation.UNKNOWN
    delta: int | None = None                     # for SEQUENTIAL allocation
    hairpin: bool | None = None
    unsolicited_syn: SynResponse = SynResponse.UNKNOWN
    public_ips: tuple[str, ...] = ()
    local_ips: tuple[str, ...] = ()
    confidence: dict[str, float] = field(default_factory=dict)   # finding -> 0..1
    not_learned: tuple[str, ...] = ()            # findings that could not be measured, with why
    server: str = ""                             # what it was measured against
    family: Family = Family.IPV4
    # A router port mapping of the punch port (NAT-PMP/PCP/UPnP, docs/architecture.md): the external
    # address anyone can dial, and the protocol that made it ("PCP", "NAT-PMP", "UPnP").
    port_mapping: tuple[str, int] | None = None
    mapped_by: str = ""

    @property
    def nat_type(self) -> str:
        """The classic name: open, full-cone, restricted-cone, port-restricted, symmetric;
        for IPv6 also ``firewall`` (no translation, a stateful filter: RFC 6092) and ``nptv6``
        (the prefix is rewritten, the port kept: RFC 6296)."""
        if self.mapping is Mapping.NONE:
            if self.family is Family.IPV6 and self.filtering in (
                    Filtering.ADDRESS_DEPENDENT, Filtering.ADDRESS_AND_PORT_DEPENDENT):
                return "firewall"
            return "open"
        if self.family is Family.IPV6 and self.mapping is Mapping.ENDPOINT_INDEPENDENT \
                and self.allocation is Allocation.PRESERVING:
            return "nptv6"
        if self.mapping in (Mapping.ADDRESS_DEPENDENT, Mapping.ADDRESS_AND_PORT_DEPENDENT):
            return "symmetric"
        if self.mapping is Mapping.ENDPOINT_INDEPENDENT:
            return {
                Filtering.NONE: "full-cone",
                Filtering.ENDPOINT_INDEPENDENT: "full-cone",
                Filtering.ADDRESS_DEPENDENT: "restricted-cone",
                Filtering.ADDRESS_AND_PORT_DEPENDENT: "port-restricted",
            }.get(self.filtering, "unknown")
        return "unknown"

    @property
    def label(self) -> str:
        """nat_type with the allocation detail, e.g. ``symmetric (sequential +1)``."""
        name = self.nat_type
        via = f" via {self.mapped_by}" if self.port_mapping is not None and self.mapped_by else ""
        if name == "firewall":
            return f"firewall (unsolicited SYN {self.unsolicited_syn}){via}"
        if self.allocation is Allocation.SEQUENTIAL and self.delta is not None:
            return f"{name} (sequential {self.delta:+d}){via}"
        if self.allocation is not Allocation.UNKNOWN and name != "open":
            return f"{name} ({self.allocation}){via}"
        return name + via

    @property
    def accepts_unsolicited(self) -> bool:
        """Would an inbound SYN from anyone reach the host (open or full cone)?"""
        return self.nat_type in ("open", "full-cone")

    def to_dict(self) -> dict[str, Any]:
        """A JSON/msgpack-safe dict (the documented `nat-type --json` schema)."""
        d = asdict(self)
        d.update(
            transport=str(self.transport), mapping=str(self.mapping),
            filtering=str(self.filtering), allocation=str(self.allocation),
            unsolicited_syn=str(self.unsolicited_syn), family=str(self.family),
            public_ips=list(self.public_ips), local_ips=list(self.local_ips),
            not_learned=list(self.not_learned), nat_type=self.nat_type, label=self.label,
            port_mapping=None if self.port_mapping is None else list(self.port_mapping),
        )
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NatProfile:
        """Inverse of to_dict; raises ValueError naming the bad field."""
        try:
            delta = data.get("delta")
            hairpin = data.get("hairpin")
            return cls(
                transport=Transport(data.get("transport", "tcp")),
                mapping=Mapping(data.get("mapping", "unknown")),
                filtering=Filtering(data.get("filtering", "unknown")),
                allocation=Allocation(data.get("allocation", "unknown")),
                delta=None if delta is None else int(delta),
                hairpin=None if hairpin is None else bool(hairpin),
                unsolicited_syn=SynResponse(data.get("unsolicited_syn", "unknown")),
                public_ips=tuple(str(x) for x in data.get("public_ips", ())),
                local_ips=tuple(str(x) for x in data.get("local_ips", ())),
                confidence={str(k): float(v) for k, v in dict(data.get("confidence", {})).items()},
                not_learned=tuple(str(x) for x in data.get("not_learned", ())),
                server=str(data.get("server", "")),
                family=Family(data.get("family", "ipv4")),
                port_mapping=_mapping_of(data.get("port_mapping")),
                mapped_by=str(data.get("mapped_by", "")),
            )
        except (TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"bad NAT profile: {exc}") from None

    def evolve(self, **changes: Any) -> NatProfile:
        return replace(self, **changes)


def _mapping_of(value: Any) -> tuple[str, int] | None:
    if value is None:
        return None
    host, port = value
    if not isinstance(host, str) or isinstance(port, bool) or not isinstance(port, int) \
            or not 0 < port < 65536:
        raise ValueError(f"bad port_mapping {value!r}")
    return (host, port)
