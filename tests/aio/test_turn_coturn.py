"""The TURN client against a real coturn on loopback: TCP allocations (RFC 6062) both ways,
credentials, permissions, refreshes, expiry and a server that dies mid-session."""
from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio

from pyholepunch.errors import RelayError, TransactionFailed
from pyholepunch.relay.turn import (
    TurnClient,
    TurnCredentials,
    accept_relayed,
    connect_relayed,
    offer_relayed,
)
from tests.coturn import Coturn
from tests.helpers import free_port

from .helpers import closed, fds

pytestmark = [
    pytest.mark.timeout(20),
    pytest.mark.skipif(shutil.which("turnserver") is None and not os.environ.get("CI"),
                       reason="coturn (turnserver) is not installed"),
]

SECRET = "s3cret"


def secret_creds(ttl: float = 600) -> TurnCredentials:
    return TurnCredentials.from_shared_secret(SECRET, "alice", now=time.time(), ttl=ttl)


@pytest_asyncio.fixture
async def tcp_peer() -> AsyncIterator[dict[str, Any]]:
    """A plain TCP server peer that echoes with a prefix and records who connected."""
    seen: dict[str, Any] = {"peers": []}

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        seen["peers"].append(w.get_extra_info("peername"))
        try:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        except ConnectionError:
            pass
        finally:
            w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    seen["address"] = server.sockets[0].getsockname()[:2]
    try:
        yield seen
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.asyncio
async def test_connect_to_plain_tcp_peer(coturn: Callable[..., Coturn],
                                         tcp_peer: dict[str, Any]) -> None:
    before = fds()
    turn = coturn(secret=SECRET)
    async with TurnClient(turn.address, secret_creds()) as client:
        relayed = await client.allocate()
        assert relayed[0] == "127.0.0.1" and relayed[1] != turn.address[1]
        assert client.mapped_address is not None
        await client.create_permission("127.0.0.1")
        r, w = await client.connect(tcp_peer["address"])
        payload = os.urandom(200_000)
        w.write(payload)
        await w.drain()
        assert await asyncio.wait_for(r.readexactly(len(payload)), 10) == payload
        # The peer saw the relay's address, not ours: the relayed transport address.
        assert tcp_peer["peers"] == [relayed]
        await closed(w)
    turn.stop()
    assert fds() == before


@pytest.mark.asyncio
async def test_accept_from_plain_tcp_client(coturn: Callable[..., Coturn]) -> None:
    before = fds()
    turn = coturn(users={"bob": "hunter2"})
    async with TurnClient(turn.address, TurnCredentials("bob", "hunter2")) as client:
        relayed = await client.allocate()
        await client.create_permission("127.0.0.1")

        async def plain_peer() -> bytes:
            r, w = await asyncio.open_connection(*relayed)
            # The TURN side speaks first: coturn drops what arrives before ConnectionBind.
            assert await r.readexactly(5) == b"ready"
            w.write(b"hello from a plain TCP client")
            await w.drain()
            reply = await r.readexactly(5)
            await closed(w)
            return reply

        dialer = asyncio.ensure_future(plain_peer())
        peer, (r, w) = await client.accept(timeout=5)
        assert peer[0] == "127.0.0.1"
        w.write(b"ready")
        await w.drain()
        assert await r.readexactly(29) == b"hello from a plain TCP client"
        w.write(b"hi yo")
        await w.drain()
        assert await asyncio.wait_for(dialer, 5) == b"hi yo"
        await closed(w)
        with pytest.raises(TimeoutError, match="no peer connected"):
            await client.accept(timeout=0.2)
    turn.stop()
    assert fds() == before


@pytest.mark.asyncio
async def test_wrong_credentials(coturn: Callable[..., Coturn]) -> None:
    before = fds()
    turn = coturn(secret=SECRET)
    bad = [TurnCredentials.from_shared_secret("not-the-secret", "alice", now=time.time()),
           secret_creds(ttl=-60),                  # a time-limited credential past its expiry
           TurnCredentials("alice", "guess")]
    for creds in bad:
        async with TurnClient(turn.address, creds) as client:
            with pytest.raises(TransactionFailed, match="401.*wrong credentials") as info:
                await client.allocate()
            assert info.value.code == 401
            with pytest.raises(RelayError, match="needs an allocation"):
                await client.create_permission("127.0.0.1")
    turn.stop()
    assert fds() == before


@pytest.mark.asyncio
async def test_peer_errors_carry_stun_codes(coturn: Callable[..., Coturn]) -> None:
    turn = coturn(secret=SECRET)
    async with TurnClient(turn.address, secret_creds()) as client:
        await client.allocate()
        await client.create_permission("127.0.0.1")
        with pytest.raises(TransactionFailed, match=r"447 Connection Timeout or Failure$") as info:
            await client.connect(("127.0.0.1", free_port()))       # nobody listens there
        assert info.value.code == 447
        with pytest.raises(RelayError, match="at least one peer"):
            await client.create_permission()


