"""Tools for the attack tests and floods (tests/aio/test_server_attacks*.py, bench/bench_server_*):
a raw signaling peer over real TLS that sends whatever it is told, the legitimate pair whose
coordination time is the yardstick, and `pyholepunch serve` as a separate process whose RSS
and CPU time can be read. Everything talks to 127.0.0.0/8 only; other source addresses of
that block (127.0.0.2, ...) stand in for other hosts."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

from pyholepunch.identity import Identity
from pyholepunch.signal.client import SignalClient
from pyholepunch.signal.connection import ConnectionClosed, Role, SignalConnection
from pyholepunch.signal.protocol import (
    Error,
    Hello,
    Message,
    Ping,
    Pong,
    Register,
    Registered,
    encode_frame,
    registration_message,
)
from pyholepunch.signal.tls import client_context

Address = tuple[str, int]
PongMaker = Callable[[Ping, float], Pong]
# The legitimate pair may take this much longer than 2 x its idle time: this 2-core machine
# is shared by eight engineers' test runs, and a coordination takes tens of milliseconds.
NOISE_FLOOR = 0.25


def honest_pong(ping: Ping, at: float) -> Pong:
    return Pong(t1=ping.t1, t2=at, t3=time.time())


def source(i: int) -> str:
    """The i-th stand-in host: 127.0.0.2, 127.0.0.3, ... (all of 127/8 is loopback)."""
    return f"127.0.{(i + 2) // 254}.{(i + 2) % 254 or 1}"


class RawPeer:
    """One signaling connection over real TLS that registers as told and then sends raw
    messages (or raw frames), reading what the server answers."""

    def __init__(self, server: Address, fingerprint: bytes | str, name: str, *,
                 identity: Identity | None = None, bind: str = "127.0.0.1") -> None:
        self.server, self.name, self.bind = server, name, bind
        self.identity = identity or Identity.generate()
        self.conn = SignalConnection(Role.CLIENT, max_frame=1 << 20)   # sends beyond the limit
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.inbox: list[Message] = []
        self.closed: ConnectionClosed | None = None
        self.hello: Hello | None = None

    async def open(self) -> Hello:
        self.reader, self.writer = await asyncio.open_connection(
            *self.server, ssl=client_context(), local_addr=(self.bind, 0))
        msg = await self.recv(5)
        assert isinstance(msg, Hello), msg
        self.hello = msg
        return msg

    async def recv(self, timeout: float) -> Message | ConnectionClosed:
        """The next message (pongs and pings included) or ConnectionClosed."""
        assert self.reader is not None
        async with asyncio.timeout(timeout):
            while not self.inbox:
                if self.closed is not None:
                    return self.closed
                data = await self.reader.read(65536)
                for item in self.conn.receive_data(data) if data else [ConnectionClosed(None)]:
                    if isinstance(item, ConnectionClosed):
                        self.closed = item
                        break
                    self.inbox.append(item)
            return self.inbox.pop(0)

    def send(self, msg: Message) -> None:
        assert self.writer is not None
        self.writer.write(self.conn.send(msg))

    def send_frame(self, msg: Message) -> None:
        """Bypass the state machine: the frame as bytes, however large or out of turn."""
        assert self.writer is not None
        self.writer.write(encode_frame(msg, 1 << 20))

    async def register(self, *, cert: bytes | None = None, token: str | None = None,
                       candidates: list[tuple[str, int]] | None = None,
                       profiles: list[dict[str, Any]] | None = None,
                       pong: PongMaker = honest_pong, timeout: float = 10.0) -> Message:
        """HELLO -> REGISTER -> ping/pong rounds -> REGISTERED (returned) or the ERROR."""
        hello = self.hello or await self.open()
        pk = self.identity.public_key
        reg = Register(name=self.name, public_key=pk, challenge=hello.nonce,
                       signature=self.identity.sign(registration_message(
                           hello.nonce, hello.server_id, self.name, pk)),
                       token=token, cert=cert, candidates=candidates or [], profiles=profiles or [])
        self.send(reg)
        while True:
            msg = await self.recv(timeout)
            if isinstance(msg, Ping):
                self.send(pong(msg, time.time()))
            elif isinstance(msg, (Registered, ConnectionClosed, Error)):
                return msg          # type: ignore[return-value]

    async def answer_pings(self, pong: PongMaker, duration: float) -> None:
        """Keep answering keepalive pings with ``pong`` for ``duration`` seconds."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(duration):
                while True:
                    msg = await self.recv(duration)
                    if isinstance(msg, Ping):
                        self.send(pong(msg, time.time()))
                    elif isinstance(msg, ConnectionClosed):
                        return
                    else:
                        self.inbox.append(msg)
                        await asyncio.sleep(0.01)

    async def close(self, *, abort: bool = False) -> None:
        if self.writer is not None and abort:
            self.writer.transport.abort()
        elif self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.writer.wait_closed(), 1)


