"""The 36-pair matrix: every unordered pair of the eight lab NAT types, 40 ms RTT.

Each pair runs the real CLI in a fresh lab (serve on the server host, `listen --echo` behind
NAT b, `connect` behind NAT a — the demo's flow) and must connect and echo. Direct in every
pair except symmetric-random with symmetric-random / symmetric-seq, which must relay and say
why. The matrix (pair -> route, winning step, time to connect) is written as JSON to
``$PYHOLEPUNCH_RESULTS/matrix.json`` (default ``build/results``) and printed at the end.

Each pair's server runs with ``--metrics``; its Prometheus exposition, parsed with
prometheus_client's parser, must count exactly that pair's outcome (route, winning step,
relay cause), and over the whole matrix 34 direct sessions by step and 2 relayed with their
reason.
"""
from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pyholepunch.cli.demo import run_pair
from pyholepunch.lab import NAT_TYPES, Lab
from pyholepunch.report import load_schema

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
    _check_matrix_metrics(rows)


def _outcomes(exposition: str) -> dict[tuple[str, str], float]:
    """(route, step) -> sessions, and ("relay-cause", cause) -> fallbacks, from a scrape."""
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(exposition):
        for s in family.samples:
            if s.name == "pyholepunch_server_punch_outcomes_total" and s.value:
                key = (s.labels["route"], s.labels["step"])
                out[key] = out.get(key, 0) + s.value
            elif s.name == "pyholepunch_server_relay_fallbacks_total" and s.value:
                out[("relay-cause", s.labels["reason"])] = s.value
    return out


def _check_matrix_metrics(rows: dict[str, Any]) -> None:
    """The servers' counts, summed, are the matrix's outcomes: every direct session by its
    winning step, every relayed one with its cause."""
    defaults = [r for r in rows.values() if r["engine"] == "default"]
    counted: dict[tuple[str, str], float] = {}
    for row in defaults:
        for key, n in row["server_outcomes"].items():
            counted[tuple(key.split("|"))] = counted.get(tuple(key.split("|")), 0) + n  # type: ignore[index]
    expected: dict[tuple[str, str], float] = {}
    for row in defaults:
        for key in ((row["route"], row["step"]),) + ((("relay-cause", row["relay_cause"]),)
                                                     if row["route"] == "relay" else ()):
            expected[key] = expected.get(key, 0) + 1
    assert counted == expected
    if len(defaults) == len(PAIRS):
        direct = sum(n for (route, _), n in counted.items() if route == "direct")
        assert direct == 34 and counted[("relay", "relay")] == 2
        assert counted[("relay-cause", "no_direct_plan")] == 2


def _expected_route(a: str, b: str) -> str:
    return "relay" if frozenset({a, b}) in RELAY_ONLY else "direct"


def _run(a: str, b: str, engine: str | None, tmp_path: Path, matrix: dict[str, Any]) -> None:
    with Lab(a=a, b=b, rtt_ms=40) as lab:
        result = run_pair(lab.spawn, lab.server_ip, lab.server_alt_ip, tmp_path, engine=engine,
                          timeout=30, server_metrics=True)
    report = result["report"]
    jsonschema.Draft202012Validator(load_schema()).validate(report)   # `connect --json` output
    matrix[f"{a} <-> {b}" + (f" [{engine}]" if engine else "")] = {
        "a": a, "b": b, "engine": engine or "default", "route": report.get("route"),
        "step": report.get("winning_step"), "time_to_connect": report.get("total_time"),
        "relay_reason": report.get("relay_reason"), "echo_ok": result["echo_ok"],
        "relay_cause": report.get("relay_cause"),
        "server_outcomes": {"|".join(k): v for k, v in _outcomes(result["server_metrics"]).items()},
        "nat_a": (report.get("local_nat") or {}).get("label"),
        "nat_b": (report.get("remote_nat") or {}).get("label"),
    }
    assert result["echo_ok"], f"echo mismatch: {result['echo']!r}"
    expected = _expected_route(a, b)
    assert report["route"] == expected, (f"{a} <-> {b}: {report['route']}, steps {report['steps']}, "
                                         f"plan {report['plan']['reason']}")
    if expected == "relay":
        assert "brute force" in report["relay_reason"]
        assert report["relay_cause"] == "no_direct_plan"
    else:
        assert report["winning_step"] not in (None, "relay")
    # this pair's server counted exactly this session
    counted = _outcomes(result["server_metrics"])
    want = {(report["route"], report["winning_step"]): 1.0}
    if expected == "relay":
        want[("relay-cause", "no_direct_plan")] = 1.0
    assert counted == want, f"server metrics {counted} != report {want}"


@pytest.mark.parametrize(("a", "b"), PAIRS, ids=[f"{a}--{b}" for a, b in PAIRS])
def test_pair_connects(a: str, b: str, tmp_path: Path, matrix: dict[str, Any]) -> None:
    _run(a, b, None, tmp_path, matrix)


@pytest.mark.parametrize(("a", "b"), PURE_PAIRS, ids=[f"{a}--{b}" for a, b in PURE_PAIRS])
def test_pair_connects_pure_engine(a: str, b: str, tmp_path: Path, matrix: dict[str, Any]) -> None:
    _run(a, b, "pure", tmp_path, matrix)
