"""Relay data paths side by side: direct loopback TCP, the built-in relay with the native
pump's two movers (recv/send copy, its default, and splice) and the pure pump, and coturn's
RFC 6062 TCP relay.

Throughput: MB/s moving PYHOLEPUNCH_BENCH_RELAY_BYTES (default 1 GiB) one way, best of
PYHOLEPUNCH_BENCH_RELAY_REPEATS (default 3) runs. CPU: seconds of CPU (user + system, this
process's threads plus coturn's process) per GiB moved, in the same best run; "relay" CPU
is that minus direct loopback's (the sender and receiver, the same on every path). The
native mover shipped is the one this bench measured faster and cheaper (issue 18).
Latency: round trips of a 64-byte message (PYHOLEPUNCH_BENCH_RELAY_ROUNDS, default 2000);
"added" latency is the median minus direct loopback's median.
Everything runs on 127.0.0.1; coturn is started and stopped here.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import statistics
import threading
import time
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from pyholepunch import engine as engine_mod
from pyholepunch.relay.builtin import MAGIC, RelayHub, RelayServer
from pyholepunch.relay.turn import TurnClient, TurnCredentials
from tests.coturn import Coturn, CoturnConfig

SIZE = int(os.environ.get("PYHOLEPUNCH_BENCH_RELAY_BYTES", str(1 << 30)))
ROUNDS = int(os.environ.get("PYHOLEPUNCH_BENCH_RELAY_ROUNDS", "2000"))
REPEATS = int(os.environ.get("PYHOLEPUNCH_BENCH_RELAY_REPEATS", "3"))
CHUNK = 1 << 20
MSG = 64
PATHS = ["direct", "native", "native-splice", "pure", "coturn"]
GROUP = "relay"
T = TypeVar("T")


class LoopThread:
    """An asyncio loop in a daemon thread: the relay side runs there, the bench drives
    plain blocking sockets from the main thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def _tcp_pair(connect_to: tuple[str, int] | None = None) -> tuple[socket.socket, socket.socket]:
    lst = socket.create_server(("127.0.0.1", 0))
    try:
        a = socket.create_connection(connect_to or lst.getsockname()[:2], timeout=10)
        b, _ = lst.accept()
    finally:
        lst.close()
    return a, b


@contextlib.contextmanager
def path(name: str) -> Iterator[tuple[socket.socket, socket.socket]]:
    """Two blocking sockets whose bytes travel through the named path."""
    if name == "direct":
        a, b = _tcp_pair()
        with a, b:
            yield a, b
        return
    lt = LoopThread()
    try:
        if name in ("native", "native-splice", "pure"):
            kind, _, mover = name.partition("-")
            try:
                eng = engine_mod.get(kind)
            except ImportError as exc:
                pytest.skip(f"{name} engine unavailable: {exc}")
            if mover:
                eng = type(eng)()
                eng.relay_mover = mover            # type: ignore[attr-defined]
            hub = RelayHub(engine=eng, idle_timeout=120, pair_timeout=10)
            server = RelayServer(hub)
            lt.run(server.start())
            try:
                ta, tb = lt.run(_issue(hub))
                a = socket.create_connection(server.address, timeout=10)
                b = socket.create_connection(server.address, timeout=10)
                with a, b:
                    a.sendall(MAGIC + ta)
                    b.sendall(MAGIC + tb)
                    assert a.recv(1) == b"\x00" and b.recv(1) == b"\x00", "relay refused"
                    yield a, b
            finally:
                lt.run(server.close())
        elif name == "coturn":
            if shutil.which("turnserver") is None:
                pytest.skip("coturn not installed")
            with Coturn(CoturnConfig(secret="bench")) as turn:
                assert turn.proc is not None
                _OTHER_PIDS[:] = [turn.proc.pid]
                creds = TurnCredentials.from_shared_secret("bench", "b", now=time.time())
                client = TurnClient(turn.address, creds)
                lst = socket.create_server(("127.0.0.1", 0))
                try:
                    lt.run(client.allocate())
                    lt.run(client.create_permission("127.0.0.1"))
                    a = lt.run(client.connect_socket(lst.getsockname()[:2]))
                    b, _ = lst.accept()
                    a.setblocking(True)
                    with a, b:
                        yield a, b
                finally:
                    lst.close()
                    lt.run(client.close())
        else:
            raise ValueError(name)
    finally:
        _OTHER_PIDS.clear()
        lt.close()