async def coordinate(server: Address, fingerprint: bytes | str, *, tag: str = "") -> float:
    """A legitimate pair registers and coordinates one punch: seconds it took."""
    tag = tag or os.urandom(3).hex()
    started = time.monotonic()
    a = SignalClient(server, Identity.generate(), name=f"legit-a-{tag}", reconnect=False,
                     server_fingerprint=fingerprint, connect_timeout=10)
    b = SignalClient(server, Identity.generate(), name=f"legit-b-{tag}", reconnect=False,
                     server_fingerprint=fingerprint, connect_timeout=10)
    async with a, b:
        p = await a.connect(b.name)
        q = await b.next_event(10)
        assert p.session == q.session       # type: ignore[union-attr]
    return time.monotonic() - started


async def register_and_leave(server: Address, fingerprint: bytes | str, count: int) -> int:
    """``count`` peers register (16 at a time) and disconnect; how many registered."""
    sem, done = asyncio.Semaphore(16), [0]

    async def one(i: int) -> None:
        async with sem:
            c = SignalClient(server, Identity.generate(), name=f"gone-{i}", reconnect=False,
                             server_fingerprint=fingerprint, connect_timeout=30)
            try:
                await c.start()
                done[0] += 1
            finally:
                await c.close()

    await asyncio.gather(*(one(i) for i in range(count)), return_exceptions=True)
    return done[0]


async def idle_time(server: Address, fingerprint: bytes | str, rounds: int = 3) -> float:
    """The yardstick: the best of a few coordinations with nothing else going on."""
    return min([await coordinate(server, fingerprint) for _ in range(rounds)])


def within_twice(elapsed: float, idle: float) -> bool:
    return elapsed <= 2 * idle + NOISE_FLOOR


# -- the server as its own process ---------------------------------------------------------------

_SERVER = """
import asyncio, json, sys
from pyholepunch.serve import Rendezvous
from pyholepunch.signal.server import ServerConfig

async def main():
    kw = json.loads(sys.argv[1])
    cfg = ServerConfig(**kw.pop("config", {}))
    async with Rendezvous(("127.0.0.1", 0), config=cfg, state_dir=sys.argv[2], metrics_port=0,
                          **kw) as app:
        print("metrics port", app.metrics_port, flush=True)
        print("serve on %s:%d" % app.address, flush=True)
        print("fingerprint sha256", app.fingerprint, flush=True)
        await asyncio.Event().wait()

asyncio.run(main())
"""


class ServerProcess:
    """A `Rendezvous` (as `pyholepunch serve` runs it) in its own process on 127.0.0.1,
    with ``options`` as keyword arguments (``config``: ServerConfig fields): address,
    fingerprint, RSS and CPU seconds of just the server."""

    def __init__(self, tmp: Path, options: dict[str, Any] | None = None) -> None:
        self.tmp, self.options = tmp, options or {}
        self.proc: subprocess.Popen[str] | None = None
        self.address: Address = ("127.0.0.1", 0)
        self.fingerprint = ""
        self.metrics_port = 0

    def start(self) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SERVER, json.dumps(self.options), str(self.tmp / "state")],
            stdout=subprocess.PIPE, stderr=open(self.tmp / "server.log", "w"),  # noqa: SIM115
            text=True, env=env)
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not self.fingerprint:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"server exited: {self.log()[-2000:]}")
            if m := re.search(r"metrics port (\d+)", line):
                self.metrics_port = int(m.group(1))
            if m := re.search(r"serve on ([\d.]+):(\d+)", line):
                self.address = (m.group(1), int(m.group(2)))
            if m := re.search(r"fingerprint sha256 ([0-9a-f]{64})", line):
                self.fingerprint = m.group(1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def metrics(self) -> dict[str, Any]:
        """The server's own counters (its JSON metrics endpoint)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:   # noqa: S310 - loopback
            doc: dict[str, Any] = json.loads(response.read())
        return doc

    def log(self) -> str:
        return (self.tmp / "server.log").read_text()

    def rss_mb(self) -> float:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def cpu_seconds(self) -> float:
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def server_process(tmp: Path, options: dict[str, Any] | None = None) -> Iterator[ServerProcess]:
    srv = ServerProcess(tmp, options)
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


# -- floods ----------------------------------------------------------------------------------------

def open_raw(server: Address, n: int, sources: list[str], payload: bytes = b"") -> list[socket.socket]:
    """``n`` TCP connections spread over ``sources``, each sending ``payload`` (maybe nothing)
    and then nothing more. Non-blocking connects: cheap for the test process."""
    socks = []
    for i in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.bind((sources[i % len(sources)], 0))
        s.setblocking(False)
        s.connect_ex(server)
        socks.append(s)
    if payload:
        time.sleep(0.05)
        for s in socks:
            with contextlib.suppress(OSError):
                s.send(payload)
    return socks


def close_all(socks: list[socket.socket]) -> None:
    for s in socks:
        s.close()


def client_hello() -> bytes:
    """A real TLS ClientHello (the first flight of a handshake that is then abandoned)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = client_context().wrap_bio(incoming, outgoing)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


@contextlib.asynccontextmanager
async def held(socks: list[socket.socket]) -> AsyncIterator[list[socket.socket]]:
    try:
        yield socks
    finally:
        close_all(socks)
