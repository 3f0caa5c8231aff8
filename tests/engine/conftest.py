"""Engine test fixtures: `fam` runs a test over IPv4 and IPv6 loopback; every test may take
`no_fd_leak` to prove it left no descriptor open."""
from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from .helpers import V4, V6, Family, open_fds, start_process_server


@pytest.fixture(params=[V4, V6], ids=["v4", "v6"])
def fam(request: pytest.FixtureRequest) -> Family:
    """The address family under test: 127.0.0.2/.3/.4, or ::1 for every side."""
    param: Family = request.param
    return param


@pytest.fixture
def no_fd_leak() -> Iterator[None]:
    before = open_fds()
    yield
    gc.collect()
    leaked = open_fds() - before
    assert not leaked, f"file descriptors leaked: {sorted(leaked)}"


@pytest.fixture(scope="session", autouse=True)
def process_server() -> None:
    """Tests that fork peers set a start instant first: have the fork server up before."""
    start_process_server()
