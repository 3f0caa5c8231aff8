"""`pyholepunch listen` and `pyholepunch connect`: netcat habits over a punched connection.

connect: stdin -> peer, peer -> stdout; ``--json [FILE]`` writes the connection report
(stderr when no FILE is given). listen: accepts connections and either echoes (``--echo``),
hands them to a command (``--exec CMD``: its stdin/stdout are the connection) or, by default,
copies the first one to stdout and stdin to it, like ``nc -l``.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from typing import Any

from ..connection import Connection
from ..peer import Peer

log = logging.getLogger(__name__)
CHUNK = 64 * 1024


def add_peer_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", required=True, metavar="HOST:PORT", help="rendezvous server")
    p.add_argument("--name", required=True, help="this peer's name (bound to its key on first use)")
    p.add_argument("--server-fingerprint", metavar="SHA256",
                   help="pin the server certificate (default: trust on first use)")
    p.add_argument("--token", default=os.environ.get("PYHOLEPUNCH_TOKEN"),
                   help="server access token (or $PYHOLEPUNCH_TOKEN)")
    p.add_argument("--config-dir", metavar="DIR", help="identity and known_hosts directory")
    p.add_argument("--engine", choices=("native", "pure"), help="punching engine (default: best)")
    p.add_argument("--relay", default="builtin", metavar="builtin|turn:HOST:PORT|none",
                   help="relay used when no direct path exists (default: builtin)")
    p.add_argument("--turn-user", help="TURN username (long-term credentials)")
    p.add_argument("--turn-password", help="TURN password")
    p.add_argument("--turn-secret", help="TURN shared secret (coturn use-auth-secret)")
    p.add_argument("--json", nargs="?", const="-", metavar="FILE",
                   help="write the connection report as JSON to FILE (default stderr)")
    p.add_argument("--insecure-plain", action="store_true",
                   help="no end-to-end TLS: for benchmarks only, never for real traffic")


def configure_listen(p: argparse.ArgumentParser) -> None:
    add_peer_options(p)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--echo", action="store_true", help="echo every connection back")
    mode.add_argument("--exec", metavar="CMD", help="run CMD per connection, wired to it")
    p.add_argument("--once", action="store_true",
                   help="exit after the first connection (always so without --echo/--exec)")


def configure_connect(p: argparse.ArgumentParser) -> None:
    add_peer_options(p)
    p.add_argument("peer", help="the peer's name or peer_id")
    p.add_argument("--timeout", type=float, default=15.0, help="seconds for the whole connect")
    p.add_argument("--linger", type=float, default=1.0, metavar="SECONDS",
                   help="after stdin EOF, stop once the peer is quiet this long (like nc -q)")


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
    )


def write_report(target: str | None, report: dict[str, Any]) -> None:
    if target is None:
        return
    text = json.dumps(report, indent=2, sort_keys=True, default=str)
    if target == "-":
        print(text, file=sys.stderr, flush=True)
    else:
        with open(target, "w") as f:
            f.write(text + "\n")


async def _stdin_reader() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=CHUNK)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def _pump_stdio(conn: Connection, linger: float = 1.0) -> None:
    """stdin -> conn, conn -> stdout, until the peer closes.

    At stdin EOF the connection is half-closed where the stream allows it; TLS cannot
    half-close, so then (like ``nc -q``) we keep reading until the peer has been quiet for
    ``linger`` seconds, and close.
    """
    stdin_done = asyncio.Event()

    async def upstream() -> None:
        try:
            reader = await _stdin_reader()
        except (ValueError, OSError):      # stdin closed or not pollable: nothing to send
            reader = None
        if reader is not None:
            while data := await reader.read(CHUNK):
                await conn.send(data)
        if conn.writer.can_write_eof():
            conn.writer.write_eof()
        else:
            stdin_done.set()

    up = asyncio.create_task(upstream())
    out = sys.stdout.buffer
    try:
        while True:
            try:
                timeout = linger if stdin_done.is_set() else None
                data = await asyncio.wait_for(conn.recv(CHUNK), timeout)
            except TimeoutError:
                break
            if not data:
                break
            out.write(data)
            out.flush()
    finally:
        up.cancel()
        await asyncio.gather(up, return_exceptions=True)


async def _echo(conn: Connection) -> None:
    while data := await conn.recv(CHUNK):
        await conn.send(data)


async def _exec(conn: Connection, command: str) -> None:
    proc = await asyncio.create_subprocess_shell(
        command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdin is not None and proc.stdout is not None

    async def to_proc() -> None:
        while data := await conn.recv(CHUNK):
            proc.stdin.write(data)        # type: ignore[union-attr]
            await proc.stdin.drain()      # type: ignore[union-attr]
        proc.stdin.close()                # type: ignore[union-attr]

    async def from_proc() -> None:
        while data := await proc.stdout.read(CHUNK):   # type: ignore[union-attr]
            await conn.send(data)

    await asyncio.gather(to_proc(), from_proc(), return_exceptions=True)
    await proc.wait()


async def run_connect(args: argparse.Namespace) -> int:
    async with peer_from_args(args) as peer:
        try:
            conn = await peer.connect(args.peer, timeout=args.timeout)
        finally:   # the report says what was tried, also when nothing worked
            if peer.last_report is not None:
                write_report(args.json, peer.last_report.to_dict())
        async with conn:
            await _pump_stdio(conn, args.linger)
    return 0


async def run_listen(args: argparse.Namespace) -> int:
    async with peer_from_args(args) as peer:
        print(f"listening as {peer.name} ({peer.peer_id})", file=sys.stderr, flush=True)
        tasks: set[asyncio.Task[None]] = set()
        while True:
            conn = await peer.accept()
            write_report(args.json, conn.report.to_dict())
            log.info("connection from %s via %s", conn.peer_name or conn.peer_id, conn.route)

            async def serve(c: Connection = conn) -> None:
                async with c:
                    if args.echo:
                        await _echo(c)
                    elif args.exec:
                        await _exec(c, args.exec)
                    else:
                        await _pump_stdio(c)

            if args.once or not (args.echo or args.exec):   # stdio serves one, like nc -l
                await serve()
                return 0
            task = asyncio.create_task(serve())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
