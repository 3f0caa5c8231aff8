"""What a registered peer costs the cyclic garbage collector (#18): a full collection walks
every tracked container object, so its pause grows with the objects each peer holds; and a
peer that leaves must be freed by reference counting, not left as cyclic garbage for the next
full collection (5,000 peers gone: a 271 ms collection before the fix)."""
from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from pyholepunch.signal.machine import ClockEstimator, SignalConnection
from pyholepunch.signal.server import ServerConfig, SignalServer
from pyholepunch.signal.server_peer import PeerProtocol
from pyholepunch.signal.store import MemoryStore, PeerRecord
from pyholepunch.signal.tlsproto import TlsTransport

from .helpers import CREDS, listening, node_client

pytestmark = pytest.mark.asyncio
PEERS = 200
# Measured per peer with this walk: 36 before #18's fix (38 with the default 5 sync pings),
# 28 after; the bound leaves a little room for asyncio versions, none for a regression.
MAX_OBJECTS_PER_PEER = 30
SERVER_TYPES = (PeerProtocol, TlsTransport, SignalConnection, ClockEstimator, PeerRecord)


@pytest_asyncio.fixture
async def server() -> AsyncIterator[SignalServer]:
    async with listening(SignalServer(CREDS, MemoryStore(), ServerConfig(
            keepalive=3600, handshake_timeout=30.0,
            max_unregistered_per_source=PEERS + 8))) as srv:
        yield srv


async def _register(srv: SignalServer, n: int) -> list[Any]:
    clients = [node_client(srv, f"gc{i}", reconnect=False) for i in range(n)]
    await asyncio.gather(*(c.start() for c in clients))
    for _ in range(100):                       # the server's side settles after REGISTERED
        if len(srv.peers) == n and all(p._worker is None for p in srv.connections):
            break
        await asyncio.sleep(0.05)
    assert len(srv.peers) == n
    return clients


def _server_owned(srv: SignalServer, loop: asyncio.AbstractEventLoop, old: set[int]) -> int:
    """Tracked objects created since ``old`` and reachable from the server without passing
    through the event loop or an older object, plus what the loop's selector holds for each
    peer's socket (its key, reader handle...): what registered peers cost the collector."""
    stack: list[Any] = [srv]
    selector = loop._selector  # type: ignore[attr-defined]
    for proto in srv.connections:
        sock = proto.transport._transport.get_extra_info("socket")  # type: ignore[union-attr]
        stack.append(selector.get_key(sock.fileno()))
    seen: set[int] = set()
    while stack:
        obj = stack.pop()
        if id(obj) in seen or id(obj) in old or obj is loop or not gc.is_tracked(obj):
            continue
        seen.add(id(obj))
        stack.extend(gc.get_referents(obj))
    return len(seen)


async def test_registered_peer_gc_objects(server: SignalServer) -> None:
    loop = asyncio.get_running_loop()
    gc.collect()
    old = {id(o) for o in gc.get_objects()}
    clients = await _register(server, PEERS)
    try:
        gc.collect()
        gc.collect()              # tuples of floats stop being tracked once examined
        per_peer = _server_owned(server, loop, old) / PEERS
        assert 15 <= per_peer <= MAX_OBJECTS_PER_PEER, per_peer
    finally:
        await asyncio.gather(*(c.close() for c in clients))


async def test_departed_peers_are_not_cyclic_garbage(server: SignalServer) -> None:
    clients = await _register(server, PEERS)
    await asyncio.gather(*(c.close() for c in clients))
    del clients
    for _ in range(100):
        if not server.connections and not server._tls:
            break
        await asyncio.sleep(0.05)
    assert not server.connections and not server._tls
    await asyncio.sleep(0.1)           # the store's drop_online tasks
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        left = [type(o).__name__ for o in gc.garbage if isinstance(o, SERVER_TYPES)
                and not (isinstance(o, TlsTransport) and not o._server_side)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert left == [], f"{len(left)} server objects of departed peers were cyclic garbage"


async def test_sessions_are_not_tracked_by_the_collector() -> None:
    """A MemoryStore keeps up to max_sessions sessions for SESSION_TTL: at thousands of
    coordinations per second they would outnumber the peers' objects (one tracked
    (expiry, info) tuple each before #18's fix); a dict of strings is not tracked."""
    store = MemoryStore()
    gc.collect()
    before = len(gc.get_objects())
    for i in range(5000):
        assert await store.put_session(f"s-{i}", {"initiator": "a" * 16, "responder": "b" * 16})
    gc.collect()
    assert len(gc.get_objects()) - before < 50
    assert await store.get_session("s-7") == {"initiator": "a" * 16, "responder": "b" * 16}
    assert not await store.put_session("s-7", {})
