"""The lab's shape: which namespaces, veth links, addresses, routes and NATs (a pure plan), and
the code that builds a plan with pyroute2 + nft, one thread per namespace, in parallel.

    server (203.0.113.10 + .11) ──┐
                                  core ── nat_a (WAN 198.51.100.2) ── a (10.0.1.2)
                                  │
                                  └──── nat_b (WAN 192.0.2.2) ──── b (192.168.1.2)

"none" puts the peer itself on the public side (198.51.100.2 / 192.0.2.2); "cgnat" puts a
carrier NAT ``cgn_X`` (WAN public, LAN 100.64.N.1) in front of the home NAT (WAN 100.64.N.2);
same_nat puts a and b on one bridged LAN (10.0.0.2 / .3) behind one NAT ``nat`` (for cgnat:
two home NATs on one bridged carrier LAN 100.64.0.0/24 behind one carrier NAT ``cgn``, the
realistic "same NAT" of two subscribers); hairpin is configured on that shared NAT. The core only
routes between directly connected public /24s, so nothing private is reachable from outside.
"no-ipv4" puts the peer on the public side with IPv6 only.

IPv6 (per side, `v6_a` / `v6_b`; "none" = no IPv6 on that side) has no NAT: every host has a
global address inside 2001:db8::/32, routed. The server has 2001:db8:0:10::10 and ::11; side X's
uplink is 2001:db8:0:X::/64 (core ::1, the side's first router or host ::2); its LAN is
2001:db8:X:1::/64 (router ::1, hosts ::2, ::3), a carrier link 2001:db8:X:ff::/64; the core
routes 2001:db8:X::/48 to the side. A side's firewall runs on its first hop (its router, or the
host itself when it sits on the public link), a blackhole at the core's port towards the side
(nat.v6_firewall_ruleset, nat.v6_blackhole_ruleset), whatever the IPv4 type.
"""
from __future__ import annotations

import functools
import logging
import os
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from . import _ns
from .miniupnpd import STUN_PORT
from .nat import (
    NO_IPV4,
    NatConfig,
    loss_ruleset,
    ruleset,
    v6_blackhole_ruleset,
    v6_firewall_ruleset,
    validate_type,
    validate_v6,
)

log = logging.getLogger(__name__)

SERVER_IP, SERVER_ALT_IP, CORE_SERVER_GW = "203.0.113.10", "203.0.113.11", "203.0.113.1"
_PUBLIC = {"a": "198.51.100", "b": "192.0.2"}
_LAN = {"a": "10.0.1", "b": "192.168.1"}
_CARRIER = {"a": "100.64.1", "b": "100.64.2"}
_SHARED_LAN = "10.0.0"
DELAY_QUEUE = 0
SERVER_IP6, SERVER_ALT_IP6, CORE_SERVER_GW6 = "2001:db8:0:10::10", "2001:db8:0:10::11", "2001:db8:0:10::1"
_PUBLIC6 = {"a": "2001:db8:0:a", "b": "2001:db8:0:b"}     # + "::N/64"
_SITE6 = {"a": "2001:db8:a", "b": "2001:db8:b"}           # + "::/48", routed to the side


@dataclass
class Node:
    name: str
    addrs: dict[str, list[str]] = field(default_factory=dict)   # ifname -> ["ip/len", ...]
    gateway: str | None = None
    router: bool = False
    nat: NatConfig | None = None
    bridge: tuple[str, list[str]] | None = None                  # (bridge, member ifnames)
    addrs6: dict[str, list[str]] = field(default_factory=dict)  # ifname -> ["ip6/64", ...]
    gateway6: str | None = None
    routes6: list[tuple[str, str]] = field(default_factory=list)  # (prefix, via)
    firewall6: tuple[str, str] | None = None                     # (behaviour, uplink ifname)
    blackhole6: list[str] = field(default_factory=list)          # core: sides' uplinks


@dataclass(frozen=True)
class Link:
    node_a: str
    if_a: str
    node_b: str
    if_b: str


@dataclass
class Plan:
    nodes: dict[str, Node]
    links: list[Link]
    private: dict[str, str]     # peer -> its own address
    public: dict[str, str]      # peer -> outermost public address
    types: dict[str, str]       # peer -> NAT type
    v6: dict[str, str] = field(default_factory=dict)        # peer -> IPv6 behaviour
    public6: dict[str, str] = field(default_factory=dict)   # peer -> its global IPv6 address
    routers: dict[str, str] = field(default_factory=dict)   # peer -> its NAT node running miniupnpd


