"""NAT lab benchmarks (`python -m pytest bench/bench_lab.py`), root only.

Groups in bench/results/report.json:
  lab.startup       start-up (namespaces, veths, addresses, routes, nft, delayer) and teardown of
                    one pair, median / p90 over the rounds (target: start-up < 1 s)
  lab.delay         TCP connect time across a lab with rtt_ms=40 (want 40-60 ms)
  lab.delay_burst   2000 SYNs fired at once through the NFQUEUE delayer (rtt_ms=20): how many
                    were answered (RST from the server) and how long the burst took to drain
"""
from __future__ import annotations

import os
import selectors
import statistics
import time
from typing import Any

import pytest

from pyholepunch.lab import Lab

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the NAT lab needs root")

ROUNDS = 8


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


@pytest.mark.parametrize("a, b, rtt_ms", [("port-restricted", "port-restricted", 0),
                                          ("cgnat", "symmetric-seq", 0),
                                          ("port-restricted", "symmetric-random", 40)])
def test_startup(benchmark: Any, bench_report: Any, a: str, b: str, rtt_ms: float) -> None:
    starts: list[float] = []
    downs: list[float] = []

    def cycle() -> None:
        lab = Lab(a=a, b=b, rtt_ms=rtt_ms)
        lab.start()
        assert lab.startup_s is not None
        starts.append(lab.startup_s)
        t0 = time.monotonic()
        lab.close()
        downs.append(time.monotonic() - t0)

    benchmark.pedantic(cycle, rounds=ROUNDS, iterations=1)
    bench_report.record("lab.startup", f"{a}+{b}+rtt{rtt_ms:g}",
                        startup_median_s=round(statistics.median(starts), 4),
                        startup_p90_s=round(_pct(starts, 0.9), 4),
                        teardown_median_s=round(statistics.median(downs), 4), rounds=len(starts))


def test_delay_rtt(benchmark: Any, bench_report: Any) -> None:
    with Lab(a="port-restricted", b="none", rtt_ms=40) as lab:
        srv = lab.socket("server")
        srv.bind((lab.server_ip, 5000))
        srv.listen(64)
        samples: list[float] = []

        def connect() -> None:
            with lab.socket("a") as c:
                t0 = time.perf_counter()
                c.connect((lab.server_ip, 5000))
                samples.append((time.perf_counter() - t0) * 1000)
            srv.accept()[0].close()

        try:
            benchmark.pedantic(connect, rounds=20, iterations=1)
        finally:
            srv.close()
    bench_report.record("lab.delay", "tcp_connect_rtt40", median_ms=round(statistics.median(samples), 2),
                        p90_ms=round(_pct(samples, 0.9), 2), max_ms=round(max(samples), 2))


def test_delay_burst(benchmark: Any, bench_report: Any) -> None:
    n = 2000
    with Lab(a="none", b="none", rtt_ms=20) as lab:
        def burst() -> tuple[int, float]:
            sel = selectors.DefaultSelector()
            socks = []
            t0 = time.monotonic()
            for i in range(n):  # closed ports: every SYN that gets through comes back as RST
                s = lab.socket("a")
                s.setblocking(False)
                s.connect_ex((lab.server_ip, 10000 + i))
                sel.register(s, selectors.EVENT_WRITE)
                socks.append(s)
            answered, deadline = 0, time.monotonic() + 5
            while answered < n and time.monotonic() < deadline:
                for key, _ in sel.select(0.2):
                    sel.unregister(key.fileobj)
                    answered += 1
            elapsed = time.monotonic() - t0
            for s in socks:
                s.close()
            sel.close()
            return answered, elapsed

        answered, elapsed = benchmark.pedantic(burst, rounds=1, iterations=1)
    bench_report.record("lab.delay_burst", "syn2000_rtt20", answered=answered, sent=n,
                        drain_s=round(elapsed, 3))
    assert answered == n