_OTHER_PIDS: list[int] = []          # processes whose CPU counts for the path (coturn)


def cpu_seconds() -> float:
    """User + system CPU of this process and of the path's other processes so far."""
    t = os.times()
    total = t.user + t.system
    tick = os.sysconf("SC_CLK_TCK")
    for pid in _OTHER_PIDS:
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


async def _issue(hub: RelayHub) -> tuple[bytes, bytes]:
    return hub.issue(f"bench-{time.monotonic_ns()}")


def throughput(a: socket.socket, b: socket.socket, size: int) -> float:
    """Seconds to move ``size`` bytes a -> b (sender and receiver in two threads)."""
    done = threading.Event()
    got = [0]

    def receive() -> None:
        buf = bytearray(CHUNK)
        while got[0] < size:
            n = b.recv_into(buf)
            if not n:
                break
            got[0] += n
        done.set()

    rx = threading.Thread(target=receive, daemon=True)
    payload = os.urandom(CHUNK)
    t0 = time.perf_counter()
    rx.start()
    sent = 0
    while sent < size:
        n = min(CHUNK, size - sent)
        a.sendall(payload[:n] if n < CHUNK else payload)
        sent += n
    done.wait(300)
    elapsed = time.perf_counter() - t0
    rx.join(5)
    assert got[0] == size, f"received {got[0]} of {size} bytes"
    return elapsed


def round_trips(a: socket.socket, b: socket.socket, rounds: int) -> list[float]:
    for s in (a, b):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def echo() -> None:
        for _ in range(rounds):
            data = b""
            while len(data) < MSG:
                chunk = b.recv(MSG - len(data))
                if not chunk:
                    return
                data += chunk
            b.sendall(data)

    th = threading.Thread(target=echo, daemon=True)
    th.start()
    msg = b"x" * MSG
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        a.sendall(msg)
        data = b""
        while len(data) < MSG:
            chunk = a.recv(MSG - len(data))
            assert chunk, "path closed during the latency run"
            data += chunk
        times.append(time.perf_counter() - t0)
    th.join(5)
    return times


@pytest.mark.parametrize("name", PATHS)
def test_relay_throughput(benchmark: Any, bench_report: Any, name: str) -> None:
    # Best of REPEATS over one relayed connection: the machine is shared, the best run is
    # the one least disturbed by neighbours.
    runs: list[tuple[float, float]] = []

    def one() -> None:
        c0 = cpu_seconds()
        elapsed = throughput(a, b, SIZE)
        runs.append((elapsed, cpu_seconds() - c0))

    with path(name) as (a, b):
        benchmark.pedantic(one, rounds=REPEATS, iterations=1)
    best, cpu = min(runs)
    gib = SIZE / (1 << 30)
    bench_report.record(GROUP, f"throughput_{name}", mb_s=round(SIZE / 1e6 / best, 1),
                        mb_s_median=round(SIZE / 1e6 / statistics.median(r[0] for r in runs), 1),
                        bytes=SIZE, runs=len(runs), seconds=round(best, 3),
                        cpu_s_per_gib=round(cpu / gib, 3))


@pytest.mark.parametrize("name", PATHS)
def test_relay_latency(benchmark: Any, bench_report: Any, name: str) -> None:
    with path(name) as (a, b):
        times = benchmark.pedantic(round_trips, args=(a, b, ROUNDS), rounds=1, iterations=1)
    times.sort()
    bench_report.record(GROUP, f"latency_{name}", rtt_median_us=round(statistics.median(times) * 1e6, 1),
                        rtt_p99_us=round(times[int(len(times) * 0.99) - 1] * 1e6, 1), rounds=ROUNDS)


