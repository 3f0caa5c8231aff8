"""A lean load generator for the rendezvous server (bench/bench_rendezvous.py, and the CI test
tests/aio/test_signal_redis_load.py): many registered peers, one real TLS connection each, and a
closed-loop stream of CONNECTs, from worker processes.

Each peer is one TCP+TLS connection (the protocol has one peer per connection) through the
package's own MemoryBIO TLS layer (``tlsproto.TlsTransport``, client side). Registration goes
through the sans-IO ``SignalConnection`` (HELLO, REGISTER signed with a fresh Ed25519 key, the
server's ping/pong clock sync, REGISTERED); once registered a peer only counts frames: it reads
``t``, ``session`` and ``role`` of each msgpack body (the rest is skipped undecoded) and
answers keepalive PINGs, so the generator's cost per coordination stays below the server's.
CONNECTs carry a realistic profile and two candidates: the server does its full work.

Peers use many loopback source addresses (127.0.<n>.<m>): one address cannot hold more than
the ~28,000 ephemeral ports of one (source, destination) pair, and the server admits at most
``max_unregistered_per_source`` handshakes per source at once.
"""
from __future__ import annotations

import asyncio
import gc
import json
import multiprocessing as mp
import os
import random
import resource
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.connection import Connection
from typing import Any

import msgpack  # type: ignore[import-untyped]

from pyholepunch._process import raise_fd_limit, stop_processes
from pyholepunch.identity import Identity
from pyholepunch.signal.machine import ConnectionClosed, Role, SignalConnection
from pyholepunch.signal.protocol import (
    HEADER,
    FrameDecoder,
    Hello,
    Ping,
    Pong,
    Register,
    Registered,
    registration_message,
)
from pyholepunch.signal.tls import client_context
from pyholepunch.signal.tlsproto import TlsTransport
from tests.server_probe import server_argv

PROFILE = {"transport": "tcp", "family": "ipv4", "mapping": "endpoint-independent",
           "filtering": "address-and-port-dependent", "allocation": "preserving",
           "unsolicited_syn": "drop"}
REG_INFLIGHT = 48            # registrations in flight per worker
SOURCES = 200                # loopback source addresses the peers are spread over
CONNECT_TIMEOUT = 10.0
PEERS_PER_WORKER = 19_000    # each connection is a descriptor: under the hard RLIMIT_NOFILE
LEAN_FIELDS = frozenset({"t", "session", "role", "t1", "code", "fatal"})


def source_ip(index: int) -> str:
    return f"127.0.1.{1 + index % SOURCES}"


def frame(obj: dict[str, Any]) -> bytes:
    body: bytes = msgpack.packb(obj, use_bin_type=True)
    return HEADER.pack(len(body)) + body


class LeanPeer(asyncio.Protocol):
    def __init__(self, gen: Generator, name: str, index: int) -> None:
        self.gen, self.name, self.index = gen, name, index
        self.identity = Identity.generate()
        self.conn = SignalConnection(Role.CLIENT)
        self.decoder: FrameDecoder | None = None
        self.tls: TlsTransport | None = None
        self.registered: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        port = 20000 + index % 20000
        self.candidates = [["127.0.0.1", port, "ipv4", "lo", "host"],
                           [source_ip(index), port, "ipv4", "lo", "stun"]]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, TlsTransport)
        self.tls = transport

    def data_received(self, data: bytes) -> None:
        if self.decoder is not None:
            self._lean(data)
            return
        try:
            events = self.conn.receive_data(data)
        except Exception as exc:
            self._failed(exc)
            return
        now = time.time()
        assert self.tls is not None
        for msg in events:
            if isinstance(msg, ConnectionClosed):
                self._failed(ConnectionError(f"refused: {msg.error}"))
                return
            if isinstance(msg, Hello):
                ident = self.identity
                sig = ident.sign(registration_message(msg.nonce, msg.server_id, self.name,
                                                      ident.public_key))
                self.tls.write(self.conn.send(Register(
                    name=self.name, public_key=ident.public_key, challenge=msg.nonce,
                    signature=sig, profiles=[PROFILE], candidates=self.candidates)))
            elif isinstance(msg, Ping):
                self.tls.write(self.conn.send(Pong(t1=msg.t1, t2=now, t3=time.time())))
            elif isinstance(msg, Registered):
                self.decoder = self.conn._decoder        # the rest of the stream, as is
                del self.identity                        # the generator keeps no keys around
                if not self.registered.done():
                    self.registered.set_result(None)

    def _lean(self, data: bytes) -> None:
        assert self.decoder is not None
        try:
            bodies = self.decoder.feed(data)
        except Exception as exc:
            self._failed(exc)
            return
        for body in bodies:
            try:
                obj = self.gen.fields(body)
            except Exception as exc:
                self._failed(exc)
                return
            t = obj.get("t")
            if t == "punch":
                self.gen.on_punch(obj["session"], obj["role"], self)
            elif t == "ping":
                now = time.time()
                self.write(frame({"t": "pong", "t1": obj["t1"], "t2": now, "t3": now}))
            elif t == "error":
                self.gen.on_error(obj.get("session"), obj.get("code"), bool(obj.get("fatal")))

    def write(self, data: bytes) -> None:
        if self.tls is not None:
            self.tls.write(data)

    def _failed(self, exc: BaseException) -> None:
        if not self.registered.done():
            self.registered.set_exception(exc)
        if self.tls is not None:
            self.tls.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.registered.done():
            self.registered.set_exception(exc or ConnectionError("closed while registering"))
        elif self.decoder is not None:
            self.gen.lost += 1


