"""What the rendezvous server's event loop lives through, measured inside the serve process
(bench/bench_rendezvous.py, #18): garbage-collection pauses (``gc.callbacks``: generation
and duration of each collection), the loop's lag (a tiny periodic callback measuring its own
lateness), GC-tracked objects and RSS.

The bench starts the server through ``server_argv``; this file is executed there by path (not
imported), so a server from another checkout (PYHOLEPUNCH_BENCH_SERVER_TREE) is probed alike.
Each ``PROBE_SIGNAL`` the bench sends appends one JSON line to the output file: what happened
since the previous one (lag, collections), then the counts. The phases, in order: ``base``
(started, no peer), then for each round of peers ``registered`` (also times one full
collection, gc.collect(), with every peer held), ``streamed`` (the CONNECT stream), ``left``
(every peer gone; RSS and objects after a full collection).
"""
from __future__ import annotations

import asyncio
import gc
import json
import signal
import sys
import time
from typing import Any

PROBE_SIGNAL = signal.SIGRTMIN + 1 if hasattr(signal, "SIGRTMIN") else signal.SIGUSR1
PHASES = ("base", "registered", "streamed", "left")
LAG_INTERVAL = 0.002        # s between the lag probe's ticks


def server_argv(profile: str | None = None, probe: str | None = None) -> list[str]:
    """The command that runs ``pyholepunch`` (then its arguments), under cProfile (CPU time,
    between SIGUSR1 and SIGUSR2) and/or this probe (JSON lines into ``probe``)."""
    if not profile and not probe:
        return [sys.executable, "-m", "pyholepunch"]
    code = "import runpy, signal, sys, time; sys.argv[0] = 'pyholepunch'\n"
    if probe:
        code += (f"ns = {{}}; exec(compile(open({__file__!r}).read(), {__file__!r}, 'exec'), ns)\n"
                 f"ns['install']({probe!r})\n")
    if not profile:
        return [sys.executable, "-c", code + "runpy.run_module('pyholepunch', run_name='__main__')"]
    # CPU time, not wall time: on shared cores a preempted send() looks slow. Profiled between
    # SIGUSR1 and SIGUSR2 only (the CONNECT stream), so the registrations' TLS handshakes and
    # signatures do not drown the coordinations.
    return [sys.executable, "-c", code +
            "import cProfile; p = cProfile.Profile(time.process_time)\n"
            "signal.signal(signal.SIGUSR1, lambda *_: p.enable())\n"
            "signal.signal(signal.SIGUSR2, lambda *_: p.disable())\n"
            "try: runpy.run_module('pyholepunch', run_name='__main__')\n"
            f"finally: p.disable(); p.dump_stats({profile!r})"]


def read_probe(path: str, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
    """The first ``count`` phases the server wrote (waiting up to ``timeout`` s for them)."""
    end = time.monotonic() + timeout
    while True:
        try:
            with open(path) as f:
                lines = [json.loads(line) for line in f if line.endswith("\n")]
        except FileNotFoundError:
            lines = []
        if len(lines) >= count or time.monotonic() > end:
            return lines
        time.sleep(0.05)


class _Probe:
    def __init__(self, out: str) -> None:
        self.out, self.phase = out, 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.gc_start = 0.0
        self.reset()

    def reset(self) -> None:
        self.pauses: list[tuple[int, float]] = []    # (generation, ms) of each collection
        self.lags: list[float] = []                  # ms late, each tick
        self.t0 = time.perf_counter()
        self.skip = True        # the tick the snapshot itself delayed belongs to no phase

    def on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self.gc_start = time.perf_counter()
        else:
            self.pauses.append((info["generation"], (time.perf_counter() - self.gc_start) * 1e3))

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        due = loop.time() + LAG_INTERVAL

        def tick() -> None:
            nonlocal due
            now = loop.time()
            if self.skip:
                self.skip = False
            else:
                self.lags.append((now - due) * 1e3)
            due = now + LAG_INTERVAL
            loop.call_at(due, tick)

        loop.call_at(due, tick)

    def snapshot(self, *_: Any) -> None:
        lags = sorted(self.lags)

        def pct(q: float) -> float | None:
            return round(lags[min(len(lags) - 1, int(q * len(lags)))], 2) if lags else None

        by_gen = {g: [ms for gen, ms in self.pauses if gen == g] for g in (0, 1, 2)}
        # base, then (registered, streamed, left) for each round of peers
        name = PHASES[0] if not self.phase else PHASES[1 + (self.phase - 1) % 3]
        row: dict[str, Any] = {
            "phase": name, "round": (self.phase + 2) // 3, "seconds": round(time.perf_counter() - self.t0, 2),
            "lag_max_ms": pct(1.0), "lag_p99_ms": pct(0.99), "lag_p50_ms": pct(0.5),
            "lag_over_20ms": sum(1 for x in lags if x > 20), "lag_ticks": len(lags),
            **{f"gc{g}_count": len(v) for g, v in by_gen.items()},
            **{f"gc{g}_max_ms": round(max(v), 2) if v else None for g, v in by_gen.items()},
            "gc_total_ms": round(sum(ms for _, ms in self.pauses), 1),
        }
        if name in ("registered", "left"):
            took = []
            for _ in range(3):      # the first frees what is garbage; the least is the walk
                t = time.perf_counter()
                gc.collect()
                took.append((time.perf_counter() - t) * 1e3)
            row["full_collection_ms"] = round(took[0], 2)
            row["full_collection_min_ms"] = round(min(took[1:]), 2)
        row.update(gc_objects=len(gc.get_objects()), gc_frozen=gc.get_freeze_count(),
                   gc_threshold=list(gc.get_threshold()), rss_mb=_rss_mb())
        self.phase += 1
        with open(self.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.reset()


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def install(out: str) -> None:
    """In the serve process, before it starts: hook the collector, the loop, the signal."""
    probe = _Probe(out)
    gc.callbacks.append(probe.on_gc)
    signal.signal(PROBE_SIGNAL, probe.snapshot)

    class Policy(asyncio.DefaultEventLoopPolicy):
        def new_event_loop(self) -> asyncio.AbstractEventLoop:
            loop = super().new_event_loop()
            probe.start(loop)
            return loop

    asyncio.set_event_loop_policy(Policy())