def plan(a: str, b: str, *, same_nat: bool = False, hairpin: bool = False,
         seq_offset: int = 0, portmap: tuple[str, ...] = (), v6_a: str = "none",
         v6_b: str = "none") -> Plan:
    """The topology for peers of types `a` and `b` (with same_nat, both behind one NAT of type a);
    ``portmap``: the peers whose NAT router runs miniupnpd (UPnP IGD, NAT-PMP, PCP); IPv6
    behaviours `v6_a` and `v6_b` (with same_nat one uplink: v6_b must be v6_a)."""
    validate_type(a)
    validate_type(b)
    validate_v6(v6_a)
    validate_v6(v6_b)
    for peer, kind, v6 in (("a", a, v6_a), ("b", b, v6_b)):
        if kind == NO_IPV4 and v6 == "none":
            raise ValueError(f"peer {peer} would have neither IPv4 ({NO_IPV4}) nor IPv6 (none)")
    if same_nat and a in ("none", NO_IPV4):
        raise ValueError(f"same_nat needs a NAT: type {a!r} puts each peer on its own public address")
    if same_nat and v6_b not in ("none", v6_a):
        raise ValueError(f"same_nat: both peers share one uplink, so v6_b ({v6_b!r}) must be v6_a "
                         f"({v6_a!r})")
    if hairpin and not same_nat:
        raise ValueError("hairpin applies only with same_nat=True (both peers behind one NAT)")
    p = Plan(nodes={}, links=[], private={}, public={}, types={})
    core = p.nodes["core"] = Node("core", router=True)
    server = p.nodes["server"] = Node("server", gateway=CORE_SERVER_GW)
    core.addrs["srv"] = [f"{CORE_SERVER_GW}/24"]
    server.addrs["eth0"] = [f"{SERVER_IP}/24", f"{SERVER_ALT_IP}/24"]
    core.addrs6["srv"] = [f"{CORE_SERVER_GW6}/64"]
    server.addrs6["eth0"] = [f"{SERVER_IP6}/64", f"{SERVER_ALT_IP6}/64"]
    server.gateway6 = CORE_SERVER_GW6
    p.links.append(Link("core", "srv", "server", "eth0"))
    if same_nat and a == "cgnat":
        _shared_carrier(p, hairpin, v6_a)
    elif same_nat:
        _side(p, "a", ["a", "b"], a, hairpin, seq_offset, shared=True, v6=v6_a)
        p.types["b"] = a
    else:
        _side(p, "a", ["a"], a, False, seq_offset, shared=False, v6=v6_a)
        _side(p, "b", ["b"], b, False, seq_offset + 7, shared=False, v6=v6_b)
    if not p.public6:           # no side has IPv6: an IPv4-only lab, exactly as without IPv6
        core.addrs6.clear()
        server.addrs6.clear()
        server.gateway6 = None
    for peer in portmap:
        _add_router(p, peer)
    return p


def _uplink6(p: Plan, side: str, behaviour: str, first_hop: str, first_if: str,
             sites: list[str]) -> None:
    """IPv6 on side's uplink: core ::1 -- first_hop ::2, the sites' /48s routed to it."""
    pub6 = _PUBLIC6[side]
    core = p.nodes["core"]
    core.addrs6[f"p{side}"] = [f"{pub6}::1/64"]
    core.routes6 += [(f"{_SITE6[s]}::/48", f"{pub6}::2") for s in sites]
    hop = p.nodes[first_hop]
    hop.addrs6[first_if] = [f"{pub6}::2/64"]
    hop.gateway6 = f"{pub6}::1"
    if behaviour == "blackhole":
        core.blackhole6.append(f"p{side}")
    elif behaviour in ("firewall", "firewall-rst"):
        hop.firewall6 = (behaviour, first_if)


def _lan6(p: Plan, router: str, lan_if: str, site: str, hosts: list[str], ifs: list[str]) -> None:
    """A LAN 2001:db8:<site>:1::/64 behind `router` (::1), hosts ::2, ::3..."""
    lan6 = f"{_SITE6[site]}:1"
    p.nodes[router].addrs6[lan_if] = [f"{lan6}::1/64"]
    for i, (h, ifname) in enumerate(zip(hosts, ifs, strict=True)):
        p.nodes[h].addrs6[ifname] = [f"{lan6}::{2 + i}/64"]
        p.nodes[h].gateway6 = f"{lan6}::1"
        p.public6[h] = f"{lan6}::{2 + i}"


