"""The 36-pair matrix: every unordered pair of the eight lab NAT types, 40 ms RTT.

Each pair runs the real CLI in a fresh lab (serve on the server host, `listen --echo` behind
NAT b, `connect` behind NAT a — the demo's flow) and must connect and echo. Direct in every
pair except symmetric-random with symmetric-random / symmetric-seq, which must relay and say
why. The matrix (pair -> route, winning step, time to connect) is written as JSON to
``$PYHOLEPUNCH_RESULTS/matrix.json`` (default ``build/results``) and printed at the end.
"""
from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pyholepunch.cli.demo import run_pair
from pyholepunch.lab import NAT_TYPES, Lab

pytestmark = [pytest.mark.lab, pytest.mark.slow]

PAIRS = list(itertools.combinations_with_replacement(NAT_TYPES, 2))
RELAY_ONLY = {frozenset({"symmetric-random"}), frozenset({"symmetric-random", "symmetric-seq"})}
# The same flow with the pure engine in every peer, for the pairs that exercise each method.
PURE_PAIRS = [("port-restricted", "port-restricted"), ("symmetric-seq", "port-restricted"),
              ("symmetric-random", "port-restricted-rst"), ("none", "symmetric-random")]
RESULTS = Path(os.environ.get("PYHOLEPUNCH_RESULTS", "build/results"))


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture(scope="module")
def matrix() -> Iterator[dict[str, Any]]:
    rows: dict[str, Any] = {}
    fds = _open_fds()
    yield rows
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "matrix.json").write_text(json.dumps(rows, indent=2, sort_keys=True) + "\n")
    lines = [f"{'pair':45s} {'engine':7s} {'route':7s} {'step':16s} {'ms':>7s}"]
    for key, row in sorted(rows.items()):
        ms = "-" if row["time_to_connect"] is None else f"{row['time_to_connect'] * 1000:.0f}"
        lines.append(f"{key:45s} {row['engine']:7s} {row['route'] or 'FAILED':7s} "
                     f"{row['step'] or '-':16s} {ms:>7s}")
    print("\n" + "\n".join(lines))
    assert _open_fds() <= fds + 2, "file descriptors leaked across the matrix"


def _expected_route(a: str, b: str) -> str:
    return "relay" if frozenset({a, b}) in RELAY_ONLY else "direct"


def _run(a: str, b: str, engine: str | None, tmp_path: Path, matrix: dict[str, Any]) -> None:
    with Lab(a=a, b=b, rtt_ms=40) as lab:
        result = run_pair(lab.spawn, lab.server_ip, lab.server_alt_ip, tmp_path, engine=engine,
                          timeout=30)
    report = result["report"]
    matrix[f"{a} <-> {b}" + (f" [{engine}]" if engine else "")] = {
        "a": a, "b": b, "engine": engine or "default", "route": report.get("route"),
        "step": report.get("winning_step"), "time_to_connect": report.get("total_time"),
        "relay_reason": report.get("relay_reason"), "echo_ok": result["echo_ok"],
        "nat_a": (report.get("local_nat") or {}).get("label"),
        "nat_b": (report.get("remote_nat") or {}).get("label"),
    }
    assert result["echo_ok"], f"echo mismatch: {result['echo']!r}"
    expected = _expected_route(a, b)
    assert report["route"] == expected, f"{a} <-> {b}: {report['route']}, plan {report['plan']}"
    if expected == "relay":
        assert "brute force" in report["relay_reason"]
    else:
        assert report["winning_step"] not in (None, "relay")


@pytest.mark.parametrize(("a", "b"), PAIRS, ids=[f"{a}--{b}" for a, b in PAIRS])
def test_pair_connects(a: str, b: str, tmp_path: Path, matrix: dict[str, Any]) -> None:
    _run(a, b, None, tmp_path, matrix)


@pytest.mark.parametrize(("a", "b"), PURE_PAIRS, ids=[f"{a}--{b}" for a, b in PURE_PAIRS])
def test_pair_connects_pure_engine(a: str, b: str, tmp_path: Path, matrix: dict[str, Any]) -> None:
    _run(a, b, "pure", tmp_path, matrix)