def test_relay_movers_interleaved(bench_report: Any) -> None:
    """The choice of the native mover and the ratio to coturn, made fair on a shared machine:
    copy, splice, the pure pump, coturn (and direct loopback) take turns, round after round,
    each moving SIZE bytes; medians of throughput and of CPU per GiB. (The per-path
    throughput tests above run one path after the other, so a neighbour's burst can favour
    whichever ran in a quiet spell: such runs put native at 6.9 x coturn on a busy machine and
    12.6 x on a quiet one. Interleaved medians, 2026-12-07: 7.7 x at load ~2.5 with 512 MiB,
    8.6 x at load ~1 with 1 GiB.)"""
    names = PATHS
    got: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    gib = SIZE / (1 << 30)
    for rnd in range(REPEATS * 2):
        for name in names[rnd % len(names):] + names[:rnd % len(names)]:   # rotate the order
            with path(name) as (a, b):
                c0 = cpu_seconds()
                elapsed = throughput(a, b, SIZE)
                got[name].append((SIZE / 1e6 / elapsed, (cpu_seconds() - c0) / gib))
    med = {n: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v))
           for n, v in got.items()}
    out: dict[str, Any] = {}
    for n, (mb_s, cpu) in med.items():
        out[f"{n}_mb_s"] = round(mb_s, 1)
        out[f"{n}_cpu_s_per_gib"] = round(cpu, 3)
    relay_cpu = {n: max(med[n][1] - med["direct"][1], 1e-9) for n in names[1:]}
    pumps = {n: c for n, c in relay_cpu.items() if n != "coturn"}
    out["copy_over_splice_mb_s"] = round(med["native"][0] / med["native-splice"][0], 3)
    out["native_relay_cpu_vs_cheapest_pump"] = round(pumps["native"] / min(pumps.values()), 3)
    out["native_vs_coturn"] = round(med["native"][0] / med["coturn"][0], 3)
    out["pure_vs_coturn"] = round(med["pure"][0] / med["coturn"][0], 3)
    bench_report.record(GROUP, "movers_interleaved", rounds=REPEATS * 2, bytes=SIZE, **out)


def test_relay_ratios(bench_report: Any) -> None:
    """The targets (issue 18): the built-in relay (native, its default mover) >= 8 x coturn's
    throughput, and its relay CPU per GiB within 1.2 x of the cheapest pump measured."""
    g = bench_report.groups.get(GROUP, {})
    out: dict[str, float | None] = {}
    direct_cpu = g.get("throughput_direct", {}).get("cpu_s_per_gib")
    relay_cpu: dict[str, float] = {}
    for name in ("native", "native-splice", "pure", "coturn"):
        cpu = g.get(f"throughput_{name}", {}).get("cpu_s_per_gib")
        if cpu is not None and direct_cpu is not None:
            relay_cpu[name] = max(cpu - direct_cpu, 1e-9)
            out[f"{name}_relay_cpu_s_per_gib"] = round(relay_cpu[name], 3)
    pumps = {k: v for k, v in relay_cpu.items() if k != "coturn"}
    if "native" in pumps:
        out["native_cpu_vs_cheapest_pump"] = pumps["native"] / min(pumps.values())
    out["splice_vs_copy"] = bench_report.ratio(GROUP, "mb_s", "throughput_native-splice",
                                               "throughput_native")
    for name in ("native", "native-splice", "pure", "coturn"):
        out[f"{name}_vs_direct"] = bench_report.ratio(GROUP, "mb_s", f"throughput_{name}",
                                                      "throughput_direct")
        lat, direct = g.get(f"latency_{name}"), g.get("latency_direct")
        out[f"{name}_added_latency_us"] = (round(lat["rtt_median_us"] - direct["rtt_median_us"], 1)
                                           if lat and direct else None)
    out["native_vs_coturn"] = bench_report.ratio(GROUP, "mb_s", "throughput_native",
                                                 "throughput_coturn")
    out["pure_vs_coturn"] = bench_report.ratio(GROUP, "mb_s", "throughput_pure", "throughput_coturn")
    rounded = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in out.items()}
    # The targets are judged on the interleaved medians when there are some (fair on a
    # shared machine), else on the best runs above.
    fair = g.get("movers_interleaved", {})
    cpu_ratio = fair.get("native_relay_cpu_vs_cheapest_pump", out.get("native_cpu_vs_cheapest_pump"))
    speed_ratio = fair.get("native_vs_coturn", out["native_vs_coturn"])
    bench_report.record(GROUP, "ratios", **rounded, target_met=(speed_ratio or 0) >= 8.0
                        and (cpu_ratio or 1e9) <= 1.2)
