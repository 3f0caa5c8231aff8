"""`pyholepunch serve`: rendezvous + STUN + built-in relay behind one address.

The server itself is :class:`pyholepunch.serve.Rendezvous`; this is its command line. It
prints where it listens and its certificate fingerprint (``--json``: one JSON line), then
serves until SIGINT (exit 130) or SIGTERM (exit 0, an orderly stop).
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
import time

from ..address import Address, format_address, ip_of
from ..errors import UsageError
from ..serve import Rendezvous, _port_sets
from ..signal.auth import make_token
from ..signal.server import ServerConfig
from .args import EXIT_INTERRUPTED, EXIT_OK, address, emit_json, port_number, positive_float

log = logging.getLogger(__name__)


def _parse_hostport(text: str) -> Address:
    """--listen: HOST:PORT, [V6]:PORT, HOST (port 3478) or :PORT (0.0.0.0)."""
    return address(3478, allow_zero=True)("0.0.0.0" + text if text.startswith(":") else text)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", type=_parse_hostport, action="append", metavar="HOST:PORT",
                        help="the one address users type (default 0.0.0.0:3478; port 0: any free "
                             "one); once per IP family for dual stack, e.g. --listen [2001:db8::10]:3478")
    parser.add_argument("--alt-ip", metavar="IP", action="append",
                        help="second address for RFC 5780 STUN, once per IP family (--listen must "
                             "then name an address of that family)")
    parser.add_argument("--state-dir", metavar="DIR",
                        help="server certificate and name bindings survive restarts here")
    parser.add_argument("--token", metavar="SECRET", default=os.environ.get("PYHOLEPUNCH_TOKEN"),
                        help="require this access token (or one made from it) to register")
    parser.add_argument("--store", metavar="URL", help="memory (default) or redis://HOST:PORT")
    parser.add_argument("--metrics", type=address(allow_zero=True), metavar="HOST:PORT",
                        help="Prometheus metrics on http://HOST:PORT/metrics (extra [metrics])")
    parser.add_argument("--metrics-port", type=port_number, metavar="N",
                        help="deprecated: the same as --metrics 127.0.0.1:N")
    parser.add_argument("--punch-margin", type=positive_float, default=ServerConfig.margin,
                        metavar="SECONDS",
                        help="least time added to the common punch start, before the peers' "
                             f"measured RTT spread (default {ServerConfig.margin:g})")
    parser.add_argument("--max-peers", type=int, default=100_000)
    parser.add_argument("--no-stun", action="store_true", help="do not run the STUN server")
    parser.add_argument("--no-relay", action="store_true", help="do not run the built-in relay")
    parser.add_argument("--relay-secret", metavar="SECRET",
                        default=os.environ.get("PYHOLEPUNCH_RELAY_SECRET"),
                        help="the built-in relay also takes tokens minted with this shared "
                             "secret (pyholepunch.Punch(relay='hp:HOST:PORT', relay_secret=...): "
                             "no rendezvous needed); at least 16 bytes; or the environment "
                             "variable PYHOLEPUNCH_RELAY_SECRET")
    parser.add_argument("--relay-secret-file", metavar="PATH",
                        help="read --relay-secret from this file (kept out of the process list)")
    parser.add_argument("--issue-token", type=positive_float, metavar="SECONDS",
                        help="print an access token valid this long (made from --token), then exit")
    parser.add_argument("--json", action="store_true",
                        help="print the address and fingerprint as one JSON line on stdout")


def _check(args: argparse.Namespace) -> None:
    if args.metrics_port is not None:
        if args.metrics is not None:
            raise UsageError("--metrics-port N is the old spelling of --metrics 127.0.0.1:N: "
                             "give --metrics alone")
        log.warning("--metrics-port is deprecated and will go: use --metrics 127.0.0.1:%d "
                    "(Prometheus exposition; the old JSON counters are no longer served)",
                    args.metrics_port)
        args.metrics = ("127.0.0.1", args.metrics_port)
    if args.max_peers < 1:
        raise UsageError(f"--max-peers must be at least 1, got {args.max_peers}")
    if args.store is not None and args.store != "memory" and not args.store.startswith("redis://"):
        raise UsageError(f"--store is memory or redis://HOST:PORT, got {args.store!r}")
    _relay_secret(args)
    args.listen = args.listen or [("0.0.0.0", 3478)]
    try:
        port_sets = _port_sets(args.listen, args.alt_ip)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    for (host, _), alt_text in port_sets:
        if alt_text is None:
            continue
        listen_ip, alt = ip_of(host), ip_of(alt_text)
        if alt is None or alt.is_unspecified:
            raise UsageError(f"--alt-ip needs a specific IP address, got {alt_text!r}")
        if listen_ip is None or listen_ip.is_unspecified:
            raise UsageError(f"--alt-ip needs --listen to name a specific IP address, not "
                             f"{host} (RFC 5780 answers from two known addresses)")
        if alt == listen_ip:
            raise UsageError(f"--alt-ip {alt_text} must be another address than --listen {host}")


def _relay_secret(args: argparse.Namespace) -> None:
    """--relay-secret(-file) checked and read into args.relay_secret."""
    from ..relay.minted import secret_bytes

    if args.relay_secret_file:
        if args.relay_secret:
            raise UsageError("give --relay-secret or --relay-secret-file, not both")
        try:
            with open(args.relay_secret_file, encoding="utf-8") as f:
                args.relay_secret = f.read().strip()
        except OSError as exc:
            raise UsageError(f"--relay-secret-file: {exc}") from None
    if args.relay_secret and args.no_relay:
        raise UsageError("--relay-secret is for the built-in relay, which --no-relay turns off")
    if args.relay_secret:
        try:
            secret_bytes(args.relay_secret)
        except ValueError as exc:
            raise UsageError(f"--relay-secret: {exc}") from None


async def run(args: argparse.Namespace) -> int:
    if args.issue_token is not None:
        if not args.token:
            raise UsageError("--issue-token needs --token SECRET")
        print(make_token(args.token, time.time() + args.issue_token), flush=True)
        return EXIT_OK
    _check(args)
    cfg = ServerConfig(margin=args.punch_margin, max_peers=args.max_peers)
    app = Rendezvous(args.listen, alt_ip=args.alt_ip, state_dir=args.state_dir, token=args.token,
                     store=args.store, metrics=args.metrics,
                     config=cfg,
                     stun=not args.no_stun, relay=not args.no_relay,
                     relay_options={"secret": args.relay_secret} if args.relay_secret else None)
    stopped_by: list[signal.Signals] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        stopped_by.append(sig)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    async with app:
        # What start-up imported and built lives as long as the process: out of every
        # collection from here on, so a full one traverses the peers' objects only (#18).
        # Peers' objects, which may end as cyclic garbage, are all created after this.
        gc.collect()
        gc.freeze()
        where = " and ".join(format_address(a) for a in app.addresses)
        parts = ["signaling"] + (["stun"] if app.stun else []) + (["relay"] if app.relay_hub else [])
        if args.json:
            prometheus = (f"http://{format_address(app.prometheus_address)}/metrics"
                          if app.prometheus_address is not None else None)
            emit_json({"listen": format_address(app.address),
                       "addresses": [format_address(a) for a in app.addresses],
                       "fingerprint": app.fingerprint, "services": parts,
                       "metrics": prometheus, "prometheus": prometheus}, "-")
        else:
            names = {"signaling": "TLS signaling", "stun": "STUN", "relay": "relay"}
            print(f"pyholepunch serve on {where} ({', '.join(names[p] for p in parts)} on one port)",
                  flush=True)
            print(f"server fingerprint sha256 {app.fingerprint}", flush=True)
            if app.prometheus_address is not None:
                print(f"prometheus metrics http://{format_address(app.prometheus_address)}/metrics",
                      flush=True)
        await stop.wait()
    sys.stdout.flush()
    return EXIT_INTERRUPTED if stopped_by and stopped_by[0] == signal.SIGINT else EXIT_OK
