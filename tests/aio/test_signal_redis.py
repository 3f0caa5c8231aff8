"""Two rendezvous nodes sharing a REAL redis-server: names, lookups and pushes cross nodes."""
from __future__ import annotations

import asyncio
import contextlib
import shutil
import time

import pytest

from pyholepunch.errors import SignalingError
from pyholepunch.identity import Identity
from pyholepunch.signal.client import PunchInstruction, SignalClient
from pyholepunch.signal.protocol import ErrorCode
from pyholepunch.signal.server import ServerConfig, SignalServer
from pyholepunch.signal.store import PeerRecord, open_store
from tests.aio.helpers import CREDS, listening
from tests.aio.helpers import node_client as client

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")




@pytest.mark.asyncio
async def test_node_clocks_need_not_agree(redis_url: str) -> None:
    """Node 2's clock runs 3 s ahead, the peers' clocks are right: the common start still
    reaches both peers as the same instant (it crosses nodes in Redis's clock)."""
    async with contextlib.AsyncExitStack() as stack:
        servers = []
        for node, skew in (("n1", 0.0), ("n2", 3.0)):
            servers.append(await stack.enter_async_context(listening(SignalServer(
                CREDS, open_store(redis_url), ServerConfig(sync_pings=2, keepalive=3600),
                clock=lambda skew=skew: time.time() + skew, node_id=node))))
        n1, n2 = servers
        assert abs(n1.reference_offset) < 0.05 and abs(n2.reference_offset + 3.0) < 0.05
        for i, (a_node, b_node) in enumerate(((n1, n2), (n2, n1))):
            async with client(a_node, f"alice{i}") as a, client(b_node, f"bob{i}") as b:
                p = await a.connect(f"bob{i}")
                q = await b.next_event(5)
                assert isinstance(q, PunchInstruction)
                assert abs(p.start_at - q.start_at) < 0.01, (p.start_at, q.start_at)
                assert p.start_at > time.time()          # in the future for both


@pytest.mark.asyncio
async def test_connect_crosses_nodes(nodes: list[SignalServer]) -> None:
    n1, n2 = nodes
    skewed = lambda: time.time() - 3.0  # noqa: E731
    async with client(n1, "alice") as a, client(n2, "bob", clock=skewed) as b:
        p = await a.connect("bob")
        q = await b.next_event(5)
        assert p.peer.peer_id == b.peer_id and q.peer.peer_id == a.peer_id
        assert abs(p.start_at - (q.start_at + 3.0)) < 0.005     # converted on bob's node
        assert n1.metrics["frames_out"] >= 1 and n2.metrics["punches"] == 0
        ga = await a.request_relay(p.session)                   # grant routed to node 2 too
        gb = await b.next_event(5)
        assert ga.session == gb.session and ga.relay == gb.relay
        await b.report_result(p.session, "relay")               # session known on either node
        for _ in range(100):
            if n2.metrics["relayed"] == 1:
                break
            await asyncio.sleep(0.01)
        assert n2.metrics["relayed"] == 1
        p2 = await b.connect(a.peer_id)                         # and back, by peer_id
        assert (await a.next_event(5)).session == p2.session


@pytest.mark.asyncio
async def test_peer_on_a_dead_node_is_unknown_and_forgotten(nodes: list[SignalServer]) -> None:
    n1, _ = nodes
    ghost = Identity.generate()
    assert await n1.store.bind_name("ghost", ghost.public_key) is None
    await n1.store.put_online(PeerRecord(peer_id=ghost.peer_id, name="ghost",
                                         public_key=ghost.public_key, node="crashed-node"))
    async with client(n1, "eve") as e:
        with pytest.raises(SignalingError) as err:
            await e.connect("ghost")
        assert err.value.code == ErrorCode.UNKNOWN_TARGET
        assert await n1.store.get_online(ghost.peer_id) is None
        assert n1.metrics["punches"] == 0


@pytest.mark.asyncio
async def test_names_and_refusals_are_cluster_wide(nodes: list[SignalServer]) -> None:
    n1, n2 = nodes
    owner = Identity.generate()
    async with client(n1, "carol", identity=owner) as c:
        thief = client(n2, "carol", reconnect=False)
        with pytest.raises(SignalingError) as e:
            await thief.start()
        assert e.value.code == ErrorCode.NAME_TAKEN
        with pytest.raises(SignalingError) as e:
            await c.connect("nobody")
        assert e.value.code == ErrorCode.UNKNOWN_TARGET
        # the owner registering on the other node takes over; the old connection is told
        async with client(n2, "carol", identity=owner) as moved:
            for _ in range(200):
                if c.failure is not None:
                    break
                await asyncio.sleep(0.01)
            assert isinstance(c.failure, SignalingError) and c.failure.code == ErrorCode.REPLACED
            async with client(n1, "dan") as d:
                p = await d.connect("carol")
                assert (await moved.next_event(5)).session == p.session
            rec = await n1.store.find("carol")
            assert rec is not None and rec.node == "n2"


@pytest.mark.asyncio
async def test_two_serve_processes_share_redis(redis_url: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The `serve` app wiring: --store redis://, one state dir (one certificate) per cluster."""
    from pyholepunch.serve import Rendezvous

    cfg = ServerConfig(sync_pings=2, keepalive=3600)
    state = str(tmp_path / "cluster")
    async with Rendezvous(("127.0.0.1", 0), state_dir=state, store=redis_url, config=cfg,
                          stun=False) as s1, \
            Rendezvous(("127.0.0.1", 0), state_dir=state, store=redis_url, config=cfg,
                       stun=False) as s2:
        assert s1.fingerprint == s2.fingerprint and s1.address != s2.address
        a = SignalClient(s1.address, Identity.generate(), name="ann", server_fingerprint=s1.fingerprint)
        b = SignalClient(s2.address, Identity.generate(), name="ben", server_fingerprint=s2.fingerprint)
        async with a, b:
            p = await a.connect("ben")
            assert (await b.next_event(5)).session == p.session
            grant = await a.request_relay(p.session)
            assert grant.relay == s1.address and (await b.next_event(5)).relay == s1.address
