"""NAT-lab test plumbing: after every lab test, no lab built by this process may survive."""
from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


def _my_labs() -> set[str]:
    from pyholepunch.lab import state

    mine = set()
    for name in state.lab_names():
        rec = state.read(name)
        if rec and rec.get("pid") == os.getpid() and state.namespaces_of(name):
            mine.add(name)
    return mine


@pytest.fixture(autouse=True)
def _lab_left_behind(request: pytest.FixtureRequest) -> Iterator[None]:
    if request.node.get_closest_marker("lab") is None or os.geteuid() != 0:
        yield
        return
    before = _my_labs()
    yield
    leaked = _my_labs() - before
    if leaked:
        from pyholepunch.lab import state

        for name in leaked:
            state.remove(name)
        pytest.fail(f"lab(s) left behind by this test: {sorted(leaked)}")
