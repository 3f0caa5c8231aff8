"""Fixtures shared by the asyncio tests."""
from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest_asyncio

from pyholepunch.relay.builtin import RelayHub, RelayServer

RelayServerFactory = Callable[..., Any]


@pytest_asyncio.fixture
async def make_server() -> AsyncIterator[RelayServerFactory]:
    """``await make_server(**hub_options)``: a started built-in relay server on loopback (its
    first side waits 3 s for the second unless told otherwise), closed after the test."""
    servers: list[RelayServer] = []

    async def make(**kwargs: Any) -> RelayServer:
        kwargs.setdefault("pair_timeout", 3.0)
        srv = RelayServer(RelayHub(**kwargs))
        await srv.start()
        servers.append(srv)
        return srv

    try:
        yield make
    finally:
        for srv in servers:
            await srv.close()
