"""nftables rulesets for the lab's NAT routers, one behaviour per type (docs/lab.md), and for
the IPv6 behaviour of each side's uplink (no NAT on IPv6: open, a stateful firewall, a
blackhole).

Pure text generation (no I/O): ``ruleset(NatConfig)`` returns what ``nft -f -`` loads inside a
router namespace. Linux conntrack gives the building blocks:

- ``snat to WAN`` keeps the source port when the resulting tuple is free: endpoint-independent,
  port-preserving mapping.  ``snat to WAN : numgen inc ...`` gives every new flow the next port
  (address-and-port-dependent mapping, delta 1); ``fully-random`` gives every flow a random one.
- conntrack alone is address-and-port-dependent filtering: an inbound packet that matches no
  flow is addressed to the router itself, where the input chain drops it (or answers RST).
- full-cone / restricted-cone filtering needs state conntrack does not keep: a dynamic map,
  filled from outbound packets after SNAT, from the external port (plus the remote address
  for restricted-cone) to the internal address and port; inbound packets are DNATed through it.
  The same map (keyed by external port) implements hairpinning when both peers share the NAT.
"""
from __future__ import annotations

from dataclasses import dataclass

NAT_TYPES: tuple[str, ...] = (
    "none", "full-cone", "restricted-cone", "port-restricted", "port-restricted-rst",
    "symmetric-seq", "symmetric-random", "cgnat",
)

# External ports handed out by symmetric-seq: SEQ_PORT_BASE + a per-lab offset, then +1 per new
# flow, wrapping after SEQ_PORT_SPAN flows.
SEQ_PORT_BASE = 20000
SEQ_PORT_SPAN = 16384
# Dynamic map lifetime: refreshed by every outbound packet of the mapping, like a NAT's
# mapping timer; long enough for any test, short enough not to grow without bound.
MAP_TIMEOUT_S = {"tcp": 600, "udp": 180}


@dataclass(frozen=True)
class TypeRow:
    """What docs/lab.md promises for one type; `lab verify` checks measurements against it."""

    mapping: str          # "public" | "endpoint-independent" | "address-and-port-dependent"
    allocation: str       # "public" | "preserving" | "sequential" | "random"
    filtering: str        # "open" | "endpoint-independent" | "address-dependent"
                          # | "address-and-port-dependent"
    unsolicited_syn: str  # "reaches-host" | "drop" | "rst"


ROWS: dict[str, TypeRow] = {
    "none": TypeRow("public", "public", "open", "reaches-host"),
    "full-cone": TypeRow("endpoint-independent", "preserving", "endpoint-independent", "reaches-host"),
    "restricted-cone": TypeRow("endpoint-independent", "preserving", "address-dependent", "drop"),
    "port-restricted": TypeRow("endpoint-independent", "preserving", "address-and-port-dependent", "drop"),
    "port-restricted-rst": TypeRow("endpoint-independent", "preserving",
                                   "address-and-port-dependent", "rst"),
    "symmetric-seq": TypeRow("address-and-port-dependent", "sequential", "address-and-port-dependent",
                             "drop"),
    "symmetric-random": TypeRow("address-and-port-dependent", "random", "address-and-port-dependent",
                                "drop"),
    "cgnat": TypeRow("endpoint-independent", "preserving", "address-and-port-dependent", "drop"),
}


@dataclass(frozen=True)
class NatConfig:
    """One NAT router: its behaviour (a hop type, never "none"/"cgnat") and its interfaces."""

    kind: str             # full-cone | restricted-cone | port-restricted | port-restricted-rst | symmetric-*
    wan_if: str
    wan_ip: str
    lan_if: str
    lan_net: str          # e.g. "10.0.1.0/24"
    hairpin: bool = False
    seq_offset: int = 0   # symmetric-seq: first external port = SEQ_PORT_BASE + seq_offset
    # miniupnpd on this router (lab/miniupnpd.py): (server ip, alt ip, port) of the STUN server
    # its forwarding check asks; None = no port-mapping router.
    portmap_stun: tuple[str, str, int] | None = None


HOP_KINDS = ("full-cone", "restricted-cone", "port-restricted", "port-restricted-rst",
             "symmetric-seq", "symmetric-random")


NO_IPV4 = "no-ipv4"
"""An IPv4 "type" beside the eight: the peer has no IPv4 at all (an IPv6-only host)."""

V4_TYPES: tuple[str, ...] = (*NAT_TYPES, NO_IPV4)


def validate_type(name: str) -> str:
    if name not in V4_TYPES:
        raise ValueError(f"unknown NAT type {name!r}; choose one of {', '.join(V4_TYPES)}")
    return name


# --- IPv6: one behaviour per side: a firewall on its first hop, a blackhole at the core ----------

V6_BEHAVIOURS: tuple[str, ...] = ("none", "open", "firewall", "firewall-rst", "blackhole")


