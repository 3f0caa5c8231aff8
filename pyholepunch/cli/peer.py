"""`pyholepunch listen` and `pyholepunch connect`: netcat habits over a punched connection.

connect: stdin -> peer, peer -> stdout. listen: by default the same for the first connection
(like ``nc -l``); ``--echo`` echoes every connection back; ``--exec CMD`` runs CMD per
connection with the peer's bytes as its stdin and its stdout sent back.

Both ends frame what they send (cli/stream.py, docs/cli.md): the end of one side's input
reaches the other side as an end-of-stream, which closes its output; a command exits when both
directions are done, 0 only when every byte arrived and was acknowledged. Any loss or abnormal
end (the peer killed, the connection broken, a failed command) is exit 1 with a message.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from typing import Any

from ..address import parse_address
from ..connection import Connection
from ..errors import AddressError, StreamFailed
from ..peer import Peer
from .args import EXIT_FAILED, EXIT_OK, address, emit_json, positive_float
from .stdio import Command, EchoPipe, reader_for, writer_for
from .stream import Transfer, run_stream

log = logging.getLogger(__name__)


def _relay(text: str) -> str:
    if text in ("builtin", "none"):
        return text
    if text.startswith("turn:"):
        try:
            parse_address(text[5:], default_port=3478)
        except AddressError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text
    raise argparse.ArgumentTypeError(f"expected builtin, none or turn:HOST:PORT, got {text!r}")


def add_peer_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", required=True, type=address(3478), metavar="HOST:PORT",
                   help="rendezvous server (`pyholepunch serve`; port 3478 when omitted)")
    p.add_argument("--name", help="this peer's name (bound to its key on first use; "
                                  "default: derived from the key)")
    p.add_argument("--server-fingerprint", metavar="SHA256",
                   help="pin the server certificate (default: trust on first use)")
    p.add_argument("--token", default=os.environ.get("PYHOLEPUNCH_TOKEN"),
                   help="server access token (or $PYHOLEPUNCH_TOKEN)")
    p.add_argument("--config-dir", metavar="DIR",
                   help="identity and known servers (default $PYHOLEPUNCH_HOME or "
                        "~/.config/pyholepunch); one running peer per directory")
    p.add_argument("--engine", choices=("native", "pure"), help="punching engine (default: best)")
    p.add_argument("--family", action="append", choices=("ipv4", "ipv6"), dest="families",
                   help="use only this address family (repeatable; default: every family the "
                        "server is reachable in)")
    p.add_argument("--relay", default="builtin", type=_relay, metavar="builtin|turn:HOST:PORT|none",
                   help="relay used when no direct path exists (default: builtin)")
    p.add_argument("--turn-user", help="TURN username (long-term credentials)")
    p.add_argument("--turn-password", help="TURN password")
    p.add_argument("--turn-secret", help="TURN shared secret (coturn use-auth-secret)")
    p.add_argument("--json", action="store_true",
                   help="JSON lines on stderr: the connection report, the transfer, and the log")
    p.add_argument("--json-file", metavar="FILE",
                   help="write the connection report (with the transfer once done) to FILE")
    p.add_argument("--no-portmap", action="store_true",
                   help="do not ask the router to map the punch port (NAT-PMP, PCP, UPnP)")
    p.add_argument("--insecure-plain", action="store_true",
                   help="no end-to-end TLS: for benchmarks only, never for real traffic")
    p.set_defaults(json_stream="stderr")


def configure_listen(p: argparse.ArgumentParser) -> None:
    add_peer_options(p)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--echo", action="store_true", help="echo every connection back")
    mode.add_argument("--exec", metavar="CMD",
                      help="run CMD (a shell command) per connection: the peer's bytes are its "
                           "stdin, its stdout goes back")
    p.add_argument("--once", action="store_true",
                   help="exit after the first connection (always so without --echo/--exec)")


def configure_connect(p: argparse.ArgumentParser) -> None:
    add_peer_options(p)
    p.add_argument("peer", help="the peer's name or peer_id")
    p.add_argument("--timeout", type=positive_float, default=15.0, metavar="SECONDS",
                   help="seconds for the whole connect (default 15)")


def peer_from_args(args: argparse.Namespace) -> Peer:
    return Peer(
        args.server,
        name=args.name,
        config_dir=args.config_dir,
        server_fingerprint=args.server_fingerprint,
        token=args.token,
        engine=args.engine,
        relay=args.relay,
        turn_user=args.turn_user,
        turn_password=args.turn_password,
        turn_secret=args.turn_secret,
        insecure_plain=args.insecure_plain,
        families=args.families,
        portmap=not args.no_portmap,
    )


class _Output:
    """Where the machine-readable results go: JSON lines on stderr and/or one JSON file."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.lines, self.file = bool(args.json), args.json_file
        self.report: dict[str, Any] | None = None

    def say(self, text: str, **doc: Any) -> None:
        """A status line: text, or (with --json) a JSON object, on stderr."""
        if self.lines:
            emit_json(doc, "stderr")
        else:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()

    def connection(self, report: dict[str, Any]) -> None:
        self.report = report
        if self.lines:
            emit_json({"report": report}, "stderr")
        if self.file:
            emit_json(report, self.file)

    def transfer(self, transfer: Transfer) -> None:
        doc = transfer.as_dict()
        if self.lines:
            emit_json({"transfer": doc}, "stderr")
        if self.file and self.report is not None:
            emit_json(self.report | {"transfer": doc}, self.file)


async def _stdio(conn: Connection) -> Transfer:
    return await run_stream(conn, reader_for(sys.stdin.fileno()), writer_for(sys.stdout.fileno()))


async def _serve_one(conn: Connection, args: argparse.Namespace) -> Transfer:
    async with conn:
        if args.echo:
            pipe = EchoPipe()
            return await run_stream(conn, pipe, pipe)
        if args.exec:
            command = Command(args.exec)
            await command.start()
            try:
                return await run_stream(conn, command, command)
            finally:
                await command.stop()
        return await _stdio(conn)


async def run_connect(args: argparse.Namespace) -> int:
    out = _Output(args)
    async with peer_from_args(args) as peer:
        try:
            conn = await peer.connect(args.peer, timeout=args.timeout)
        finally:   # the report says what was tried, also when nothing worked
            if peer.last_report is not None:
                out.connection(peer.last_report.to_dict())
        async with conn:
            transfer = await _stdio(conn)
        out.transfer(transfer)
    return EXIT_OK


async def run_listen(args: argparse.Namespace) -> int:
    out = _Output(args)
    async with peer_from_args(args) as peer:
        out.say(f"listening as {peer.name} ({peer.peer_id})",
                listening={"name": peer.name, "peer_id": peer.peer_id})
        if args.once or not (args.echo or args.exec):   # stdio serves one, like nc -l
            conn = await peer.accept()
            out.connection(conn.report.to_dict())
            out.transfer(await _serve_one(conn, args))
            return EXIT_OK
        tasks: set[asyncio.Task[None]] = set()

        async def serve(conn: Connection) -> None:
            who = conn.peer_name or conn.peer_id
            try:
                transfer = await _serve_one(conn, args)
            except (StreamFailed, OSError) as exc:
                log.warning("connection from %s failed: %s", who, exc)
                return
            log.info("connection from %s done: %s", who, transfer.as_dict())
            out.transfer(transfer)

        while True:
            conn = await peer.accept()
            out.connection(conn.report.to_dict())
            log.info("connection from %s via %s", conn.peer_name or conn.peer_id, conn.route)
            task = asyncio.create_task(serve(conn))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    return EXIT_FAILED   # not reached: the loop ends by an exception (SIGINT: 130)
