"""`pyholepunch lab up|exec|down|verify|list`: the NAT lab from the command line.

    pyholepunch lab up --a port-restricted --b symmetric-seq --rtt-ms 40   # runs until Ctrl-C
    pyholepunch lab up --a cgnat --v6-a firewall --b no-ipv4 --v6-b open   # dual stack
    pyholepunch lab exec hpl1a2b3 a -- ip addr
    pyholepunch lab down hpl1a2b3          # or: lab down --all-mine (leftovers of crashed runs)
    pyholepunch lab verify [--type T ...] [--v6 B ...] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from typing import Any

from ..lab import state
from ..lab.nat import NAT_TYPES, V4_TYPES, V6_BEHAVIOURS

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _say(text: str, err: bool = False) -> None:
    """CLI output: one line, flushed (a parent may be reading line by line)."""
    stream = sys.stderr if err else sys.stdout
    stream.write(f"{text}\n")
    stream.flush()


def _conntrack_arg(text: str) -> tuple[str, int]:
    key, sep, value = text.partition("=")
    if not sep or not value.isdigit():
        raise argparse.ArgumentTypeError(
            f"expected KEY=SECONDS, e.g. tcp_timeout_established=30, got {text!r}")
    return key, int(value)


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="lab_command", metavar="ACTION", required=True)
    up = sub.add_parser("up", help="build a lab and keep it until Ctrl-C or `lab down NAME`")
    up.add_argument("--a", default="port-restricted", choices=V4_TYPES, help="NAT type of peer a")
    up.add_argument("--b", default="port-restricted", choices=V4_TYPES, help="NAT type of peer b")
    up.add_argument("--v6-a", default="none", choices=V6_BEHAVIOURS, help="IPv6 behaviour of a's side")
    up.add_argument("--v6-b", default="none", choices=V6_BEHAVIOURS, help="IPv6 behaviour of b's side")
    up.add_argument("--rtt-ms", type=float, default=0.0, help="RTT between any two hosts")
    up.add_argument("--jitter-ms", type=float, default=0.0, help="± per crossing of the core")
    up.add_argument("--loss", type=float, default=0.0, metavar="PCT", help="packet loss in the core, percent")
    up.add_argument("--same-nat", action="store_true", help="both peers behind one NAT of type --a")
    up.add_argument("--hairpin", action="store_true", help="with --same-nat: the NAT hairpins")
    up.add_argument("--conntrack", type=_conntrack_arg, action="append", default=[], metavar="KEY=S",
                    help="per-NAT conntrack sysctl, e.g. tcp_timeout_established=30 (repeatable)")
    up.add_argument("--portmap-a", action="store_true",
                    help="run miniupnpd (UPnP IGD, NAT-PMP, PCP) on peer a's NAT router")
    up.add_argument("--portmap-b", action="store_true", help="the same on peer b's NAT router")
    up.add_argument("--background-rate", type=float, default=0.0, metavar="PER_S",
                    help="a background host behind each NAT opens this many new TCP connections "
                         "(and UDP flows) per second to the server host")
    up.add_argument("--json", action="store_true", help="print the lab description as JSON")
    ex = sub.add_parser("exec", help="run a command inside a lab node")
    ex.add_argument("name")
    ex.add_argument("node")
    ex.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    down = sub.add_parser("down", help="tear a lab down")
    g = down.add_mutually_exclusive_group(required=True)
    g.add_argument("name", nargs="?")
    g.add_argument("--all-mine", action="store_true",
                   help="remove every hpl* lab whose owning process is gone")
    ver = sub.add_parser("verify", help="measure every NAT type and compare with the table in docs/lab.md")
    ver.add_argument("--type", action="append", choices=NAT_TYPES, dest="types",
                     help="only this type (repeatable); default: all eight")
    ver.add_argument("--v6", action="append", choices=V6_BEHAVIOURS, dest="v6",
                     help="only this IPv6 behaviour (repeatable); default: all five "
                          "(none of them when only --type is given)")
    ver.add_argument("--json", action="store_true")
    sub.add_parser("list", help="labs on this machine and whether their owner is alive")


class _Stop(Exception):
    pass


def _up(args: argparse.Namespace) -> int:
    from ..lab import Lab

    lab = Lab(a=args.a, b=args.b, rtt_ms=args.rtt_ms, jitter_ms=args.jitter_ms, loss_pct=args.loss,
              same_nat=args.same_nat, hairpin=args.hairpin, conntrack=dict(args.conntrack),
              portmap_a=args.portmap_a, portmap_b=args.portmap_b, v6_a=args.v6_a, v6_b=args.v6_b,
              background_rate=args.background_rate)

    def stop(signum: int, frame: Any) -> None:
        raise _Stop

    old = signal.signal(signal.SIGTERM, stop)
    try:
        with lab:
            info = lab.describe() | {"netns": {n: lab.netns(n) for n in lab.nodes},
                                     "startup_s": round(lab.startup_s or 0, 4)}
            if args.json:
                _say(json.dumps(info))
            else:
                _say(f"lab {lab.name} up in {info['startup_s']:.3f} s (a={lab.a_type}, b={lab.b_type})")
                _say(f"  server  {lab.server_ip} + {lab.server_alt_ip}")
                if info["public6"]:
                    _say(f"  server  {lab.server_ip6} + {lab.server_alt_ip6}")
                for peer in ("a", "b"):
                    v4 = (f"{lab.private_ip(peer)} -> public {lab.public_ip(peer)}"
                          if peer in info["public"] else "no IPv4")
                    v6 = (f"; IPv6 {info['public6'][peer]} ({lab.v6_behaviour(peer)})"
                          if peer in info["public6"] else "")
                    _say(f"  {peer}       {v4}{v6}")
                _say(f"  nodes   {' '.join(lab.nodes)}")
                for peer, rate in lab.background_rate.items():
                    _say(f"  {peer}'s LAN has a background host opening {rate:g} flows/s")
                for peer, router in lab.routers.items():
                    _say(f"  {peer}'s router {router.node} runs miniupnpd (UPnP IGD, NAT-PMP, PCP)")
                _say(f"  try:    pyholepunch lab exec {lab.name} a -- ip addr")
                _say(f"  stop:   Ctrl-C or `pyholepunch lab down {lab.name}`")
            threading.Event().wait()  # until a signal
    except (KeyboardInterrupt, _Stop):
        pass
    finally:
        signal.signal(signal.SIGTERM, old)
    return EXIT_OK


def _exec(args: argparse.Namespace) -> int:
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        _say("pyholepunch lab exec: give a command after --", err=True)
        return EXIT_USAGE
    name = state.check_name(args.name)
    spaces = state.namespaces_of(name)
    ns = f"{name}-{args.node}"
    if ns not in spaces:
        nodes = ", ".join(s.split("-", 1)[1] for s in spaces) or "none (is the lab up?)"
        _say(f"pyholepunch lab exec: no node {args.node!r} in lab {name}; nodes: {nodes}", err=True)
        return EXIT_FAILED
    sys.stdout.flush()
    os.execvp("ip", ["ip", "netns", "exec", ns, *cmd])
    return EXIT_FAILED  # not reached


def _down(args: argparse.Namespace) -> int:
    if args.all_mine:
        removed = state.down_all_mine()
        for name, spaces in removed.items():
            _say(f"removed {name} ({len(spaces)} namespaces)")
        if not removed:
            _say("no leftover labs")
        return EXIT_OK
    name = state.check_name(args.name)
    if not state.namespaces_of(name) and state.read(name) is None:
        _say(f"pyholepunch lab down: no lab {name}", err=True)
        return EXIT_FAILED
    spaces = state.down(name)
    _say(f"{name} down ({len(spaces)} namespaces removed)")
    return EXIT_OK


def _verify(args: argparse.Namespace) -> int:
    from ..lab import _ns, verify, verify6

    _ns.require_support()
    results = [] if args.v6 and not args.types else verify.verify(args.types)
    results6 = [] if args.types and not args.v6 else verify6.verify6(args.v6)
    if args.json:
        _say(json.dumps(verify.as_json(results) + verify6.as_json6(results6), indent=2))
    else:
        _say("\n\n".join(t for t in (results and verify.table(results),
                                      results6 and verify6.table6(results6)) if t))
    ok = all(m.ok for m in results) and all(m.ok for m in results6)
    return EXIT_OK if ok else EXIT_FAILED


def _list(args: argparse.Namespace) -> int:
    for name in state.lab_names():
        rec = state.read(name) or {}
        owner = f"pid {rec.get('pid')}" if state.owner_alive(rec) else "owner gone"
        _say(f"{name}  a={rec.get('a', '?')} b={rec.get('b', '?')}  "
              f"{len(state.namespaces_of(name))} namespaces  {owner}")
    return EXIT_OK


def run(args: argparse.Namespace) -> int:
    try:
        return {"up": _up, "exec": _exec, "down": _down, "verify": _verify,
                "list": _list}[args.lab_command](args)
    except ValueError as exc:
        _say(f"pyholepunch lab {args.lab_command}: {exc}", err=True)
        return EXIT_USAGE