@dataclass(frozen=True)
class V6Row:
    """What one IPv6 behaviour promises; `lab verify` checks measurements against it."""

    outbound: str           # a TCP connect to the server: "ok" | "timeout" | "unreachable"
    unsolicited_syn: str    # from the server: "reaches-host" | "drop" | "rst" | "n/a"
    simultaneous_open: str  # crossing SYNs with the server: "pass" | "fail" | "n/a"


V6_ROWS: dict[str, V6Row] = {
    "none": V6Row("unreachable", "n/a", "n/a"),            # no IPv6 address, no route
    "open": V6Row("ok", "reaches-host", "pass"),
    "firewall": V6Row("ok", "drop", "pass"),                # RFC 6092 simple security
    "firewall-rst": V6Row("ok", "rst", "pass"),
    "blackhole": V6Row("timeout", "drop", "fail"),          # address and route, no path
}


def validate_v6(name: str) -> str:
    if name not in V6_BEHAVIOURS:
        raise ValueError(f"unknown IPv6 behaviour {name!r}; choose one of {', '.join(V6_BEHAVIOURS)}")
    return name


def v6_firewall_ruleset(behaviour: str, ifname: str, *, host: bool) -> str:
    """A stateful IPv6 firewall (table ``ip6 hpl_v6``) on a side's first hop, for traffic coming
    in on its uplink ``ifname``: on the side's router (forward hook) or, for a host alone on the
    public link, on the host itself (input hook; ICMPv6 stays open for neighbour discovery).
    ``firewall`` is RFC 6092 simple security: only flows started inside pass inbound; an
    outbound SYN makes the peer's crossing SYN a reply, so simultaneous open passes (each side's
    firewall is its own box, as on the Internet: one conntrack for both sides would drop both
    crossing SYNs). ``firewall-rst`` answers an unsolicited TCP segment with a RST instead."""
    if behaviour not in ("firewall", "firewall-rst"):
        raise ValueError(f"not a firewall behaviour: {behaviour!r}")
    inbound = f'iifname "{ifname}"'
    rules = [f"{inbound} ct state established,related accept"]
    if host:
        rules.append(f"{inbound} meta l4proto ipv6-icmp accept")
    if behaviour == "firewall-rst":
        rules.append(f"{inbound} meta l4proto tcp reject with tcp reset")
    rules.append(f"{inbound} counter drop")
    hook = "input" if host else "forward"
    body = "".join(f"    {r}\n" for r in rules)
    return (f"table ip6 hpl_v6 {{\n  chain inbound {{\n"
            f"    type filter hook {hook} priority filter; policy accept;\n{body}  }}\n}}\n")


def v6_blackhole_ruleset(ifnames: list[str]) -> str:
    """The core's drop of every IPv6 packet to and from the blackholed sides' uplinks (table
    ``ip6 hpl_v6``): stateless, silent (the sender's SYNs time out), "" for none."""
    rules = [r for i in sorted(ifnames) for r in (f'iifname "{i}" drop', f'oifname "{i}" drop')]
    if not rules:
        return ""
    body = "".join(f"    {r}\n" for r in rules)
    return ("table ip6 hpl_v6 {\n  chain blackhole {\n"
            "    type filter hook forward priority filter; policy accept;\n"
            f"{body}  }}\n}}\n")


def _mapping_rules(c: NatConfig) -> list[str]:
    out = f'oifname "{c.wan_if}"'
    if c.kind == "symmetric-seq":
        # One rule (one counter) per protocol, so TCP and UDP each count 1, 2, 3...  The
        # counter goes through a port map because nft 1.0.6 stores `numgen` in host byte order
        # where the port wants network order (a bare `: numgen inc` steps by 256).
        return [
            f"{out} meta l4proto {proto} snat ip to {c.wan_ip} : numgen inc mod {SEQ_PORT_SPAN} "
            "map @seq"
            for proto in ("tcp", "udp")
        ] + [f"{out} snat ip to {c.wan_ip}"]
    if c.kind == "symmetric-random":
        return [f"{out} meta l4proto {{ tcp, udp }} snat ip to {c.wan_ip}:1024-65535 fully-random",
                f"{out} snat ip to {c.wan_ip}"]
    return [f"{out} snat ip to {c.wan_ip}"]


