"""Peers relayed through a real coturn (RFC 6062) on loopback: the wire offer (RELAY with
``relayed`` -> RELAY_GRANT via "turn"), the server's checks, and two Peers whose plan is
relay-only meeting through TURN with TLS on top; wrong credentials, no TURN server, no fd leak.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack  # type: ignore[import-untyped]
import pytest

from pyholepunch import relay_step
from pyholepunch.errors import RelayError, RemoteProtocolError, SignalingError
from pyholepunch.relay.turn import TurnCredentials
from pyholepunch.serve import Rendezvous
from pyholepunch.signal.client import SignalClient
from pyholepunch.signal.protocol import ErrorCode, Relay, RelayGrant, decode_body, encode_frame
from tests.aio.helpers import (
    PASSWORD,
    USER,
    fds,
    needs_coturn,
    peers,
    session_between,
    settled,
)
from tests.aio.helpers import node_client as redis_client
from tests.aio.helpers import rendezvous_client as client
from tests.coturn import Coturn
from tests.helpers import free_port

pytestmark = pytest.mark.timeout(30)



# --- the wire ---------------------------------------------------------------------------------

def wire(msg: Any) -> Any:
    return decode_body(encode_frame(msg)[4:])


def test_relay_offer_round_trips_and_old_requests_still_parse() -> None:
    offer = Relay(session="session-1", relayed=("198.51.100.7", 49152))
    assert wire(offer) == offer
    assert wire(Relay(session="session-1")).relayed is None
    grant = RelayGrant(session="session-1", token=b"", relay=("198.51.100.7", 49152), via="turn")
    assert wire(grant) == grant
    # A grant from a server that predates `via` means the built-in relay.
    body = {"t": "relay_grant", "session": "session-1", "token": b"t" * 16,
            "relay": ["203.0.113.1", 3478]}
    old = decode_body(msgpack.packb(body, use_bin_type=True))
    assert isinstance(old, RelayGrant) and old.via == "builtin"


@pytest.mark.parametrize(("relayed", "why"), [
    (("0.0.0.0", 5000), "cannot be dialed"),
    (("224.0.0.1", 5000), "cannot be dialed"),
    (("turn.example", 5000), "does not appear to be an IP"),
    (("198.51.100.7", 0), "bad address"),
    (("198.51.100.7", "80"), "bad address"),
])
def test_relay_offer_refuses_undialable_addresses(relayed: Any, why: str) -> None:
    with pytest.raises(RemoteProtocolError, match=why) as info:
        wire(Relay(session="session-1", relayed=relayed))
    assert info.value.code == ErrorCode.MALFORMED and info.value.field == "relayed"


def test_relay_grant_via_is_a_closed_set() -> None:
    with pytest.raises(RemoteProtocolError, match="not one of builtin, turn"):
        wire(RelayGrant(session="session-1", token=b"", relay=("198.51.100.7", 1), via="udp"))


def test_turn_relay_spec_and_credentials() -> None:
    assert relay_step.parse_turn_relay("turn:127.0.0.1:3479") == ("127.0.0.1", 3479)
    assert relay_step.parse_turn_relay("turn:[::1]:3479") == ("::1", 3479)
    for bad in ("turn:127.0.0.1", "turn::3479", "turn:h:0", "turn:h:99999", "stun:h:1"):
        with pytest.raises(ValueError, match="turn:HOST:PORT"):
            relay_step.parse_turn_relay(bad)
    assert relay_step.turn_credentials("u", "p", None, now=0) == TurnCredentials("u", "p")
    made = relay_step.turn_credentials("u", None, "s3cret", now=1000.0)
    assert made == TurnCredentials.from_shared_secret("s3cret", "u", now=1000.0)
    with pytest.raises(RelayError, match="needs credentials"):
        relay_step.turn_credentials("u", None, None, now=0)


# --- the rendezvous server forwards one offer, only from a participant -------------------------

@pytest.mark.asyncio
async def test_server_forwards_a_turn_offer_to_the_other_peer(rendezvous: Rendezvous) -> None:
    a, b, c = client(rendezvous, "alice"), client(rendezvous, "bob"), client(rendezvous, "carol")
    async with a, b, c:
        punch = await a.connect("bob")
        await b.next_event(5)
        ack = await a.offer_relay(punch.session, ("127.0.0.1", 40000))
        got = await b.next_event(5)
        assert got == ack
        assert (got.via, got.relay, got.token) == ("turn", ("127.0.0.1", 40000), b"")
        # One offer per session: a peer cannot make the other dial address after address.
        with pytest.raises(SignalingError, match="already offered") as info:
            await b.offer_relay(punch.session, ("127.0.0.1", 40001))
        assert info.value.code == ErrorCode.SESSION_EXISTS
        # Only the session's two peers may offer.
        with pytest.raises(SignalingError, match="no such session") as info:
            await c.offer_relay(punch.session, ("127.0.0.1", 40002))
        assert info.value.code == ErrorCode.UNKNOWN_SESSION
        assert b.incoming.empty()
        assert rendezvous.signal.metrics["turn_offers"] == 1
        # The peer went away: the offer is refused rather than lost.
        punch2 = await a.connect("carol")
        await c.next_event(5)
        await c.close()
        for _ in range(100):
            if await rendezvous.signal.store.get_online(c.peer_id) is None:
                break
            await asyncio.sleep(0.02)
        with pytest.raises(SignalingError, match="offline") as info:
            await a.offer_relay(punch2.session, ("127.0.0.1", 40003))
        assert info.value.code == ErrorCode.UNKNOWN_TARGET


# --- two Peers through coturn -------------------------------------------------------------------

@needs_coturn
@pytest.mark.asyncio
async def test_two_peers_meet_through_coturn_with_tls_on_top(
        coturn: Callable[..., Coturn], rendezvous: Rendezvous, tmp_path: Path) -> None:
    before = fds()
    turn = coturn(users={USER: PASSWORD})
    alice, bob = await peers(rendezvous, tmp_path, f"turn:127.0.0.1:{turn.config.port}",
                             turn_user=USER, turn_password=PASSWORD)
    try:
        conn = await alice.connect("bob", timeout=15)
        incoming = await asyncio.wait_for(bob.accept(), 10)
        async with conn, incoming:
            assert conn.route == incoming.route == "relay"
            assert conn.peer_id == bob.peer_id and incoming.peer_id == alice.peer_id
            steps = [s.kind for s in conn.report.steps]
            assert steps == ["relay"], steps
            assert relay_step.active_allocations() == 1
            # TLS 1.3 end to end, over a data connection to coturn (alice, ConnectionBind)
            # and to coturn's relayed address (bob, plain TCP).
            for side in (conn, incoming):
                assert side.writer.get_extra_info("ssl_object").version() == "TLSv1.3"
            assert conn.writer.get_extra_info("peername")[:2] == turn.address
            relayed = incoming.writer.get_extra_info("peername")[:2]
            assert relayed[0] == "127.0.0.1" and relayed[1] != turn.address[1]
            payload = os.urandom(300_000)
            await conn.send(payload)
            got = b""
            while len(got) < len(payload):
                got += await asyncio.wait_for(incoming.recv(65536), 5)
            assert got == payload
            await incoming.send(b"and back")
            assert await asyncio.wait_for(conn.recv(), 5) == b"and back"
            # The bytes really go through coturn: stopping it ends both sides at once.
            turn.stop()
            for side in (conn, incoming):
                with pytest.raises((ConnectionError, OSError)):
                    if not await asyncio.wait_for(side.recv(), 5):
                        raise ConnectionResetError("EOF")
    finally:
        await asyncio.gather(alice.close(), bob.close())
    assert await settled(before) == set()


@needs_coturn
@pytest.mark.asyncio
async def test_wrong_turn_credentials_fail_clearly(
        coturn: Callable[..., Coturn], rendezvous: Rendezvous, tmp_path: Path) -> None:
    before = fds()
    turn = coturn(users={USER: PASSWORD})
    alice, bob = await peers(rendezvous, tmp_path, f"turn:127.0.0.1:{turn.config.port}",
                             turn_user=USER, turn_password="wrong")
    try:
        started = time.monotonic()
        with pytest.raises(RelayError, match="401") as info:
            await alice.connect("bob", timeout=15)
        assert "wrong credentials" in str(info.value)
        assert time.monotonic() - started < 5
        assert alice.last_report is not None and alice.last_report.route is None
    finally:
        await asyncio.gather(alice.close(), bob.close())
    assert await settled(before) == set()


@needs_coturn
@pytest.mark.asyncio
async def test_missing_turn_credentials_fail_clearly(
        rendezvous: Rendezvous, tmp_path: Path) -> None:
    alice, bob = await peers(rendezvous, tmp_path, f"turn:127.0.0.1:{free_port()}")
    try:
        with pytest.raises(RelayError, match="needs credentials"):
            await alice.connect("bob", timeout=15)
    finally:
        await asyncio.gather(alice.close(), bob.close())


@pytest.mark.asyncio
async def test_no_turn_server_fails_clearly(rendezvous: Rendezvous, tmp_path: Path) -> None:
    before = fds()
    port = free_port()              # nothing listens there
    alice, bob = await peers(rendezvous, tmp_path, f"turn:127.0.0.1:{port}",
                             turn_secret="s3cret")
    try:
        with pytest.raises(RelayError, match=f"TURN relay 127.0.0.1:{port}.*unreachable"):
            await alice.connect("bob", timeout=15)
    finally:
        await asyncio.gather(alice.close(), bob.close())
    assert await settled(before) == set()


# --- turn_relay on its own: both sides' failures, and a built-in grant ---------------------------

def grant_of(b: SignalClient) -> asyncio.Future[Any]:
    """The responder's grant future, fed from its signaling events (Peer does the same)."""
    fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    async def feed() -> None:
        fut.set_result(await b.next_event(10))

    task = asyncio.ensure_future(feed())
    fut.add_done_callback(lambda _: task.cancel())
    return fut


