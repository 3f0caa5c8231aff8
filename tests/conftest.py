"""Shared fixtures: the `engine` parameter (native + pure) and the lab/root gate.

Lab and root tests skip only where the machine truly cannot run them (not Linux, not root,
no nft) and say why; under CI (CI=true) the same condition is a failure, never a skip.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pyholepunch import engine as engine_mod


def _lab_blocker() -> str | None:
    from pyholepunch.lab import unavailable

    return unavailable()


def _root_blocker() -> str | None:
    if not sys.platform.startswith("linux"):
        return "needs Linux"
    if os.geteuid() != 0:
        return "needs root (CAP_NET_RAW / CAP_NET_ADMIN)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    blockers = {"lab": _lab_blocker(), "root": _root_blocker()}
    for item in items:
        for marker, reason in blockers.items():
            if reason and item.get_closest_marker(marker):
                if os.environ.get("CI"):
                    item.add_marker(pytest.mark.usefixtures("_ci_cannot_run"))
                else:
                    item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def _ci_cannot_run() -> None:
    pytest.fail(f"CI must be able to run this test: {_lab_blocker() or _root_blocker()}")


ENGINE_NAMES = ["native", "pure"]


@pytest.fixture(params=ENGINE_NAMES)
def engine(request: pytest.FixtureRequest) -> engine_mod.Engine:
    """Both engines, by name; native skips only when it is not built (fails under CI)."""
    name = request.param
    try:
        return engine_mod.get(name)
    except ImportError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"the native engine is not usable under CI: {exc}")
        pytest.skip(f"native engine not built: {exc}")


def netns_list() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


@pytest.fixture(scope="session", autouse=True)
def _no_namespace_left_behind() -> object:
    """The whole suite must leave no lab namespace behind, even when tests fail."""
    if _lab_blocker():
        yield
        return
    from pyholepunch.lab import state

    def ours(ns: str) -> bool:
        """A lab namespace this run made, or one whose owner is gone; not a live neighbour's."""
        record = state.read(ns.split("-", 1)[0]) if ns.startswith("hpl") else None
        return record is None or record.get("pid") == os.getpid() or not state.owner_alive(record)

    before = netns_list()
    yield
    leaked = {n for n in netns_list() - before if n.startswith("hp") and ours(n)}
    assert not leaked, f"network namespaces left behind: {sorted(leaked)}"