def ruleset(c: NatConfig) -> str:
    """The complete nft ruleset for one NAT router (table ``ip hpl_nat``)."""
    if c.kind not in HOP_KINDS:
        raise ValueError(f"not a NAT router kind: {c.kind!r}")
    wan, lan = f'iifname "{c.wan_if}"', f'iifname "{c.lan_if}"'
    maps: list[str] = []
    track: list[str] = []
    pre: list[str] = []
    post = _mapping_rules(c)
    if c.portmap_stun is not None:
        # miniupnpd's STUN check must see the router's own WAN address and port unchanged,
        # or it calls the NAT restrictive and stops forwarding: its own traffic is not SNATed.
        post.insert(0, f"ip saddr {c.wan_ip} accept")
    want_port_map = c.kind == "full-cone" or c.hairpin
    if c.kind == "symmetric-seq":  # counter value -> port; shared by the TCP and UDP rules
        first = SEQ_PORT_BASE + c.seq_offset
        elements = ", ".join(f"{i} : {first + i}" for i in range(SEQ_PORT_SPAN))
        maps.append(f"map seq {{ typeof numgen inc mod 2 : tcp dport; elements = {{ {elements} }} }}")
    for proto in ("tcp", "udp"):
        t = MAP_TIMEOUT_S[proto]
        value = "ct original ip saddr . ct original proto-src"
        if want_port_map:
            # external port -> internal address . port (full-cone inbound, hairpin)
            maps.append(f"map ext_{proto} {{ type inet_service : ipv4_addr . inet_service; "
                        f"flags dynamic,timeout; timeout {t}s; size 65535; }}")
            track.append(f'oifname "{c.wan_if}" ct direction original meta l4proto {proto} '
                         f"update @ext_{proto} {{ {proto} sport : {value} }}")
        if c.kind == "restricted-cone":
            maps.append(f"map adr_{proto} {{ type ipv4_addr . inet_service : ipv4_addr . inet_service; "
                        f"flags dynamic,timeout; timeout {t}s; size 65535; }}")
            track.append(f'oifname "{c.wan_if}" ct direction original meta l4proto {proto} '
                         f"update @adr_{proto} {{ ip daddr . {proto} sport : {value} }}")
            pre.append(f"{wan} ip daddr {c.wan_ip} meta l4proto {proto} "
                       f"dnat ip to ip saddr . {proto} dport map @adr_{proto}")
        if c.kind == "full-cone":
            pre.append(f"{wan} ip daddr {c.wan_ip} meta l4proto {proto} "
                       f"dnat ip to {proto} dport map @ext_{proto}")
        if c.hairpin:
            pre.append(f"{lan} ip daddr {c.wan_ip} meta l4proto {proto} "
                       f"dnat ip to {proto} dport map @ext_{proto}")
    if c.hairpin:
        # The hairpinned flow must look, to the target, like it came from our public side.
        post.append(f'oifname "{c.lan_if}" ip saddr {c.lan_net} ct status dnat snat ip to {c.wan_ip}')
    # Unsolicited traffic to the router itself: the row says drop or RST.
    inp = [f"{wan} ct state established,related accept"]
    if c.portmap_stun is not None:
        # The three answers of miniupnpd's STUN check that come from the server's other
        # address or port match no flow of ours: admit exactly those (before the drop).
        ip, alt, port = c.portmap_stun
        inp.append(f"{wan} ip saddr . udp sport {{ {ip} . {port + 1}, {alt} . {port}, "
                   f"{alt} . {port + 1} }} accept")
    if c.kind == "port-restricted-rst":
        inp += [f"{wan} meta l4proto tcp reject with tcp reset",
                f"{wan} meta l4proto udp reject with icmp type port-unreachable",
                f"{wan} drop"]
    else:
        inp.append(f"{wan} drop")
    if not c.hairpin:
        # No hairpin: a LAN host addressing our public address gets nothing back.
        inp.append(f"{lan} ip daddr {c.wan_ip} drop")

    def chain(name: str, head: str, rules: list[str]) -> str:
        body = "".join(f"    {r}\n" for r in rules)
        return f"  chain {name} {{\n    {head}\n{body}  }}\n"

    text = "table ip hpl_nat {\n"
    text += "".join(f"  {m}\n" for m in maps)
    text += chain("pre", "type nat hook prerouting priority dstnat; policy accept;", pre)
    text += chain("post", "type nat hook postrouting priority srcnat; policy accept;", post)
    # After srcnat (priority 100): the packet already carries its external source port. Only
    # flows started inside refresh the maps (`ct direction original`): replies of inbound flows
    # would otherwise point the mapping at the remote side.
    text += chain("track", "type filter hook postrouting priority 110; policy accept;", track)
    text += chain("inp", "type filter hook input priority filter; policy accept;", inp)
    text += "}\n"
    return text


def loss_ruleset(loss_pct: float) -> str:
    """Random loss on every packet forwarded by the core router (per direction, per crossing),
    IPv4 and IPv6 alike."""
    per_10k = round(loss_pct * 100)
    if per_10k <= 0:
        return ""
    return ("table inet hpl_loss {\n  chain forward_loss {\n"
            "    type filter hook forward priority -200; policy accept;\n"
            f"    numgen random mod 10000 < {per_10k} drop\n  }}\n}}\n")