def offer(a: SignalClient, session: str, turn: Coturn, peer_ips: list[str],
          timeout: float) -> Any:
    """alice's side: allocate on ``turn`` with the right password, permit ``peer_ips``."""
    return relay_step.turn_relay(a, session, initiator=True, turn_server=turn.address,
                              credentials=TurnCredentials(USER, PASSWORD), peer_ips=peer_ips,
                              timeout=timeout)


@needs_coturn
@pytest.mark.asyncio
async def test_permission_for_another_ip_fails_on_both_sides(
        coturn: Callable[..., Coturn], rendezvous: Rendezvous) -> None:
    before = fds()
    turn = coturn(users={USER: PASSWORD})
    a, b = client(rendezvous, "alice"), client(rendezvous, "bob")
    async with a, b:
        session = await session_between(a, b)
        grant = grant_of(b)
        ini, res = await asyncio.gather(
            offer(a, session, turn, ["127.0.0.2"], 2),      # bob dials from 127.0.0.1
            relay_step.turn_relay(b, session, initiator=False, grant=grant, timeout=2),
            return_exceptions=True)
        assert isinstance(ini, RelayError), ini
        assert "did not connect to our relayed address within 2 s" in str(ini)
        assert isinstance(res, RelayError), res
        # coturn refuses the TCP connection, or accepts and closes it: both messages say why.
        assert "no permission for our address" in str(res)
    assert await settled(before) == set()


