"""The engine at volume: many concurrent simultaneous_open_async calls from one process
(`python -m pytest bench/bench_volume.py -p no:cacheprovider`), both engines in one run.

N calls = N/2 loopback pairs, each side ``(127.0.0.2, p)`` <-> ``(127.0.0.3, p)``, all submitted
before the first start_at, in two shapes:
  burst   one common start_at: N first SYNs are due at the same instant. The kernel handles a
          loopback connect() inline (the peer's SYN processing included), so the last SYN of
          a burst leaves N x that cost after start_at whatever the engine does.
  spread  pair k starts at start_at + k ms (two first SYNs per ms, every call still in flight
          at once): each first SYN's delay is the scheduler's own timing.
  spread_rt  the same with the native scheduler thread under SCHED_FIFO
          (PYHOLEPUNCH_SCHED_PRIORITY; needs CAP_SYS_NICE): what the engine does when other
          busy processes cannot preempt it for a time slice. Native only.
Per case (group ``volume`` in bench/results/report.json): first-SYN delay median/p99/max,
connected count, wall time, CPU seconds (process: the scheduler thread's included), peak RSS
and peak OS thread count. ``volume.ratios``: pure / native p99 per case.

Target (asserted): native, 1,000 calls spread: first-SYN p99 <= 1 ms (spread_rt where the
process may raise the priority, else spread), every pair connected in every case. On a
machine loaded by other processes a normal-priority thread can miss it by a time slice.
"""
from __future__ import annotations

import asyncio
import os
import resource
import statistics
import time
from collections.abc import Coroutine
from typing import Any

import pytest

from pyholepunch import engine as engine_mod
from pyholepunch.engine import Engine, PunchResult
from pyholepunch.peer import _raise_fd_limit

A_IP, B_IP = "127.0.0.2", "127.0.0.3"
SIZES = (100, 1000, 5000)
MODES = ("burst", "spread", "spread_rt")
RT_PRIORITY = "10"
PAIR_SPACING = 0.001        # spread: one pair's start every ms
LEAD = 0.5                  # s from the first submission to the first start_at, plus
LEAD_PER_CALL = 0.0005      # per call: each is validated and readied before its start_at
TIMEOUT = 20.0
P99_TARGET_MS = 1.0


def _listening() -> set[int]:
    ports = set()
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(path) as f:
            next(f)
            ports |= {int(ln.split()[1].rsplit(":", 1)[1], 16) for ln in f if ln.split()[3] == "0A"}
    return ports


def _ports(n: int, low: int = 12000) -> list[int]:
    busy = _listening()
    out = [p for p in range(low, 32000) if p not in busy][:n]
    assert len(out) == n
    return out


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                            # resets VmHWM (peak RSS) to the current RSS
    except OSError:
        pass


def _may_raise_priority() -> bool:
    return os.geteuid() == 0 or bool(_status_hex("CapEff") & (1 << 23))      # CAP_SYS_NICE


def _status_hex(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1], 16)
    return 0


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


async def _volume(engine: Engine, calls: int, mode: str) -> dict[str, Any]:
    ports = _ports(calls // 2)
    first = time.time() + LEAD + calls * LEAD_PER_CALL
    spacing = PAIR_SPACING if mode.startswith("spread") else 0.0
    threads = peak_threads = len(os.listdir("/proc/self/task"))

    async def watch() -> None:
        nonlocal peak_threads
        while True:
            peak_threads = max(peak_threads, len(os.listdir("/proc/self/task")))
            await asyncio.sleep(0.005)

    _reset_peak_rss()
    rss_before = _status("VmRSS")
    watcher = asyncio.ensure_future(watch())
    cpu0 = time.process_time()
    coros: list[Coroutine[Any, Any, PunchResult]] = []
    for k, p in enumerate(ports):
        at = first + k * spacing
        coros.append(engine.simultaneous_open_async((A_IP, p), (B_IP, p), at, TIMEOUT))
        coros.append(engine.simultaneous_open_async((B_IP, p), (A_IP, p), at, TIMEOUT))
    results = await asyncio.gather(*coros, return_exceptions=True)
    done, cpu = time.time(), time.process_time() - cpu0
    watcher.cancel()
    ok = [r for r in results if isinstance(r, PunchResult)]
    errors = [r for r in results if not isinstance(r, PunchResult)]
    delays = [r.stats.first_syn_delay_ns / 1e6 for r in ok
              if r.stats.first_syn_delay_ns is not None]
    for r in ok:
        r.sock.close()
    return {
        "calls": calls, "pairs": len(ports), "mode": mode,
        "connected": len(ok), "errors": [repr(e) for e in errors[:3]],
        "first_syns": len(delays),      # a side whose peer's SYN won its listener sends none
        "first_syn_median_ms": statistics.median(delays) if delays else None,
        "first_syn_p99_ms": _pct(delays, 0.99) if delays else None,
        "first_syn_max_ms": max(delays) if delays else None,
        "wall_s": done - first,         # first start_at to the last call's end
        "cpu_s": cpu,
        "peak_rss_mib": _status("VmHWM") / 1024,
        "rss_growth_mib": (_status("VmHWM") - rss_before) / 1024,
        "peak_threads": peak_threads, "extra_threads": peak_threads - threads,
        "load_avg_1min": os.getloadavg()[0],
    }


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("calls", SIZES)
def test_volume(benchmark: Any, engine: Engine, bench_report: Any, calls: int, mode: str,
                monkeypatch: pytest.MonkeyPatch) -> None:
    if mode == "spread_rt":
        if engine.name != "native":
            pytest.skip("the pure engine has no scheduler thread")
        if not _may_raise_priority():
            pytest.skip("a real-time scheduler thread needs CAP_SYS_NICE")
        monkeypatch.setenv("PYHOLEPUNCH_SCHED_PRIORITY", RT_PRIORITY)
    need = calls * 3 + 512     # native: listener, connecting socket, epoll per call
    _raise_fd_limit(need)
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < need:
        pytest.skip(f"needs {need} descriptors (RLIMIT_NOFILE hard limit too low)")
    out: dict[str, Any] = {}

    def run() -> None:
        out.update(asyncio.run(_volume(engine, calls, mode)))

    benchmark.pedantic(run, rounds=1, iterations=1)
    bench_report.record("volume", f"{engine.name}.{mode}.{calls}", **out)
    assert out["connected"] == calls, out["errors"]
    target_mode = "spread_rt" if _may_raise_priority() else "spread"
    if engine.name == "native" and mode == target_mode and calls == 1000:
        assert out["first_syn_p99_ms"] <= P99_TARGET_MS, (
            f"native first-SYN p99 {out['first_syn_p99_ms']:.3f} ms > {P99_TARGET_MS} ms "
            f"(load average {out['load_avg_1min']:.1f})")


def test_volume_ratios(bench_report: Any) -> None:
    """pure / native first-SYN p99 per case (run last in this file)."""
    if not {"native", "pure"} <= set(engine_mod.available()):
        pytest.skip("ratios need both engines built")
    g = bench_report.groups.get("volume", {})
    out: dict[str, Any] = {}
    for mode in MODES:
        for calls in SIZES:
            n = g.get(f"native.{mode}.{calls}")
            p = g.get(f"pure.{mode.removesuffix('_rt')}.{calls}")
            if n and p and n["first_syn_p99_ms"] and p["first_syn_p99_ms"]:
                out[f"{mode}.{calls}.p99_pure_over_native"] = \
                    p["first_syn_p99_ms"] / n["first_syn_p99_ms"]
    bench_report.record("volume.ratios", "pure_vs_native", **out)
