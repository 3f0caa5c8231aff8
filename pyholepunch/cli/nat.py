"""`pyholepunch nat-type`: classify the NAT in front of this host.

Human table by default; ``--json`` prints ``{"schema": 2, "profiles": {"ipv4": {"udp":
NatProfile.to_dict(), ...}, "ipv6": {...}}, ...}`` (the stable schema documented in the
README): one profile per transport and address family. The family of ``--server`` is
classified first; a dual-stack server names its address in the other family (STUN
OTHER-FAMILY-ADDRESS), which is then classified too (a family this host cannot reach it in
gets a profile whose ``not_learned`` says why). Exit code 0 when every requested transport
was classified at least partly in the server's family, 1 when the server could not be used.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from ..address import Address, format_address
from ..errors import HolePunchError
from ..nat.classify import classify_nat
from ..nat.profile import Family, NatProfile
from .args import address, positive_float

SCHEMA_VERSION = 2           # 2: profiles per address family, then per transport


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", required=True, type=address(3478), metavar="HOST:PORT",
                        help="STUN server (RFC 5780 with --alt-ip gives the full picture)")
    parser.add_argument("--alt-server", type=address(3478), metavar="HOST:PORT",
                        help="a second plain STUN server on another IP, for the mapping test "
                             "when the first server has no alternate address")
    parser.add_argument("--transport", choices=("udp", "tcp", "both"), default="both")
    parser.add_argument("--local-ip", help="local address to probe from (default: the route's)")
    parser.add_argument("--timeout", type=positive_float, default=3.0,
                        help="seconds to wait for the server's first answer (default 3)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--no-portmap", action="store_true",
                        help="do not ask the router for a port mapping (NAT-PMP, PCP, UPnP)")


async def run(args: argparse.Namespace) -> int:
    import socket
    host, port = args.server
    try:   # names are resolved once here; the probes work on addresses
        server = (str(socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0][4][0]), port)
        alt = None
        if args.alt_server:
            ah, ap = args.alt_server
            alt = (str(socket.getaddrinfo(ah, ap, type=socket.SOCK_DGRAM)[0][4][0]), ap)
    except socket.gaierror as exc:
        print(f"pyholepunch nat-type: cannot resolve {host!r}: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    kinds = ("udp", "tcp") if args.transport == "both" else (args.transport,)
    servers: dict[str, Address] = {Family.of(server[0]): server}
    profiles: dict[str, dict[str, NatProfile]] = {}
    took: dict[str, dict[str, float]] = {}
    for fam in _families_as_found(servers):
        srv = servers[fam]
        local_ip = args.local_ip if fam == Family.of(server[0]) else None
        profiles[fam], took[fam] = {}, {}
        for kind in kinds:
            start = time.monotonic()
            if not args.json:
                print(f"probing {kind.upper()} over {fam} via {format_address(srv)} ...",  # noqa: T201
                      file=sys.stderr)
            profile = await classify_nat(srv, transport=kind, local_ip=local_ip,
                                         alt_server=alt if srv is server else None,
                                         timeout=args.timeout)
            profiles[fam][kind] = profile.evolve(family=Family(fam))
            took[fam][kind] = round(time.monotonic() - start, 3)
        if srv is server and not _failed(profiles[fam][kinds[0]]):
            other = await _other_family(server, kinds[0], local_ip)
            if other is not None:
                servers[Family.of(other[0])] = other
    portmap = None
    if not args.no_portmap and "ipv4" in profiles:   # a router's mapping: IPv4 behind its NAT
        portmap = await _try_portmap(servers["ipv4"][0], args.local_ip if servers["ipv4"] is server
                                     else None, profiles["ipv4"])
    if args.json:
        doc: dict[str, Any] = {
            "schema": SCHEMA_VERSION,
            "profiles": {f: {k: p.to_dict() for k, p in by.items()} for f, by in profiles.items()},
            "servers": {f: format_address(a) for f, a in servers.items()},
            "seconds": took, "portmap": portmap}
        print(json.dumps(doc, indent=2, sort_keys=True))  # noqa: T201  (CLI output)
    else:
        flat = {(f"{k} {f}" if len(profiles) > 1 else k): p
                for f, by in profiles.items() for k, p in by.items()}
        flat_took = {(f"{k} {f}" if len(profiles) > 1 else k): t
                     for f, by in took.items() for k, t in by.items()}
        print(render_table(flat, flat_took))  # noqa: T201  (CLI output)
        print(_portmap_line(portmap))  # noqa: T201  (CLI output)
    failed = [k for k, p in profiles[Family.of(server[0])].items() if _failed(p)]
    return 1 if failed else 0


def _families_as_found(servers: dict[str, Address]) -> Any:
    """The families in ``servers`` as it grows: the given server's first."""
    done: set[str] = set()
    while (todo := [f for f in servers if f not in done]):
        done.add(todo[0])
        yield todo[0]