def _add_router(p: Plan, peer: str) -> None:
    """Mark the peer's own NAT router for miniupnpd (a carrier NAT in front would make its
    STUN check fail, and a public peer has no router)."""
    if peer not in ("a", "b"):
        raise ValueError(f"portmap is for the peers 'a' and 'b', not {peer!r}")
    kind = p.types[peer]
    if kind in ("none", "cgnat", NO_IPV4):
        raise ValueError(f"a port-mapping router needs a single NAT in front of {peer}, "
                         f"not type {kind!r}")
    node = p.nodes["nat"] if "nat" in p.nodes else p.nodes[f"nat_{peer}"]
    assert node.nat is not None
    node.nat = replace(node.nat, portmap_stun=(SERVER_IP, SERVER_ALT_IP, STUN_PORT))
    p.routers[peer] = node.name


def _side(p: Plan, side: str, hosts: list[str], kind: str, hairpin: bool, seq_offset: int,
          *, shared: bool, v6: str) -> None:
    pub = _PUBLIC[side]
    core_if = f"p{side}"
    for h in hosts:
        p.types[h] = kind
        p.v6[h] = v6
    if kind in ("none", NO_IPV4):
        (h,) = hosts
        p.nodes[h] = Node(h, gateway=None if kind == NO_IPV4 else f"{pub}.1")
        if kind == "none":
            p.nodes["core"].addrs[core_if] = [f"{pub}.1/24"]
            p.nodes[h].addrs["eth0"] = [f"{pub}.2/24"]
            p.private[h] = p.public[h] = f"{pub}.2"
        p.links.append(Link("core", core_if, h, "eth0"))
        if v6 != "none":
            _uplink6(p, side, v6, h, "eth0", [])
            p.public6[h] = f"{_PUBLIC6[side]}::2"
        return
    p.nodes["core"].addrs[core_if] = [f"{pub}.1/24"]
    suffix = "" if shared else f"_{side}"
    home = f"nat{suffix}"
    lan = _SHARED_LAN if shared else _LAN[side]
    hop = "port-restricted" if kind == "cgnat" else kind
    if kind == "cgnat":
        carrier, cg = f"cgn{suffix}", _CARRIER[side]
        p.nodes[carrier] = Node(carrier, addrs={"wan": [f"{pub}.2/24"], "lan": [f"{cg}.1/24"]},
                                gateway=f"{pub}.1", router=True,
                                nat=NatConfig("port-restricted", "wan", f"{pub}.2", "lan", f"{cg}.0/24"))
        p.links.append(Link("core", core_if, carrier, "wan"))
        p.links.append(Link(carrier, "lan", home, "wan"))
        home_wan, home_gw = f"{cg}.2", f"{cg}.1"
    else:
        p.links.append(Link("core", core_if, home, "wan"))
        home_wan, home_gw = f"{pub}.2", f"{pub}.1"
    node = p.nodes[home] = Node(home, addrs={"wan": [f"{home_wan}/24"], "lan": [f"{lan}.1/24"]},
                                gateway=home_gw, router=True,
                                nat=NatConfig(hop, "wan", home_wan, "lan", f"{lan}.0/24",
                                              hairpin=hairpin, seq_offset=seq_offset))
    if shared:
        node.bridge = ("lan", [f"lan{i}" for i in range(len(hosts))])
    for i, h in enumerate(hosts):
        p.nodes[h] = Node(h, addrs={"eth0": [f"{lan}.{2 + i}/24"]}, gateway=f"{lan}.1")
        p.links.append(Link(home, f"lan{i}" if shared else "lan", h, "eth0"))
        p.private[h] = f"{lan}.{2 + i}"
        p.public[h] = f"{pub}.2"
    if v6 != "none":
        if kind == "cgnat":     # the carrier routes the subscriber's /48 to the home router
            car6 = f"{_SITE6[side]}:ff"
            _uplink6(p, side, v6, f"cgn{suffix}", "wan", [side])
            p.nodes[f"cgn{suffix}"].addrs6["lan"] = [f"{car6}::1/64"]
            p.nodes[f"cgn{suffix}"].routes6.append((f"{_SITE6[side]}::/48", f"{car6}::2"))
            node.addrs6["wan"] = [f"{car6}::2/64"]
            node.gateway6 = f"{car6}::1"
        else:
            _uplink6(p, side, v6, home, "wan", [side])
        _lan6(p, home, "lan", side, hosts, ["eth0"] * len(hosts))


