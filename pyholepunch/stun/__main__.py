"""Standalone STUN server: ``python -m pyholepunch.stun --listen IP:PORT [--alt-ip IP]``.

Prints ``ready IP:PORT`` on stdout once every socket is bound (tests and the lab wait for it),
then serves until SIGINT/SIGTERM. ``pyholepunch serve`` embeds the same server.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys

from ..address import Address, parse_address
from ..errors import AddressError
from .server import StunServer


def _listen_address(text: str) -> Address:
    try:
        return parse_address(text, default_port=3478, allow_zero=True)
    except AddressError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


async def _main(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    server = StunServer(args.listen, args.alt_ip, args.alt_port,
                        connect_back_timeout=args.connect_back_timeout)
    async with server:
        host, port = server.primary
        other = server.other_address
        print(f"ready {host}:{port}" + (f" other {other[0]}:{other[1]}" if other else ""), flush=True)  # noqa: T201
        await stop.wait()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pyholepunch.stun", description=__doc__.splitlines()[0])
    p.add_argument("--listen", type=_listen_address,
                   default=("0.0.0.0", 3478), metavar="IP:PORT", help="port 0 picks free ports")
    p.add_argument("--alt-ip", help="second address for RFC 5780 (CHANGE-REQUEST, OTHER-ADDRESS)")
    p.add_argument("--alt-port", type=int, help="alternate port (default: port + 1 with --alt-ip)")
    p.add_argument("--connect-back-timeout", type=float, default=0.6)
    p.add_argument("-v", "--verbose", action="count", default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
                        stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(_main(args))


if __name__ == "__main__":
    sys.exit(main())