def _failed(p: NatProfile) -> bool:
    return bool(p.not_learned[:1]) and p.not_learned[0].startswith("everything:")


async def _other_family(server: Address, transport: str, local_ip: str | None) -> Address | None:
    """The server's address in the other family (OTHER-FAMILY-ADDRESS), if it names one."""
    from ..stun.client import any_address, stun_binding
    try:
        result = await stun_binding(server, transport=transport,
                                    local=((local_ip, 0) if local_ip else any_address(server)))
    except (OSError, HolePunchError):
        return None
    return result.other_family


async def _try_portmap(server_ip: str, local_ip: str | None,
                       profiles: dict[str, NatProfile]) -> dict[str, Any]:
    """Ask the router on the path to map a TCP port for a moment (then delete it): the TCP
    profile says "via PCP/NAT-PMP/UPnP" when one did. Returns what the probe found."""
    import socket

    from ..address import route_source
    from ..punch_mapping import PunchPortMapping

    ip = local_ip or route_source(server_ip)
    pm = PunchPortMapping(server_ip, ip, on_change=lambda: None)
    if pm.mapper is None:
        return {"gateway": None, "available": [], "mapped_by": None}
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((ip, 0))
        try:
            await pm.follow(sock.getsockname()[1])
            if "tcp" in profiles:
                profiles["tcp"] = pm.profile(profiles["tcp"])
        finally:
            await pm.close()
    probed = pm.mapper.probed
    return {"gateway": pm.mapper.gateway, "available": list(probed.available if probed else ()),
            "mapped_by": pm.mapping.label if pm.mapping is not None else None}


def _portmap_line(portmap: dict[str, Any] | None) -> str:
    if portmap is None:
        return "port mapping: not asked (--no-portmap)"
    if portmap["gateway"] is None:
        return "port mapping: no router on the path to the server"
    from ..portmap import LABELS

    answered = ", ".join(LABELS[p] for p in portmap["available"]) or "nothing answered"
    got = f"mapped via {portmap['mapped_by']}" if portmap["mapped_by"] else "no mapping granted"
    return f"port mapping: router {portmap['gateway']}: {answered}; {got}"


def render_table(profiles: dict[str, NatProfile], took: dict[str, float] | None = None) -> str:
    kinds = list(profiles)
    rows: list[tuple[str, ...]] = [("", *[k.upper() for k in kinds])]

    def row(name: str, fn: Any) -> None:
        rows.append((name, *[fn(profiles[k]) for k in kinds]))

    def row_by_key(name: str, fn: Any) -> None:
        rows.append((name, *[fn(k) for k in kinds]))

    def conf(p: NatProfile, key: str, value: str) -> str:
        c = p.confidence.get(key)
        return f"{value} ({c:.0%})" if c is not None and value != "unknown" else value

    row("NAT type", lambda p: p.label)
    row("mapping", lambda p: conf(p, "mapping", str(p.mapping)))
    row("filtering", lambda p: conf(p, "filtering", str(p.filtering)))
    row("allocation", lambda p: conf(p, "allocation", str(p.allocation)
                                     + (f" {p.delta:+d}" if p.delta is not None else "")))
    row("hairpin", lambda p: "unknown" if p.hairpin is None else ("yes" if p.hairpin else "no"))
    row("unsolicited SYN", lambda p: str(p.unsolicited_syn) if p.transport == "tcp" else "n/a")
    row("public IPs", lambda p: ", ".join(p.public_ips) or "-")
    row("local IPs", lambda p: ", ".join(p.local_ips) or "-")
    if took:
        row_by_key("took", lambda k: f"{took.get(k, 0):.3f} s")
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    notes = [f"{k.upper()}: {n}" for k, p in profiles.items() for n in p.not_learned]
    if notes:
        lines += ["", "not learned:"] + [f"  - {n}" for n in notes]
    return "\n".join(lines)