@pytest.mark.asyncio
async def test_unreachable_server() -> None:
    with pytest.raises(RelayError, match="unreachable"):
        async with TurnClient(("127.0.0.1", free_port()), secret_creds(), timeout=2) as client:
            await client.allocate()


@pytest.mark.asyncio
async def test_refreshes_survive_short_lifetime_and_stale_nonces(
        coturn: Callable[..., Coturn], tcp_peer: dict[str, Any]) -> None:
    # Allocation lifetime 3 s (refreshed every 1.5 s), nonces stale after 1 s: both retried
    # transparently; after 4 s the allocation still relays.
    turn = coturn(secret=SECRET, stale_nonce=1)
    async with TurnClient(turn.address, secret_creds(), lifetime=3) as client:
        await client.allocate()
        await asyncio.sleep(1.2)
        await client.create_permission("127.0.0.1")          # stale nonce -> 438 -> retry
        await asyncio.sleep(3.0)
        r, w = await client.connect(tcp_peer["address"])
        w.write(b"still alive")
        await w.drain()
        assert await asyncio.wait_for(r.readexactly(11), 5) == b"still alive"
        await closed(w)


@pytest.mark.asyncio
async def test_released_allocation(coturn: Callable[..., Coturn],
                                   tcp_peer: dict[str, Any]) -> None:
    # coturn never grants less than 600 s, so real expiry is covered by the sans-IO tests
    # with a fake clock; here the allocation ends by an explicit zero-lifetime Refresh.
    turn = coturn(secret=SECRET)
    async with TurnClient(turn.address, secret_creds()) as client:
        relayed = await client.allocate()
        await client.create_permission("127.0.0.1")
        assert await client.refresh(0) == 0
        with pytest.raises(RelayError, match="needs an allocation"):
            await client.connect(tcp_peer["address"])
        with pytest.raises(RelayError, match="needs an allocation"):
            await client.accept(timeout=1)
        assert relayed == client.relayed_address     # still reported, for the logs


@pytest.mark.asyncio
async def test_coturn_stopped_mid_session(coturn: Callable[..., Coturn],
                                          tcp_peer: dict[str, Any]) -> None:
    before = fds()
    turn = coturn(secret=SECRET)
    client = TurnClient(turn.address, secret_creds(), timeout=3)
    try:
        await client.allocate()
        await client.create_permission("127.0.0.1")
        r, w = await client.connect(tcp_peer["address"])
        waiting = asyncio.ensure_future(client.accept(timeout=10))
        await asyncio.sleep(0.1)
        turn.stop()
        with pytest.raises(RelayError, match="allocation ended: TURN (server closed the )?control"):
            await asyncio.wait_for(waiting, 5)
        try:                                             # the data path ends too, promptly
            assert await asyncio.wait_for(r.read(), 5) == b""
        except ConnectionError:
            pass
        await closed(w)
        with pytest.raises(RelayError, match="allocation ended"):
            await client.connect(tcp_peer["address"])
    finally:
        await asyncio.wait_for(client.close(), 5)
    assert fds() == before


@pytest.mark.asyncio
async def test_peer_to_peer_helpers(coturn: Callable[..., Coturn]) -> None:
    before = fds()
    turn = coturn(secret=SECRET)
    async with TurnClient(turn.address, secret_creds()) as client:
        relayed = await offer_relayed(client, "127.0.0.1")
        accepting = asyncio.ensure_future(accept_relayed(client, timeout=5))
        r_b, w_b = await connect_relayed(relayed, timeout=5)
        _peer, (r_a, w_a) = await accepting
        payload = os.urandom(500_000)
        w_b.write(payload)                 # the dialer may send at once: the peer is bound
        await w_b.drain()
        assert await asyncio.wait_for(r_a.readexactly(len(payload)), 10) == payload
        w_a.write(b"pong")
        await w_a.drain()
        assert await asyncio.wait_for(r_b.readexactly(4), 5) == b"pong"
        await closed(w_a)
        await closed(w_b)
    # Without a permission for the dialer's address coturn refuses it: a clear error.
    async with TurnClient(turn.address, secret_creds()) as client:
        relayed = await offer_relayed(client, "192.0.2.1")
        with pytest.raises(RelayError, match="cannot connect to TURN relayed address"):
            await connect_relayed(relayed, timeout=2)
    with pytest.raises(RelayError, match="cannot connect to TURN relayed address"):
        await connect_relayed(("127.0.0.1", free_port()), timeout=2)
    turn.stop()
    assert fds() == before
