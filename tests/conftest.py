"""Shared fixtures: the `engine` parameter (native + pure), the lab/root gate, and real servers
on loopback (the rendezvous, two rendezvous nodes over a real redis-server, coturn).

Lab and root tests skip only where the machine truly cannot run them (not Linux, not root,
no nft) and say why; under CI (CI=true) the same condition is a failure, never a skip.
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import pytest_asyncio

from pyholepunch import engine as engine_mod
from pyholepunch._process import stop_processes
from pyholepunch.relay.builtin import RelayHub
from pyholepunch.serve import Rendezvous
from pyholepunch.signal.server import ServerConfig, SignalServer
from pyholepunch.signal.store import RedisStore, open_store
from tests.aio.helpers import CREDS, listening
from tests.coturn import Coturn, CoturnConfig
from tests.helpers import free_port


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


# --- real servers on loopback ---------------------------------------------------------------

@pytest.fixture
def redis_url() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}"
    finally:
        stop_processes(proc)


@pytest_asyncio.fixture
async def nodes(redis_url: str) -> AsyncIterator[list[SignalServer]]:
    async with contextlib.AsyncExitStack() as stack:
        out = []
        for node in ("n1", "n2"):
            store = open_store(redis_url)
            assert isinstance(store, RedisStore)
            out.append(await stack.enter_async_context(listening(SignalServer(
                CREDS, store, ServerConfig(sync_pings=2, keepalive=3600), relay_hub=RelayHub(),
                node_id=node))))
        yield out


@pytest_asyncio.fixture
async def rendezvous() -> AsyncIterator[Rendezvous]:
    async with Rendezvous(("127.0.0.1", 0), relay=False) as app:
        yield app


@pytest.fixture
def coturn() -> Iterator[Callable[..., Coturn]]:
    started: list[Coturn] = []

    def make(**kwargs: Any) -> Coturn:
        kwargs.setdefault("realm", "pyholepunch.test")
        turn = Coturn(CoturnConfig(**kwargs))
        turn.start()
        started.append(turn)
        return turn

    try:
        yield make
    finally:
        for turn in started:
            turn.stop()
