"""Fixtures shared by the asyncio tests: real servers on loopback (the rendezvous, a pair of
rendezvous nodes over a real redis-server, coturn)."""
from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import pytest_asyncio

from pyholepunch._process import stop_processes
from pyholepunch.relay.builtin import RelayHub
from pyholepunch.serve import Rendezvous
from pyholepunch.signal.server import ServerConfig, SignalServer
from pyholepunch.signal.store import RedisStore, open_store
from tests.coturn import Coturn, CoturnConfig
from tests.helpers import free_port

from .helpers import CREDS


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
    out = []
    try:
        for node in ("n1", "n2"):
            store = open_store(redis_url)
            assert isinstance(store, RedisStore)
            srv = SignalServer(CREDS, store, ServerConfig(sync_pings=2, keepalive=3600),
                               relay_hub=RelayHub(), node_id=node)
            await srv.start()
            await srv.listen()
            out.append(srv)
        yield out
    finally:
        for srv in out:
            await srv.close()
            await srv.relay_hub.close()


@pytest_asyncio.fixture
async def rendezvous() -> AsyncIterator[Rendezvous]:
    async with Rendezvous(("127.0.0.1", 0), relay=False) as app:
        yield app


@pytest.fixture
def coturn() -> Iterator[Callable[..., Coturn]]:
    started: list[Coturn] = []

    def make(**kwargs: Any) -> Coturn:
        turn = Coturn(CoturnConfig(realm="pyholepunch.test", **kwargs))
        turn.start()
        started.append(turn)
        return turn

    try:
        yield make
    finally:
        for turn in started:
            turn.stop()
