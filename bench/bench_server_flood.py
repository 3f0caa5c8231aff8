"""The floods of issue #11 at full size against a rendezvous server in its own process.

- idle: 4,000 connections from one address that send nothing (and 4,200 partial ClientHellos):
  how long a legitimate client from another address waits to be served;
- preambles: 2,000 connections that send only "H" of HPR1: the server's CPU while they wait;
- memory: three rounds of 4,000 abandoned TLS handshakes, then 2,000 peers that register
  and disconnect: RSS after each against the idle RSS.

Runs against whatever ``pyholepunch`` is on PYTHONPATH (so the same file measures an older
tree for a before/after table). Knob: PYHOLEPUNCH_BENCH_FLOOD_SCALE (default 1.0) scales
every count. Numbers land in bench/results/report.json, group "server_flood".
"""
from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import pytest

from tests.aio.attack_tools import (
    client_hello,
    close_all,
    coordinate,
    idle_time,
    open_raw,
    register_and_leave,
    server_process,
    source,
)

SCALE = float(os.environ.get("PYHOLEPUNCH_BENCH_FLOOD_SCALE", "1.0"))
pytestmark = pytest.mark.timeout(1800)   # full size takes minutes
GROUP = "server_flood"


def n(count: int) -> int:
    return max(1, int(count * SCALE))


async def _timed(coro: Any, timeout: float = 15.0) -> float | str:
    started = time.monotonic()
    try:
        await asyncio.wait_for(coro, timeout)
    except Exception as exc:    # a refused client is a result here, not a bench failure
        return f"failed: {type(exc).__name__}: {exc}"[:120]
    return round(time.monotonic() - started, 3)


async def _idle(tmp: Path, payload: bytes, count: int) -> dict[str, Any]:
    with server_process(tmp) as srv:
        idle = await idle_time(srv.address, srv.fingerprint)
        socks = open_raw(srv.address, count, ["127.0.0.2"], payload)
        try:
            await asyncio.sleep(1.0)
            under = await _timed(coordinate(srv.address, srv.fingerprint))
            await asyncio.sleep(3.0)
            later = await _timed(coordinate(srv.address, srv.fingerprint))
        finally:
            close_all(socks)
        return {"connections": count, "idle_coordination_s": round(idle, 3),
                "coordination_under_flood_s": under, "coordination_4s_into_flood_s": later}


@pytest.mark.parametrize("kind", ["idle", "partial_hello"])
def test_idle_flood(benchmark: Any, bench_report: Any, tmp_path: Path, kind: str) -> None:
    payload = client_hello()[:40] if kind == "partial_hello" else b""
    count = n(4000 if kind == "idle" else 4200)
    result = benchmark.pedantic(lambda: asyncio.run(_idle(tmp_path, payload, count)),
                                rounds=1, iterations=1)
    bench_report.record(GROUP, f"{kind}_connections_one_source", **result)


async def _preambles(tmp: Path, count: int) -> dict[str, Any]:
    with server_process(tmp, {"demux_timeout": 10.0}) as srv:
        idle = await idle_time(srv.address, srv.fingerprint)
        sources = [source(i) for i in range(max(1, count // 30))]
        socks = open_raw(srv.address, count, sources, b"H")
        try:
            await asyncio.sleep(1.0)
            cpu0, t0 = srv.cpu_seconds(), time.monotonic()
            under = await _timed(coordinate(srv.address, srv.fingerprint))
            await asyncio.sleep(max(0.0, 5.0 - (time.monotonic() - t0)))
            cpu = (srv.cpu_seconds() - cpu0) / (time.monotonic() - t0)
        finally:
            close_all(socks)
        return {"connections": count, "server_cpu_fraction_of_core": round(cpu, 3),
                "idle_coordination_s": round(idle, 3), "coordination_under_flood_s": under}


def test_partial_preambles(benchmark: Any, bench_report: Any, tmp_path: Path) -> None:
    result = benchmark.pedantic(lambda: asyncio.run(_preambles(tmp_path, n(2000))),
                                rounds=1, iterations=1)
    bench_report.record(GROUP, "partial_relay_preambles", **result)


async def _memory(tmp: Path, handshakes: int, peers: int) -> dict[str, Any]:
    hello = client_hello()
    with server_process(tmp) as srv:
        idle = await idle_time(srv.address, srv.fingerprint)
        base = srv.rss_mb()
        rounds = []
        for _ in range(3):
            sources = [source(i) for i in range(max(1, handshakes // 30))]
            socks = open_raw(srv.address, handshakes, sources, hello)
            await asyncio.sleep(2.0)
            peak = srv.rss_mb()
            close_all(socks)
            await asyncio.sleep(3.0)
            rounds.append({"peak_mb": round(peak, 1), "after_mb": round(srv.rss_mb(), 1)})
        left = await register_and_leave(srv.address, srv.fingerprint, peers)
        await asyncio.sleep(3.0)
        after_peers = srv.rss_mb()
        under = await _timed(coordinate(srv.address, srv.fingerprint))
        return {"handshakes_per_round": handshakes, "idle_rss_mb": round(base, 1),
                "rounds": rounds, "peers_registered_and_gone": left,
                "rss_after_peers_left_mb": round(after_peers, 1),
                "worst_after_over_idle": round(max(
                    [r["after_mb"] for r in rounds] + [after_peers]) / base, 2),
                "idle_coordination_s": round(idle, 3), "coordination_after_s": under}


def test_memory_rounds(benchmark: Any, bench_report: Any, tmp_path: Path) -> None:
    result = benchmark.pedantic(lambda: asyncio.run(_memory(tmp_path, n(4000), n(2000))),
                                rounds=1, iterations=1)
    bench_report.record(GROUP, "memory_three_rounds", **result)