def _shared_carrier(p: Plan, hairpin: bool, v6: str) -> None:
    """Two subscribers of one carrier: a and b each behind a home NAT, both behind one CGN."""
    pub, cg = _PUBLIC["a"], "100.64.0"
    p.nodes["core"].addrs["pa"] = [f"{pub}.1/24"]
    p.nodes["cgn"] = Node("cgn", addrs={"wan": [f"{pub}.2/24"], "lan": [f"{cg}.1/24"]},
                          gateway=f"{pub}.1", router=True, bridge=("lan", ["lan0", "lan1"]),
                          nat=NatConfig("port-restricted", "wan", f"{pub}.2", "lan", f"{cg}.0/24",
                                        hairpin=hairpin))
    p.links.append(Link("core", "pa", "cgn", "wan"))
    for i, h in enumerate(("a", "b")):
        home, lan, home_wan = f"nat_{h}", _LAN[h], f"{cg}.{2 + i}"
        p.nodes[home] = Node(home, addrs={"wan": [f"{home_wan}/24"], "lan": [f"{lan}.1/24"]},
                             gateway=f"{cg}.1", router=True,
                             nat=NatConfig("port-restricted", "wan", home_wan, "lan", f"{lan}.0/24"))
        p.nodes[h] = Node(h, addrs={"eth0": [f"{lan}.2/24"]}, gateway=f"{lan}.1")
        p.links += [Link("cgn", f"lan{i}", home, "wan"), Link(home, "lan", h, "eth0")]
        p.private[h], p.public[h], p.types[h], p.v6[h] = f"{lan}.2", f"{pub}.2", "cgnat", v6
    if v6 != "none":            # one uplink; the carrier LAN 2001:db8:a:ff::/64 holds both homes
        car6 = f"{_SITE6['a']}:ff"
        _uplink6(p, "a", v6, "cgn", "wan", ["a", "b"])
        p.nodes["cgn"].addrs6["lan"] = [f"{car6}::1/64"]
        for i, h in enumerate(("a", "b")):
            home = f"nat_{h}"
            p.nodes[home].addrs6["wan"] = [f"{car6}::{2 + i}/64"]
            p.nodes[home].gateway6 = f"{car6}::1"
            p.nodes["cgn"].routes6.append((f"{_SITE6[h]}::/48", f"{car6}::{2 + i}"))
            _lan6(p, home, "lan", h, [h], ["eth0"])


# --- building -------------------------------------------------------------------------------

BRIDGE_NF = "/proc/sys/net/bridge/bridge-nf-call-iptables"   # per namespace


def _write(path: str, value: object) -> None:
    with open(path, "w") as f:
        f.write(f"{value}\n")


def _nft(text: str, what: str) -> None:
    r = subprocess.run(["nft", "-f", "-"], input=text, capture_output=True, text=True, timeout=20)
    if r.returncode != 0:
        raise RuntimeError(f"nft rejected the {what} ruleset: {r.stderr.strip()}")


def _configure(node: Node, conntrack: dict[str, int], loss_pct: float, delay: bool) -> None:
    """Runs in a thread that is inside the node's namespace."""
    from pyroute2 import IPRoute  # type: ignore[import-untyped]

    v6 = bool(node.addrs6)
    if v6:
        # Static addresses, usable at once: no duplicate address detection, no SLAAC.
        for conf in ["all", "default", *os.listdir("/proc/sys/net/ipv6/conf")]:
            for key, value in (("accept_dad", 0), ("accept_ra", 0), ("autoconf", 0)):
                _write(f"/proc/sys/net/ipv6/conf/{conf}/{key}", value)
    _write("/proc/sys/net/ipv6/conf/all/disable_ipv6", 0 if v6 else 1)
    _write("/proc/sys/net/ipv6/conf/default/disable_ipv6", 0 if v6 else 1)
    if node.router:
        _write("/proc/sys/net/ipv4/ip_forward", 1)
        if v6:
            _write("/proc/sys/net/ipv6/conf/all/forwarding", 1)
    with IPRoute() as ipr:
        idx = {link.get("ifname"): link["index"] for link in ipr.get_links()}
        ipr.link("set", index=idx["lo"], state="up")
        if node.bridge:
            br, members = node.bridge
            ipr.link("add", ifname=br, kind="bridge")
            idx[br] = ipr.link_lookup(ifname=br)[0]
            for m in members:
                ipr.link("set", index=idx[m], master=idx[br], state="up")
            # With br_netfilter loaded (by anything on the host), the bridge would run
            # netfilter at layer 2: a hairpin DNAT'ed to a host on the same bridge is then
            # bridged straight back, never SNAT'ed, and dropped at its own port. Routed
            # traffic only, as on a real router, whatever the host has loaded.
            if os.path.exists(BRIDGE_NF):
                _write(BRIDGE_NF, 0)
        for ifname in {**node.addrs, **node.addrs6}:
            for cidr in node.addrs.get(ifname, []) + node.addrs6.get(ifname, []):
                ip, plen = cidr.split("/")
                ipr.addr("add", index=idx[ifname], address=ip, prefixlen=int(plen))
            ipr.link("set", index=idx[ifname], state="up")
        if node.gateway:
            ipr.route("add", dst="0.0.0.0/0", gateway=node.gateway)
        if node.gateway6:
            ipr.route("add", dst="::/0", gateway=node.gateway6, family=socket.AF_INET6)
        for prefix, via in node.routes6:
            ipr.route("add", dst=prefix, gateway=via, family=socket.AF_INET6)
    if node.firewall6 is not None:
        behaviour, ifname = node.firewall6
        _nft(v6_firewall_ruleset(behaviour, ifname, host=not node.router), f"{node.name} IPv6 firewall")
    if node.nat is not None:
        _nft(ruleset(node.nat), f"{node.name} NAT")
        for key, value in conntrack.items():
            path = f"/proc/sys/net/netfilter/nf_conntrack_{key}"
            if not os.path.exists(path):
                raise RuntimeError(f"unknown conntrack setting {key!r} (no {path})")
            _write(path, int(value))
    if node.name == "core":
        if loss_pct > 0:
            _nft(loss_ruleset(loss_pct), "loss")
        if v6_rules := v6_blackhole_ruleset(node.blackhole6):
            _nft(v6_rules, "IPv6 blackhole")
        if delay:
            # --queue-bypass: packets pass undelayed whenever no delayer is bound to the queue.
            for tool in ("iptables", "ip6tables"):
                r = subprocess.run([tool, "-w", "-t", "mangle", "-A", "FORWARD", "-j", "NFQUEUE",
                                    "--queue-num", str(DELAY_QUEUE), "--queue-bypass"],
                                   capture_output=True, text=True, timeout=20)
                if r.returncode != 0:
                    raise RuntimeError(f"{tool} NFQUEUE rule failed: {r.stderr.strip()}")


