"""The TURN client facing servers that misbehave: silence, garbage, hang-ups. Every case ends
promptly with a clear error and leaves no descriptor behind."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import pytest_asyncio

from pyholepunch.errors import RelayError, TransactionTimeout
from pyholepunch.relay.turn import TurnClient, TurnCredentials

from .helpers import fds

pytestmark = pytest.mark.timeout(20)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
CREDS = TurnCredentials("u", "p")


@pytest_asyncio.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[tuple[str, int]]]]:
    servers: list[asyncio.Server] = []
    conns: list[asyncio.StreamWriter] = []

    async def start(handler: Handler) -> tuple[str, int]:
        async def wrapped(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            conns.append(w)
            await handler(r, w)

        server = await asyncio.start_server(wrapped, "127.0.0.1", 0)
        servers.append(server)
        host, port = server.sockets[0].getsockname()[:2]
        return host, port

    try:
        yield start
    finally:
        for w in conns:
            w.close()
        for s in servers:
            s.close()
            await s.wait_closed()


@pytest.mark.asyncio
async def test_silent_server_times_out(serve: Callable[[Handler], Awaitable[tuple[str, int]]]) -> None:
    async def silent(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.read()
        w.close()           # the server's side of the connection goes too (fd count below)

    address = await serve(silent)
    before = fds()
    client = TurnClient(address, CREDS, timeout=0.5)
    with pytest.raises(TransactionTimeout, match="TURN Allocate: no response within 0.5 s"):
        await client.allocate()
    await client.close()
    for _ in range(50):
        if fds() == before:
            break
        await asyncio.sleep(0.02)
    assert fds() == before


@pytest.mark.asyncio
async def test_garbage_and_hangup(serve: Callable[[Handler], Awaitable[tuple[str, int]]]) -> None:
    async def garbage(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.read(20)
        w.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        await w.drain()

    async def hangup(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.read(20)
        w.close()

    for handler, message in ((garbage, "TURN server sent bad bytes"),
                             (hangup, "TURN server closed the control connection")):
        address = await serve(handler)
        async with TurnClient(address, CREDS, timeout=5) as client:
            with pytest.raises(RelayError, match=message):
                await client.allocate()
            with pytest.raises(RelayError, match=message):      # and it stays dead
                await client.accept(timeout=1)