class Generator:
    """One worker process's peers and its share of the CONNECT stream."""

    def __init__(self, wid: int, servers: list[tuple[str, int]], names: list[str],
                 first_index: int, targets: list[str], inflight: int, seed: int) -> None:
        self.wid, self.servers, self.names = wid, servers, names
        self.first_index = first_index
        self.targets, self.inflight = targets, inflight
        self.rng = random.Random(seed)
        self.peers: list[LeanPeer] = []
        self.sent: dict[str, tuple[float, str]] = {}   # session -> (CONNECT time, target)
        self.initiated: dict[str, float] = {}     # session -> initiator PUNCH time
        self.responded: dict[str, float] = {}     # session -> responder PUNCH time
        self.errors: dict[str, int] = {}          # session -> error code
        self.fatal: dict[str, int] = {}           # fatal error code -> count
        self.lost = 0
        self.seq = 0
        self.target_pos = 0
        self.firing = False
        self._unpacker = msgpack.Unpacker(raw=False)

    def fields(self, body: bytes) -> dict[str, Any]:
        """The few top-level fields a lean peer reads (LEAN_FIELDS), the rest of the body
        skipped undecoded: a PUNCH's plan and peer info are most of its bytes, and
        decoding them all was ~10 % of the generator's CPU per coordination."""
        u = self._unpacker
        u.feed(body)
        try:
            out = {}
            for _ in range(u.read_map_header()):
                key = u.unpack()
                if key in LEAN_FIELDS:
                    out[key] = u.unpack()
                else:
                    u.skip()
        except Exception:
            self._unpacker = msgpack.Unpacker(raw=False)     # nothing left behind
            raise
        return out

    async def register_all(self) -> tuple[int, float]:
        loop = asyncio.get_running_loop()
        ctx = client_context()
        sem = asyncio.Semaphore(REG_INFLIGHT)
        failures = 0
        self.first_failure = ""

        async def reg(k: int, name: str) -> None:
            nonlocal failures
            index = self.first_index + k
            host, port = self.servers[index % len(self.servers)]
            async with sem:
                for _attempt in range(5):
                    peer = LeanPeer(self, name, index)
                    tls = TlsTransport(ctx, lambda p=peer: p, None, server_side=False)
                    try:
                        await loop.create_connection(lambda t=tls: t, host, port,
                                                     local_addr=(source_ip(index), 0))
                        await asyncio.wait_for(peer.registered, 60)
                    except (TimeoutError, OSError, ConnectionError) as exc:
                        self.first_failure = self.first_failure or repr(exc)
                        tls.abort()
                        await asyncio.sleep(0.2)
                        continue
                    self.peers.append(peer)
                    return
                failures += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(reg(k, n) for k, n in enumerate(self.names)))
        gc.collect()
        return failures, time.perf_counter() - t0

    # -- the CONNECT stream: callback driven, no task per request ------------------------
    def fire(self) -> None:
        if not self.firing or not self.peers:
            return
        peer = self.peers[self.rng.randrange(len(self.peers))]
        target = self.targets[self.target_pos % len(self.targets)]
        self.target_pos += 1
        if target == peer.name:
            target = self.targets[self.target_pos % len(self.targets)]
            self.target_pos += 1
        self.seq += 1
        session = f"w{self.wid}-{self.seq:08d}"
        self.sent[session] = (time.time(), target)
        peer.write(frame({"t": "connect", "session": session, "target": target,
                          "candidates": peer.candidates, "profiles": [PROFILE]}))

    def on_punch(self, session: str, role: str, peer: LeanPeer) -> None:
        now = time.time()
        if role == "initiator":
            self.initiated[session] = now
            self.fire()
        else:
            self.responded[session] = now

    def on_error(self, session: str | None, code: Any, fatal: bool) -> None:
        if fatal or session is None:
            self.fatal[str(code)] = self.fatal.get(str(code), 0) + 1
            return
        self.errors[session] = int(code)
        self.fire()

    async def stream(self, duration: float) -> float:
        """Keep ``inflight`` CONNECTs outstanding for ``duration`` seconds; a CONNECT that
        gets no answer within CONNECT_TIMEOUT is replaced (and stays unanswered in the
        report)."""
        self.firing = True
        t0 = time.time()
        for _ in range(self.inflight):
            self.fire()
        deadline = t0 + duration
        while time.time() < deadline:
            await asyncio.sleep(0.25)
            stale = time.time() - CONNECT_TIMEOUT
            for s, (at, _target) in list(self.sent.items()):
                if at < stale and s not in self.initiated and s not in self.errors:
                    self.errors[s] = -1               # unanswered: replaced
                    self.fire()
        self.firing = False
        return t0

    async def settle(self, grace: float) -> None:
        """Wait until every CONNECT has its answers (or ``grace`` seconds)."""
        end = time.time() + grace
        while time.time() < end:
            if all(s in self.errors or s in self.initiated for s in self.sent):
                return
            await asyncio.sleep(0.1)

    def close(self) -> None:
        for peer in self.peers:
            if peer.tls is not None:
                peer.tls.abort()