LINKS_UP_TIMEOUT_S = 3.0
VETH_INDEX_BASE = 100


def _await_links_up() -> None:
    """Until every link here is operationally up. IPv6 (unlike IPv4) sends nothing through a
    link whose operstate the kernel has not yet raised (linkwatch runs a moment after the
    peer's end comes up): a SYN sent right after the lab is up would be dropped."""
    from pyroute2 import IPRoute

    deadline = time.monotonic() + LINKS_UP_TIMEOUT_S
    with IPRoute() as ipr:
        while True:
            waiting = [link.get("ifname") for link in ipr.get_links()
                       if link.get("ifname") != "lo" and link.get("operstate") != "UP"]
            if not waiting:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"links not up after {LINKS_UP_TIMEOUT_S} s: {', '.join(waiting)}")
            time.sleep(0.005)


def build(prefix: str, p: Plan, *, conntrack: dict[str, int], loss_pct: float, delay: bool,
          after_namespaces: Callable[[], None] | None = None) -> None:
    """Create every namespace, link and rule of `p`, each namespace named prefix + '-' + node;
    `after_namespaces` runs as soon as the (empty) namespaces exist."""
    ns = {n: f"{prefix}-{n}" for n in p.nodes}
    _ns.create_many(list(ns.values()))
    if after_namespaces is not None:
        after_namespaces()
    by_creator: dict[str, list[Link]] = {}
    for link in p.links:
        by_creator.setdefault(link.node_a, []).append(link)

    # Every veth end gets an interface index unique in the lab: the kernel handles a link
    # whose index equals its peer's (likely when both ends are the 2nd link of their
    # namespace) as a non-urgent event and raises its operstate up to a second late, and
    # IPv6 sends nothing through it until then.
    index = {link: VETH_INDEX_BASE + 2 * i for i, link in enumerate(p.links)}

    def make_links(links: list[Link]) -> None:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            for link in links:
                ipr.link("add", ifname=link.if_a, kind="veth", index=index[link],
                         peer={"ifname": link.if_b, "net_ns_fd": ns[link.node_b],
                               "index": index[link] + 1})

    _ns.run_threads({f"links {c}": _ns.in_netns(ns[c], functools.partial(make_links, ls))
                     for c, ls in by_creator.items()})
    _ns.run_threads({f"configure {n}": _ns.in_netns(ns[n], functools.partial(
        _configure, node, conntrack, loss_pct, delay)) for n, node in p.nodes.items()})
    _ns.run_threads({f"settle {n}": _ns.in_netns(ns[n], _await_links_up)
                     for n, node in p.nodes.items() if node.addrs6})
    log.debug("lab %s built: %d namespaces, %d links", prefix, len(ns), len(p.links))
