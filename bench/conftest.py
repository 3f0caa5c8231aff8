"""Benchmark plumbing shared by every bench_*.py: the `bench_report` JSON summary.

Run: ``python -m pytest bench/ -p no:cacheprovider`` (``--benchmark-disable`` in CI).
Each benchmark records its headline numbers with ``bench_report.record(group, name, **values)``;
at the end of the session they are merged into ``bench/results/report.json`` (an earlier report's
other groups are kept), alongside pytest-benchmark's own tables.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pyholepunch import engine as engine_mod

# The benches share the suite's scaffolding (tests/coturn.py, tests/lab/peers.py); plain
# `pytest bench/` does not put the checkout on sys.path.
if str(ROOT := Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = Path(os.environ.get("PYHOLEPUNCH_BENCH_DIR", Path(__file__).parent / "results"))


class BenchReport:
    def __init__(self) -> None:
        self.groups: dict[str, dict[str, Any]] = {}

    def record(self, group: str, name: str, **values: Any) -> None:
        self.groups.setdefault(group, {})[name] = values

    def ratio(self, group: str, key: str, numerator: str, denominator: str) -> float | None:
        """values[numerator][key] / values[denominator][key] within one group, if both exist."""
        g = self.groups.get(group, {})
        try:
            return float(g[numerator][key]) / float(g[denominator][key])
        except (KeyError, ZeroDivisionError, TypeError):
            return None

    def write(self) -> Path:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / "report.json"
        merged: dict[str, Any] = {}
        if path.exists():
            try:
                merged = json.loads(path.read_text()).get("groups", {})
            except (OSError, ValueError):
                merged = {}
        merged.update(self.groups)
        doc = {
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                        "engines": engine_mod.available()},
            "groups": merged,
        }
        path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        return path


_REPORT = BenchReport()


@pytest.fixture(scope="session")
def bench_report() -> Iterator[BenchReport]:
    yield _REPORT


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _REPORT.groups:
        path = _REPORT.write()
        session.config.get_terminal_writer().line(f"bench report: {path}")


@pytest.fixture(params=["native", "pure"])
def engine(request: pytest.FixtureRequest) -> engine_mod.Engine:
    if request.param == "native" and not engine_mod.native_available():
        pytest.skip("native engine not built")
    return engine_mod.get(request.param)