def worker_main(pipe: Connection, wid: int, servers: list[tuple[str, int]], names: list[str],
                first_index: int, targets: list[str], inflight: int) -> None:
    """A worker process: registers its peers, then streams CONNECTs when told to."""
    raise_fd_limit()
    asyncio.run(_worker(pipe, wid, servers, names, first_index, targets, inflight))


async def _worker(pipe: Connection, wid: int, servers: list[tuple[str, int]], names: list[str],
                  first_index: int, targets: list[str], inflight: int) -> None:
    gen = Generator(wid, servers, names, first_index, targets, inflight, seed=wid)
    loop = asyncio.get_running_loop()
    failures, seconds = await gen.register_all()
    pipe.send(("registered", len(gen.peers), failures, seconds, gen.first_failure))
    try:
        while True:
            cmd = await loop.run_in_executor(None, pipe.recv)
            if cmd[0] == "go":
                cpu0 = time.process_time()
                t0 = await gen.stream(cmd[1])
                await gen.settle(cmd[2])
                pipe.send(("done", t0, gen.sent, gen.initiated, gen.responded, gen.errors,
                           gen.fatal, gen.lost, time.process_time() - cpu0))
                gen.fatal = {}
                gen.sent, gen.initiated, gen.responded, gen.errors = {}, {}, {}, {}
            elif cmd[0] == "responded":        # late responder PUNCHes, after everyone's end
                await asyncio.sleep(cmd[1])
                pipe.send(("responded", gen.responded))
                gen.responded = {}
            else:
                break
    finally:
        gen.close()
        await asyncio.sleep(0.1)


def _lift_fd_limit() -> None:
    raise_fd_limit()            # to the hard limit (20,000 here: no CAP_SYS_RESOURCE to raise it)


@contextmanager
def serve(peers: int, store: str | None = None, state_dir: str | None = None,
          profile: str | None = None, log_file: str | None = None,
          server_tree: str | None = None, probe: str | None = None,
          ) -> Iterator[tuple[subprocess.Popen[str], tuple[str, int]]]:
    """One ``pyholepunch serve`` process (signaling only), its fd limit lifted for ``peers``;
    ``probe``: a file for tests/server_probe.py's JSON lines (GC pauses, loop lag)."""
    cmd = server_argv(profile, probe)
    cmd += ["serve", "--listen", "127.0.0.1:0", "--json", "--quiet",
            "--no-relay", "--no-stun", "--max-peers", str(peers * 2)]
    if store:
        cmd += ["--store", store]
    if state_dir:
        cmd += ["--state-dir", state_dir]
    log = open(log_file, "a") if log_file else subprocess.DEVNULL  # noqa: SIM115 - closed below
    env = dict(os.environ)
    if server_tree:             # compare: the server from another checkout (e.g. main)
        env["PYTHONPATH"] = server_tree
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env,
                            cwd=server_tree or None, preexec_fn=_lift_fd_limit)
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        host, port = info["listen"].rsplit(":", 1)
        yield proc, (host, int(port))
    finally:
        stop_processes(proc, grace=30.0)
        if log_file:
            log.close()  # type: ignore[union-attr]


