"""Background hosts behind a lab NAT: other machines' traffic, so a NAT's state moves on its own.

A real sequential NAT (a CGNAT, a corporate gateway) hands its next port to whoever opens the
next flow; between a peer's classification and its punch, other hosts take ports. This module
is that other host: ``python -m pyholepunch.lab.background gen ...`` runs inside a peer's
namespace from an extra LAN address of its own (``Lab`` adds it: another host on the LAN, as
far as the NAT can tell) and opens new outbound TCP connections and UDP flows to the server
host at a fixed rate; ``... sink ...`` runs on the server host and accepts and closes them.

Bounded: at most ``--max`` flows of each kind and ``--duration`` seconds, whatever the rate;
both modes exit on SIGTERM and are stopped by PID at the lab's teardown. Only the address the
lab gives (the lab's server host) is ever addressed.
"""
from __future__ import annotations

import argparse
import contextlib
import signal
import socket
import sys
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..errors import LabError

if TYPE_CHECKING:
    from .lab import Lab
    from .topology import Plan

SINK_TCP_PORT = 9       # "discard": accepted and closed
SINK_UDP_PORT = 9       # no listener: the datagram only has to open a flow at the NAT
MAX_RATE = 1000.0       # flows per second per kind
MAX_DURATION_S = 3600.0
HOLD_S = 0.5
CATCH_UP_S = 1.0            # a background connection stays open this long, then RST-closes
BACKGROUND_HOST = 200   # the background host's address on a peer's LAN: x.y.z.200


READY_TIMEOUT_S = 15.0


def rates(value: float | Mapping[str, float], plan: Plan) -> dict[str, float]:
    """``Lab(background_rate=...)``: one rate for every peer behind a NAT, or {"a": r, "b": r}.
    A peer on a public address (type "none") has no NAT to load and gets none."""
    wanted = dict(value) if isinstance(value, Mapping) else {"a": value, "b": value}
    out: dict[str, float] = {}
    for peer, rate in wanted.items():
        if peer not in ("a", "b"):
            raise ValueError(f"background_rate is per peer 'a'/'b', not {peer!r}")
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= MAX_RATE:
            raise ValueError(f"background_rate for {peer} must be in [0, {MAX_RATE:g}] flows/s, "
                             f"got {rate!r}")
        if rate > 0 and plan.types[peer] != "none":
            out[peer] = float(rate)
    if "nat" in plan.nodes and len(out) > 1:    # same_nat: one NAT, one background host
        out = {"a": out["a"] + out["b"]}
    return out


def host_ip(lab: Lab, peer: str) -> str:
    """The background host's address on ``peer``'s LAN (added to the peer's interface)."""
    net = lab.private_ip(peer).rsplit(".", 1)[0]
    return f"{net}.{BACKGROUND_HOST}"


def start(lab: Lab, plan: Plan, peer_rates: Mapping[str, float]) -> None:
    """The sink on the server host, then one generator per peer (spawned: stopped by PID at
    the lab's teardown with every other lab process)."""
    import select
    import subprocess

    me = [sys.executable, "-m", "pyholepunch.lab.background"]
    snk = lab.spawn("server", [*me, "sink", "--ip", lab.server_ip], stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL, text=True)
    assert snk.stdout is not None
    ready, _, _ = select.select([snk.stdout], [], [], READY_TIMEOUT_S)
    if not ready or snk.stdout.readline().strip() != "ready":
        raise LabError("the background traffic sink on the server host did not start")
    for peer, rate in peer_rates.items():
        ip = host_ip(lab, peer)
        net = lab.private_ip(peer)
        r = lab.run(peer, ["ip", "addr", "add", f"{ip}/24", "dev", "eth0"])
        if r.returncode != 0:
            raise LabError(f"adding the background host {ip} next to {net} failed: {r.stderr.strip()}")
        lab.spawn(peer, [*me, "gen", "--source", ip, "--target", lab.server_ip, "--rate", repr(rate)],
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _stop(signum: int, frame: Any) -> None:
    raise SystemExit(0)


def generate(source: str, target: str, rate: float, duration: float, max_flows: int,
             udp: bool = True) -> int:
    """Open one TCP connection (and one UDP flow) every 1/rate s from ``source`` to ``target``.

    Ticks are scheduled on absolute times (no drift from slow iterations; a stall is made up
    for up to CATCH_UP_S); a connection that
    has not finished by HOLD_S is dropped (its SYN already made the NAT allocate). Returns the
    number of TCP connections started."""
    interval = 1.0 / rate
    held: list[tuple[float, socket.socket]] = []
    t0 = next_at = time.monotonic()
    n = 0
    try:
        while n < max_flows and time.monotonic() - t0 < duration:
            while (left := next_at - time.monotonic()) > 0:
                time.sleep(min(left, 0.05))
                _expire(held, time.monotonic())
            # Late ticks (a loaded machine) are made up for, but never more than CATCH_UP_S of them.
            next_at = max(next_at + interval, time.monotonic() - CATCH_UP_S)
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            s.bind((source, 0))
            s.setblocking(False)
            s.connect_ex((target, SINK_TCP_PORT))
            held.append((time.monotonic() + HOLD_S, s))
            if udp:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                    u.bind((source, 0))
                    with contextlib.suppress(OSError):
                        u.sendto(b"bg", (target, SINK_UDP_PORT))
            n += 1
            _expire(held, time.monotonic())
    finally:
        for _, s in held:
            s.close()
    return n


def _expire(held: list[tuple[float, socket.socket]], now: float) -> None:
    while held and held[0][0] <= now:
        held.pop(0)[1].close()


def sink(ip: str, duration: float) -> None:
    """Accept and close TCP connections on ``ip``:SINK_TCP_PORT until ``duration`` passes."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as ls:
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((ip, SINK_TCP_PORT))
        ls.listen(512)
        ls.settimeout(0.2)
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        end = time.monotonic() + duration
        while time.monotonic() < end:
            try:
                conn, _ = ls.accept()
            except TimeoutError:
                continue
            conn.close()


def _positive(text: str) -> float:
    value = float(text)
    if not 0 < value <= MAX_RATE:
        raise argparse.ArgumentTypeError(f"rate must be in (0, {MAX_RATE:g}], got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pyholepunch.lab.background")
    sub = p.add_subparsers(dest="mode", required=True)
    g = sub.add_parser("gen")
    g.add_argument("--source", required=True)
    g.add_argument("--target", required=True)
    g.add_argument("--rate", type=_positive, required=True, help="flows per second (TCP and UDP each)")
    g.add_argument("--duration", type=float, default=MAX_DURATION_S)
    g.add_argument("--max", type=int, default=100_000, dest="max_flows")
    g.add_argument("--no-udp", action="store_true")
    s = sub.add_parser("sink")
    s.add_argument("--ip", required=True)
    s.add_argument("--duration", type=float, default=MAX_DURATION_S)
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)
    duration = min(max(args.duration, 0.0), MAX_DURATION_S)
    try:
        if args.mode == "sink":
            sink(args.ip, duration)
        else:
            generate(args.source, args.target, args.rate, duration, args.max_flows, not args.no_udp)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
