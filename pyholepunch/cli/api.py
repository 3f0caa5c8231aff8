"""`pyholepunch api`: the HTTP interface on 127.0.0.1:12333 over one peer (docs/api.md).

Registers with the rendezvous server like `listen`, then serves until SIGINT/SIGTERM. The
token is read from ``--token-file`` (default ``<config dir>/api-token``, created with a random
token, mode 0600, when absent); every request needs ``Authorization: Bearer <token>``.
"""
from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

from ..address import Address, parse_address
from ..api import DEFAULT_LISTEN
from ..errors import AddressError, ApiSetupError
from ..identity import default_config_dir
from .peer import add_peer_options, peer_from_args


def _listen(text: str) -> Address:
    try:
        return parse_address(text, default_port=DEFAULT_LISTEN[1], allow_zero=True)
    except AddressError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def configure(p: argparse.ArgumentParser) -> None:
    add_peer_options(p)
    p.add_argument("--listen", type=_listen, default=DEFAULT_LISTEN, metavar="HOST:PORT",
                   help="where the API listens (default 127.0.0.1:12333; another address "
                        "needs --token-file)")
    p.add_argument("--token-file", type=Path, metavar="FILE",
                   help="bearer token file (default: <config dir>/api-token, created if absent)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also accept requests for Host NAME (IP literals and, on loopback, "
                        "localhost always are); repeatable")
    p.add_argument("--max-connections", type=int, default=64, metavar="N",
                   help="named peer connections at once (default 64)")
    p.add_argument("--max-body", type=int, default=64 << 20, metavar="BYTES",
                   help="largest POST /binary body (default 64 MiB)")


async def run(args: argparse.Namespace) -> int:
    try:
        from ..api.app import ApiServer
    except ImportError as exc:
        print(f"pyholepunch api needs the [api] extra ({exc}): pip install 'pyholepunch[api]'",
              file=sys.stderr)
        return 3
    from ..api.auth import TOKEN_FILE, check_listen, load_or_create_token

    try:
        check_listen(args.listen, args.token_file is not None)
        config_dir = Path(args.config_dir) if args.config_dir else default_config_dir()
        token_path = args.token_file or config_dir / TOKEN_FILE
        token = load_or_create_token(token_path, create=args.token_file is None)
    except ApiSetupError as exc:
        print(f"pyholepunch api: {exc}", file=sys.stderr)
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with peer_from_args(args) as peer, \
            ApiServer(peer, listen=args.listen, token=token, max_connections=args.max_connections,
                      max_body=args.max_body, allow_hosts=args.allow_host) as api:
        print(f"pyholepunch api on {api.url} as {peer.name} ({peer.peer_id}); "
              f"token in {token_path}", file=sys.stderr, flush=True)
        await stop.wait()
    return 0


__all__ = ["configure", "run"]
