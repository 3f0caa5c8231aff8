"""Server metrics (pyholepunch.metrics.ServerMetrics) on real servers: across two Redis nodes
each node exports its own (a session counted once, on its initiator's node); refusals by
reason; TLS handshakes that never complete; hostile RESULT stats never become labels;
`serve --metrics` serves the exposition. Every scrape is parsed by prometheus_client."""
from __future__ import annotations

import asyncio
import math
import os
import re
import sys
from pathlib import Path

import pytest

from pyholepunch.errors import SignalingError
from pyholepunch.metrics import ServerMetrics
from pyholepunch.signal.server import SignalServer
from tests.aio.test_signal_redis import client, nodes, redis_url  # noqa: F401  (fixtures)

from .conftest import curl
from .test_api import samples

pytestmark = pytest.mark.timeout(60)


async def until(cond, what: str) -> None:  # type: ignore[no-untyped-def]
    for _ in range(200):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never: {what}")


@pytest.mark.asyncio
async def test_each_redis_node_exports_its_own(nodes: list[SignalServer]) -> None:  # noqa: F811
    n1, n2 = nodes
    m1, m2 = ServerMetrics(n1), ServerMetrics(n2)        # two registries, one process
    async with client(n1, "alice") as a, client(n2, "bob") as b:
        p = await a.connect("bob")
        await b.next_event(5)
        await a.report_result(p.session, "direct", {"step": "simopen", "time": 0.25})
        await b.report_result(p.session, "direct", {"step": "simopen", "time": 0.3})
        await until(lambda: n1.metrics["successes"] == 1 and n2.metrics["successes"] == 1,
                    "both RESULTs arrived")
        s1, s2 = samples(m1.exposition()), samples(m2.exposition())
    outcome = ("pyholepunch_server_punch_outcomes_total",
               (("nat_pair", "unknown+unknown"), ("route", "direct"), ("step", "simopen")))
    assert s1[outcome] == 1 and outcome not in s2          # counted once, by the initiator's node
    assert s1[("pyholepunch_server_time_to_connect_seconds_sum", (("route", "direct"),))] == 0.25
    assert s1[("pyholepunch_server_node", (("node", "n1"),))] == 1
    assert s2[("pyholepunch_server_node", (("node", "n2"),))] == 1
    assert s1[("pyholepunch_server_coordinations_total", ())] == 1
    assert s2[("pyholepunch_server_coordinations_total", ())] == 0
    for s in (s1, s2):
        assert s[("pyholepunch_server_registrations_total", ())] == 1


@pytest.mark.asyncio
async def test_refusals_tls_failures_and_hostile_stats(nodes: list[SignalServer]) -> None:  # noqa: F811
    n1, _ = nodes
    m = ServerMetrics(n1)
    port = n1._servers[0].sockets[0].getsockname()[1]
    r, w = await asyncio.open_connection("127.0.0.1", port)      # not TLS at all
    w.write(b"GET / HTTP/1.1\r\n\r\n")
    await asyncio.wait_for(r.read(), 5)
    w.close()
    async with client(n1, "alice") as a, client(n1, "bob") as b:
        with pytest.raises(SignalingError):
            await a.connect("nobody")
        p = await a.connect("bob")
        await b.next_event(5)
        await a.report_result(p.session, "relay", {"step": "evil\nlabel", "time": math.nan,
                                                   "relay_cause": "x" * 500})
        await until(lambda: n1.metrics["relayed"] == 1, "the RESULT arrived")
    s = samples(m.exposition())
    assert s[("pyholepunch_server_tls_handshake_failures_total", ())] == 1
    assert s[("pyholepunch_server_refusals_total", (("reason", "UNKNOWN_TARGET"),))] == 1
    assert s[("pyholepunch_server_punch_outcomes_total",
              (("nat_pair", "unknown+unknown"), ("route", "relay"), ("step", "other")))] == 1
    assert s[("pyholepunch_server_relay_fallbacks_total", (("reason", "other"),))] == 1
    assert ("pyholepunch_server_time_to_connect_seconds_count", (("route", "relay"),)) not in s


@pytest.mark.asyncio
async def test_serve_metrics_option(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pyholepunch", "serve", "--listen", "127.0.0.1:0", "--no-stun",
        "--state-dir", str(tmp_path), "--metrics", "127.0.0.1:0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    try:
        assert proc.stdout is not None
        url = None
        for _ in range(5):
            line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
            if found := re.search(r"prometheus metrics (http://\S+/metrics)", line):
                url = found.group(1)
                break
        assert url is not None
        s = samples((await curl(url, token=None)).body)
        assert s[("pyholepunch_server_peers_online", ())] == 0
        assert ("pyholepunch_server_relayed_bytes_total", ()) in s
    finally:
        proc.terminate()
        await proc.wait()
    assert proc.returncode == 0
