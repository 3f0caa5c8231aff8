"""`pyholepunch nat-type`: classify the NAT in front of this host.

Human table by default; ``--json`` prints ``{"profiles": {"udp": NatProfile.to_dict(), ...}}``
(the stable schema documented in the README). Exit code 0 when every requested transport
was classified at least partly, 1 when the server could not be used at all.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from ..nat.classify import classify_nat
from ..nat.profile import NatProfile
from .args import address, positive_float

SCHEMA_VERSION = 1


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
    profiles: dict[str, NatProfile] = {}
    took: dict[str, float] = {}
    for kind in kinds:
        start = time.monotonic()
        if not args.json:
            print(f"probing {kind.upper()} via {host}:{port} ...", file=sys.stderr)  # noqa: T201
        profiles[kind] = await classify_nat(server, transport=kind, local_ip=args.local_ip,
                                            alt_server=alt, timeout=args.timeout)
        took[kind] = round(time.monotonic() - start, 3)
    portmap = None if args.no_portmap else await _try_portmap(server[0], args.local_ip, profiles)
    if args.json:
        doc: dict[str, Any] = {"schema": SCHEMA_VERSION,
                               "profiles": {k: p.to_dict() for k, p in profiles.items()},
                               "seconds": took, "portmap": portmap}
        print(json.dumps(doc, indent=2, sort_keys=True))  # noqa: T201  (CLI output)
    else:
        print(render_table(profiles, took))  # noqa: T201  (CLI output)
        print(_portmap_line(portmap))  # noqa: T201  (CLI output)
    failed = [k for k, p in profiles.items() if p.not_learned[:1] and
              p.not_learned[0].startswith("everything:")]
    return 1 if failed else 0


async def _try_portmap(server_ip: str, local_ip: str | None,
                       profiles: dict[str, NatProfile]) -> dict[str, Any]:
    """Ask the router on the path to map a TCP port for a moment (then delete it): the TCP
    profile says "via PCP/NAT-PMP/UPnP" when one did. Returns what the probe found."""
    import socket

    from ..punch_mapping import PunchPortMapping
    from ..stun.probe import route_source_ip

    ip = local_ip or route_source_ip(server_ip)
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
        row("took", lambda p: f"{took.get(str(p.transport), 0):.3f} s")
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    notes = [f"{k.upper()}: {n}" for k, p in profiles.items() for n in p.not_learned]
    if notes:
        lines += ["", "not learned:"] + [f"  - {n}" for n in notes]
    return "\n".join(lines)
