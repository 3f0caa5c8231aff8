"""Rendezvous load: thousands of peers over real TLS, then a stream of CONNECTs.

The server is the real ``pyholepunch.serve`` process (so its RSS is measured alone); the peers
are ``SignalClient``s spread over worker processes. Reported: coordinations per second (a
CONNECT answered by the initiator's PUNCH; the responder's PUNCH is counted too) and server
RSS growth per 1,000 registered peers. Targets: >= 2,000/s and <= 30 MB per 1,000 peers.

Knobs: PYHOLEPUNCH_BENCH_PEERS (default 5000), PYHOLEPUNCH_BENCH_SECONDS (default 5),
PYHOLEPUNCH_BENCH_WORKERS (default 2).
"""
from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import random
import re
import resource
import subprocess
import sys
import time
from multiprocessing.connection import Connection
from typing import Any

import pytest

from pyholepunch._process import stop_processes

PEERS = int(os.environ.get("PYHOLEPUNCH_BENCH_PEERS", "5000"))
SECONDS = float(os.environ.get("PYHOLEPUNCH_BENCH_SECONDS", "5"))
WORKERS = int(os.environ.get("PYHOLEPUNCH_BENCH_WORKERS", "2"))
INFLIGHT = 150          # outstanding CONNECTs per worker


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


async def _worker_main(pipe: Connection, port: int, fp: str, names: list[str],
                       all_names: list[str], seed: int) -> None:
    from pyholepunch.identity import Identity
    from pyholepunch.signal.client import SignalClient

    rng = random.Random(seed)
    clients = [SignalClient(("127.0.0.1", port), Identity.generate(), name=n,
                            server_fingerprint=fp, connect_timeout=60, idle_timeout=600)
               for n in names]
    # 16 registrations in flight per worker: the server admits 32 unregistered connections
    # per source address (ServerConfig.max_unregistered_per_source) and all come from one.
    sem = asyncio.Semaphore(16)

    async def reg(c: SignalClient) -> None:
        async with sem:
            await c.start()

    t0 = time.perf_counter()
    await asyncio.gather(*(reg(c) for c in clients))
    pipe.send(("registered", len(clients), time.perf_counter() - t0))
    _, duration = pipe.recv()

    done = errors = 0
    latencies: list[float] = []
    deadline = time.perf_counter() + duration

    async def stream() -> None:
        nonlocal done, errors
        while time.perf_counter() < deadline:
            c = rng.choice(clients)
            target = rng.choice(all_names)
            if target == c.name:
                continue
            t = time.perf_counter()
            try:
                await c.connect(target, timeout=10)
            except Exception:
                errors += 1
                continue
            latencies.append(time.perf_counter() - t)
            done += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(stream() for _ in range(INFLIGHT)))
    elapsed = time.perf_counter() - t0
    await asyncio.sleep(1.0)            # let the last responder pushes land
    pushes = sum(c.incoming.qsize() for c in clients)
    latencies.sort()
    pipe.send(("done", done, errors, elapsed, pushes,
               latencies[len(latencies) // 2] if latencies else None,
               latencies[int(len(latencies) * 0.99)] if latencies else None))
    pipe.recv()
    await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


def _worker(pipe: Connection, *args: Any) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(_worker_main(pipe, *args))


@pytest.fixture
def server_proc() -> Any:
    proc = subprocess.Popen([sys.executable, "-m", "pyholepunch", "serve", "--listen", "127.0.0.1:0",
                             "--quiet", "--no-relay", "--max-peers", str(PEERS * 2)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        first, second = proc.stdout.readline(), proc.stdout.readline()
        port = int(re.search(r":(\d+) \(", first).group(1))  # type: ignore[union-attr]
        fp = re.search(r"sha256 ([0-9a-f]{64})", second).group(1)  # type: ignore[union-attr]
        yield proc, port, fp
    finally:
        stop_processes(proc, grace=10.0)


def test_signal_load(benchmark: Any, bench_report: Any, server_proc: Any) -> None:
    proc, port, fp = server_proc
    time.sleep(0.3)
    rss0 = rss_bytes(proc.pid)
    names = [f"peer{i}" for i in range(PEERS)]
    ctx = mp.get_context("fork")
    pipes, procs = [], []
    for w in range(WORKERS):
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_worker, args=(child, port, fp, names[w::WORKERS], names, w))
        p.start()
        pipes.append(parent)
        procs.append(p)
    try:
        regs = [pipe.recv() for pipe in pipes]
        assert sum(r[1] for r in regs) == PEERS
        reg_seconds = max(r[2] for r in regs)
        time.sleep(0.5)
        rss1 = rss_bytes(proc.pid)

        results: list[tuple[Any, ...]] = []

        def connect_stream() -> None:
            for pipe in pipes:
                pipe.send(("go", SECONDS))
            results.extend(pipe.recv() for pipe in pipes)

        cpu0 = cpu_seconds(proc.pid)
        benchmark.pedantic(connect_stream, rounds=1, iterations=1)
        server_cpu = cpu_seconds(proc.pid) - cpu0
        rss2 = rss_bytes(proc.pid)
        done = sum(r[1] for r in results)
        errors = sum(r[2] for r in results)
        elapsed = max(r[3] for r in results)
        pushes = sum(r[4] for r in results)
        rate = done / elapsed
        per_1000 = (rss1 - rss0) / (PEERS / 1000) / 2**20
        values = dict(
            peers=PEERS, workers=WORKERS, registration_s=round(reg_seconds, 2),
            registrations_per_s=round(PEERS / reg_seconds, 1),
            coordinations=done, errors=errors, coordinations_per_s=round(rate, 1),
            responder_pushes=pushes, server_cpu_s=round(server_cpu, 2),
            server_cpu_us_per_coordination=round(server_cpu / max(done, 1) * 1e6, 1),
            latency_p50_ms=round((results[0][5] or 0) * 1e3, 2),
            latency_p99_ms=round((results[0][6] or 0) * 1e3, 2),
            server_rss_base_mb=round(rss0 / 2**20, 1),
            server_rss_registered_mb=round(rss1 / 2**20, 1),
            server_rss_after_connects_mb=round(rss2 / 2**20, 1),
            rss_mb_per_1000_peers=round(per_1000, 2),
            targets={"coordinations_per_s": ">= 2000", "rss_mb_per_1000_peers": "<= 30"})
        bench_report.record("signal", "load", **values)
        print(values)  # noqa: T201 - the headline numbers in the bench log
        assert errors == 0
        assert pushes == done           # every coordination pushed to the responder too
    finally:
        for pipe in pipes:
            try:
                pipe.send(("stop",))
            except OSError:
                pass
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