def run_load(servers: list[tuple[str, int]], peers: int, seconds: float, workers: int,
             on_registered: Any = None, inflight: int = 200,
             settle: float = 5.0, on_streamed: Any = None,
             prefix: str = "p") -> tuple[dict[str, Any], dict[str, Any]]:
    """Register ``peers`` over ``workers`` processes (peer k on servers[k % len], named
    ``prefix``k), stream CONNECTs for ``seconds``; (registration facts, joined summary)."""
    names = [f"{prefix}{i}" for i in range(peers)]
    order = names[:]
    random.Random(7).shuffle(order)       # targets: every peer in turn, shuffled
    ctx = mp.get_context("fork")
    pipes: list[Connection] = []
    procs = []
    workers = max(workers, -(-peers // PEERS_PER_WORKER))
    per = -(-peers // workers)
    for w in range(workers):
        parent, child = ctx.Pipe()
        mine = names[w * per:(w + 1) * per]
        p = ctx.Process(target=worker_main, args=(child, w, servers, mine, w * per,
                                                  order[w::workers], inflight))
        p.start()
        pipes.append(parent)
        procs.append(p)
    try:
        regs = [pipe.recv() for pipe in pipes]
        reg = {"registered": sum(r[1] for r in regs), "registration_failures": sum(r[2] for r in regs),
               "registration_s": round(max(r[3] for r in regs), 2),
               "registration_retry_reason": next((r[4] for r in regs if r[4]), "")}
        reg["registrations_per_s"] = round(reg["registered"] / max(reg["registration_s"], 1e-9), 1)
        if on_registered is not None:
            on_registered()
        for pipe in pipes:
            pipe.send(("go", seconds, settle))
        results = [pipe.recv() for pipe in pipes]
        if on_streamed is not None:
            on_streamed()
        for pipe in pipes:
            pipe.send(("responded", 1.0))
        for pipe, late in zip(pipes, [pipe.recv() for pipe in pipes], strict=True):
            del pipe
            results[0][4].update(late[1])
        return reg, summarize(results, seconds)
    finally:
        for pipe in pipes:
            try:
                pipe.send(("stop",))
            except OSError:
                pass
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.kill()


def summarize(results: list[tuple[Any, ...]], duration: float) -> dict[str, Any]:
    """Join every worker's view: a coordination is a CONNECT whose initiator PUNCH and
    responder PUNCH (in whichever worker holds the target) both arrived."""
    sent: dict[str, tuple[float, str]] = {}
    initiated: dict[str, float] = {}
    responded: dict[str, float] = {}
    errors: dict[str, int] = {}
    fatal: dict[str, int] = {}
    lost = 0
    t0 = min(r[1] for r in results)
    gen_cpu = 0.0
    for r in results:
        sent.update(r[2])
        initiated.update(r[3])
        responded.update(r[4])
        errors.update(r[5])
        for code, n in r[6].items():
            fatal[code] = fatal.get(code, 0) + n
        lost += r[7]
        gen_cpu += r[8]
    complete = [s for s in sent if s in initiated and s in responded]
    latencies = sorted(max(initiated[s], responded[s]) - sent[s][0] for s in complete)
    end = max((max(initiated[s], responded[s]) for s in complete), default=t0 + duration)
    elapsed = max(end - t0, 1e-9)
    codes: dict[str, int] = {}
    for code in errors.values():
        codes[str(code)] = codes.get(str(code), 0) + 1

    def pct(q: float) -> float | None:
        return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1e3, 2) \
            if latencies else None

    return {
        "connects": len(sent), "coordinations": len(complete),
        "coordinations_per_s": round(len(complete) / elapsed, 1), "elapsed_s": round(elapsed, 2),
        "punch_initiator_only": sum(1 for s in initiated if s not in responded),
        "punch_responder_only": sum(1 for s in responded if s not in initiated),
        "unanswered": sum(1 for s in sent if s not in initiated and s not in errors),
        "error_codes": codes, "fatal_errors": fatal, "connections_lost": lost,
        "latency_p50_ms": pct(0.5), "latency_p99_ms": pct(0.99),
        "generator_cpu_s": round(gen_cpu, 2),
        "targets_reached": len({sent[s][1] for s in complete}),
        "targets_asked": len({t for _, t in sent.values()}),
    }


def proc_cpu_seconds(pid: int, kernel_only: bool = False) -> float:
    """CPU seconds of process ``pid`` (user + system, or system alone)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = int(fields[12]) + (0 if kernel_only else int(fields[11]))
    return ticks / os.sysconf("SC_CLK_TCK")


def proc_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def kernel_memory() -> dict[str, int]:
    """Bytes the kernel holds that no process's RSS shows: TCP buffer memory
    (/proc/net/sockstat ``mem``, pages) and unreclaimable slab (/proc/meminfo ``SUnreclaim``:
    socket, inode, file and epoll objects of every connection, both loopback ends). Machine
    wide: other work on the host moves it too."""
    out = {"tcp_buffers": 0, "slab": 0}
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                parts = line.split()
                out["tcp_buffers"] = int(parts[parts.index("mem") + 1]) * resource.getpagesize()
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("SUnreclaim:"):
                out["slab"] = int(line.split()[1]) * 1024
    return out