@needs_coturn
@pytest.mark.asyncio
async def test_every_candidate_ip_is_permitted(
        coturn: Callable[..., Coturn], rendezvous: Rendezvous) -> None:
    """A peer with several public addresses may dial from any: the one CreatePermission
    covers them all (bob dials from the second), and an address of the other family is left
    out rather than failing the request."""
    turn = coturn(users={USER: PASSWORD})
    a, b = client(rendezvous, "alice"), client(rendezvous, "bob")
    async with a, b:
        session = await session_between(a, b)
        (ra, wa), (rb, wb) = await asyncio.gather(
            offer(a, session, turn, ["127.0.0.2", "::1", "127.0.0.1"], 5),
            relay_step.turn_relay(b, session, initiator=False, grant=grant_of(b), timeout=5))
        try:
            wb.write(b"from the second address")
            await wb.drain()
            assert await asyncio.wait_for(ra.readexactly(23), 5) == b"from the second address"
        finally:
            for w in (wa, wb):
                w.close()


@needs_coturn
@pytest.mark.asyncio
async def test_no_candidate_of_the_allocation_family_fails_clearly(
        coturn: Callable[..., Coturn], rendezvous: Rendezvous) -> None:
    before = fds()
    turn = coturn(users={USER: PASSWORD})
    a, b = client(rendezvous, "alice"), client(rendezvous, "bob")
    async with a, b:
        session = await session_between(a, b)
        with pytest.raises(RelayError, match=r"none of the peer's addresses ::1 is IPv4"):
            await offer(a, session, turn, ["::1"], 5)
    assert await settled(before) == set()


@pytest.mark.asyncio
async def test_responder_joins_a_builtin_grant_too() -> None:
    async with Rendezvous(("127.0.0.1", 0)) as app:
        a, b = client(app, "alice"), client(app, "bob")
        async with a, b:
            session = await session_between(a, b)
            grant = grant_of(b)
            mine = await a.request_relay(session)
            assert mine.via == "builtin"
            from pyholepunch.relay.builtin import open_builtin_relay

            (ra, wa), (rb, wb) = await asyncio.gather(
                open_builtin_relay(mine.relay, mine.token, timeout=5),
                relay_step.turn_relay(b, session, initiator=False, grant=grant, timeout=5))
            wa.write(b"via the built-in relay")
            await wa.drain()
            assert await asyncio.wait_for(rb.readexactly(22), 5) == b"via the built-in relay"
            for w in (wa, wb):
                w.close()


@pytest.mark.asyncio
async def test_responder_without_an_offer_times_out_clearly(rendezvous: Rendezvous) -> None:
    a, b = client(rendezvous, "alice"), client(rendezvous, "bob")
    async with a, b:
        session = await session_between(a, b)
        with pytest.raises(RelayError, match="offered no relay within 0.3 s"):
            await relay_step.turn_relay(b, session, initiator=False, grant=grant_of(b), timeout=0.3)


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
@pytest.mark.asyncio
async def test_turn_offer_crosses_server_nodes(nodes: list[Any]) -> None:
    """Through Redis: the grant reaches bob's node as wire data (checked again there), and
    the one-offer-per-session rule holds for the cluster, not per node."""
    n1, n2 = nodes
    async with redis_client(n1, "alice") as a, redis_client(n2, "bob") as b:
        session = await session_between(a, b)
        ack = await a.offer_relay(session, ("198.51.100.9", 50000))
        got = await b.next_event(5)
        assert got == ack and got.via == "turn" and got.relay == ("198.51.100.9", 50000)
        with pytest.raises(SignalingError, match="already offered"):
            await b.offer_relay(session, ("198.51.100.10", 50001))
