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
"""
from __future__ import annotations

import functools
import logging
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from . import _ns
from .miniupnpd import STUN_PORT
from .nat import NatConfig, loss_ruleset, ruleset, validate_type

log = logging.getLogger(__name__)

SERVER_IP, SERVER_ALT_IP, CORE_SERVER_GW = "203.0.113.10", "203.0.113.11", "203.0.113.1"
_PUBLIC = {"a": "198.51.100", "b": "192.0.2"}
_LAN = {"a": "10.0.1", "b": "192.168.1"}
_CARRIER = {"a": "100.64.1", "b": "100.64.2"}
_SHARED_LAN = "10.0.0"
DELAY_QUEUE = 0


@dataclass
class Node:
    name: str
    addrs: dict[str, list[str]] = field(default_factory=dict)   # ifname -> ["ip/len", ...]
    gateway: str | None = None
    router: bool = False
    nat: NatConfig | None = None
    bridge: tuple[str, list[str]] | None = None                  # (bridge, member ifnames)


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
    routers: dict[str, str] = field(default_factory=dict)   # peer -> its NAT node running miniupnpd


def plan(a: str, b: str, *, same_nat: bool = False, hairpin: bool = False,
         seq_offset: int = 0, portmap: tuple[str, ...] = ()) -> Plan:
    """The topology for peers of types `a` and `b` (with same_nat, both behind one NAT of type a);
    ``portmap``: the peers whose NAT router runs miniupnpd (UPnP IGD, NAT-PMP, PCP)."""
    validate_type(a)
    validate_type(b)
    if same_nat and a == "none":
        raise ValueError("same_nat needs a NAT: type 'none' puts each peer on its own public address")
    if hairpin and not same_nat:
        raise ValueError("hairpin applies only with same_nat=True (both peers behind one NAT)")
    p = Plan(nodes={}, links=[], private={}, public={}, types={})
    core = p.nodes["core"] = Node("core", router=True)
    server = p.nodes["server"] = Node("server", gateway=CORE_SERVER_GW)
    core.addrs["srv"] = [f"{CORE_SERVER_GW}/24"]
    server.addrs["eth0"] = [f"{SERVER_IP}/24", f"{SERVER_ALT_IP}/24"]
    p.links.append(Link("core", "srv", "server", "eth0"))
    if same_nat and a == "cgnat":
        _shared_carrier(p, hairpin)
    elif same_nat:
        _side(p, "a", ["a", "b"], a, hairpin, seq_offset, shared=True)
        p.types["b"] = a
    else:
        _side(p, "a", ["a"], a, False, seq_offset, shared=False)
        _side(p, "b", ["b"], b, False, seq_offset + 7, shared=False)
    for peer in portmap:
        _add_router(p, peer)
    return p


def _add_router(p: Plan, peer: str) -> None:
    """Mark the peer's own NAT router for miniupnpd (a carrier NAT in front would make its
    STUN check fail, and a public peer has no router)."""
    if peer not in ("a", "b"):
        raise ValueError(f"portmap is for the peers 'a' and 'b', not {peer!r}")
    kind = p.types[peer]
    if kind in ("none", "cgnat"):
        raise ValueError(f"a port-mapping router needs a single NAT in front of {peer}, "
                         f"not type {kind!r}")
    node = p.nodes["nat"] if "nat" in p.nodes else p.nodes[f"nat_{peer}"]
    assert node.nat is not None
    node.nat = replace(node.nat, portmap_stun=(SERVER_IP, SERVER_ALT_IP, STUN_PORT))
    p.routers[peer] = node.name


def _side(p: Plan, side: str, hosts: list[str], kind: str, hairpin: bool, seq_offset: int,
          *, shared: bool) -> None:
    pub = _PUBLIC[side]
    core_if = f"p{side}"
    p.nodes["core"].addrs[core_if] = [f"{pub}.1/24"]
    for h in hosts:
        p.types[h] = kind
    if kind == "none":
        (h,) = hosts
        p.nodes[h] = Node(h, addrs={"eth0": [f"{pub}.2/24"]}, gateway=f"{pub}.1")
        p.links.append(Link("core", core_if, h, "eth0"))
        p.private[h] = p.public[h] = f"{pub}.2"
        return
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


def _shared_carrier(p: Plan, hairpin: bool) -> None:
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
        p.private[h], p.public[h], p.types[h] = f"{lan}.2", f"{pub}.2", "cgnat"


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

    _write("/proc/sys/net/ipv6/conf/all/disable_ipv6", 1)
    _write("/proc/sys/net/ipv6/conf/default/disable_ipv6", 1)
    if node.router:
        _write("/proc/sys/net/ipv4/ip_forward", 1)
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
        for ifname, addrs in node.addrs.items():
            for cidr in addrs:
                ip, plen = cidr.split("/")
                ipr.addr("add", index=idx[ifname], address=ip, prefixlen=int(plen))
            ipr.link("set", index=idx[ifname], state="up")
        if node.gateway:
            ipr.route("add", dst="0.0.0.0/0", gateway=node.gateway)
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
        if delay:
            # --queue-bypass: packets pass undelayed whenever no delayer is bound to the queue.
            r = subprocess.run(["iptables", "-w", "-t", "mangle", "-A", "FORWARD", "-j", "NFQUEUE",
                                "--queue-num", str(DELAY_QUEUE), "--queue-bypass"],
                               capture_output=True, text=True, timeout=20)
            if r.returncode != 0:
                raise RuntimeError(f"iptables NFQUEUE rule failed: {r.stderr.strip()}")


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

    def make_links(links: list[Link]) -> None:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            for link in links:
                ipr.link("add", ifname=link.if_a, kind="veth",
                         peer={"ifname": link.if_b, "net_ns_fd": ns[link.node_b]})

    _ns.run_threads({f"links {c}": _ns.in_netns(ns[c], functools.partial(make_links, ls))
                     for c, ls in by_creator.items()})
    _ns.run_threads({f"configure {n}": _ns.in_netns(ns[n], functools.partial(
        _configure, node, conntrack, loss_pct, delay)) for n, node in p.nodes.items()})
    log.debug("lab %s built: %d namespaces, %d links", prefix, len(ns), len(p.links))
