"""Two ``pyholepunch serve`` processes sharing a REAL redis-server, under a modest stream of
CONNECTs (about half cross nodes through Redis pub/sub): no PUNCH is lost, no CONNECT fails.

The full-size run (thousands of peers, coordinations/s, memory) is bench/bench_rendezvous.py;
this one guards the property in CI in ~15 s. It caught redis-py's default connection pool
refusing commands past 100 in flight (MaxConnectionsError: CONNECTs answered INTERNAL and
PUNCHes lost) at a few hundred coordinations/s.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.signal_load import run_load, serve

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")

PEERS = 300
SECONDS = 3.0
INFLIGHT = 150      # outstanding CONNECTs per worker: ~150 Redis commands in flight per node,
                    # past redis-py's default pool (checked: the server before the fix loses PUNCHes)


def test_two_nodes_lose_no_punch(redis_url: str, tmp_path: Path) -> None:
    state = str(tmp_path / "cluster")
    with serve(PEERS, redis_url, state) as (_n1, a1), serve(PEERS, redis_url, state) as (_n2, a2):
        reg, out = run_load([a1, a2], PEERS, SECONDS, workers=2, inflight=INFLIGHT, settle=10.0)
    assert reg["registered"] == PEERS, reg
    assert out["coordinations"] > 100, out          # the stream really ran
    assert out["coordinations"] == out["connects"], out
    assert out["punch_initiator_only"] == 0 and out["punch_responder_only"] == 0, out
    assert out["unanswered"] == 0 and not out["error_codes"], out
    assert not out["fatal_errors"] and out["connections_lost"] == 0, out
    assert out["targets_reached"] == out["targets_asked"], out      # every peer reachable
