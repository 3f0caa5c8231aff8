"""A peer that gives up tells the other through the server (RESULT "failed" -> ERROR
PEER_GAVE_UP), so the other stops punching or waiting for a relay at once, saying why,
instead of running into its own timeout. Real servers on loopback (and Redis for two nodes).
"""
from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest

from pyholepunch.errors import RelayError, SignalingError
from pyholepunch.identity import Identity
from pyholepunch.peer import Peer
from pyholepunch.serve import Rendezvous
from pyholepunch.signal.client import PunchInstruction, SessionAborted, SignalClient
from pyholepunch.signal.protocol import ErrorCode
from pyholepunch.signal.server import SignalServer
from pyholepunch.signal.server_peer import MAX_GAVE_UP_REASON
from tests.aio.helpers import USER, fds, needs_coturn, peers, session_between, settled
from tests.aio.helpers import node_client as redis_client
from tests.aio.helpers import rendezvous_client as client
from tests.helpers import free_port

pytestmark = pytest.mark.timeout(30)


@pytest.mark.asyncio
async def test_a_failure_reaches_the_other_peer_with_its_reason(
        rendezvous: Rendezvous) -> None:
    a, b = client(rendezvous, "alice"), client(rendezvous, "bob")
    async with a, b:
        session = await session_between(a, b)
        await a.report_result(session, "failed", reason="no route to the relay")
        event = await b.next_event(5)
        assert event == SessionAborted(session, "alice gave up: no route to the relay")
        # And the other way round, with a reason too long to pass on whole.
        await b.report_result(session, "failed", reason="x" * 5000)
        event = await a.next_event(5)
        assert isinstance(event, SessionAborted) and event.session == session
        assert event.reason == "bob gave up: " + "x" * MAX_GAVE_UP_REASON


@pytest.mark.asyncio
async def test_success_and_reasonless_failure(rendezvous: Rendezvous) -> None:
    a, b = client(rendezvous, "alice"), client(rendezvous, "bob")
    async with a, b:
        session = await session_between(a, b)
        await a.report_result(session, "direct")
        with pytest.raises(TimeoutError):            # nothing to tell on success
            await b.next_event(0.3)
        await a.report_result(session, "failed")     # an old client sends no reason
        assert await b.next_event(5) == SessionAborted(session, "alice gave up: no reason given")


@pytest.mark.asyncio
async def test_only_a_participant_can_abort_a_session(
        rendezvous: Rendezvous) -> None:
    a, b, c = client(rendezvous, "alice"), client(rendezvous, "bob"), client(rendezvous, "carol")
    async with a, b, c:
        session = await session_between(a, b)
        await c.report_result(session, "failed", reason="let me in")
        with pytest.raises(TimeoutError):
            await b.next_event(0.3)
        assert c.failure is None       # refused without closing carol's connection
        assert rendezvous.signal.metrics["failures"] == 0


@pytest.mark.skipif(not __import__("shutil").which("redis-server"), reason="needs redis-server")
@pytest.mark.asyncio
async def test_the_notice_crosses_server_nodes(nodes: list[SignalServer]) -> None:
    n1, n2 = nodes
    async with redis_client(n1, "alice") as a, redis_client(n2, "bob") as b:
        punch = await a.connect("bob")
        assert isinstance(await b.next_event(5), PunchInstruction)
        await a.report_result(punch.session, "failed", reason="out of sockets")
        assert await b.next_event(5) == SessionAborted(punch.session,
                                                       "alice gave up: out of sockets")


@pytest.mark.asyncio
async def test_a_peer_that_declines_ends_connect_at_once(tmp_path: Path) -> None:
    """bob (a bare signaling client, announcing an address where nothing answers) answers
    the PUNCH by giving up: alice stops punching at once, well before her 10 s timeout,
    with bob's reason and code 424, and leaks nothing."""
    before = fds()
    async with Rendezvous(("127.0.0.1", 0)) as app:
        await _declined(app, tmp_path)
    assert await settled(before) == set()


async def _declined(app: Rendezvous, tmp_path: Path) -> None:
    alice = Peer(app.address, name="alice", config_dir=tmp_path / "alice",
                 server_fingerprint=app.fingerprint)
    bob = SignalClient(app.address, Identity.generate(), name="bob",
                       server_fingerprint=app.fingerprint, reconnect=False,
                       candidates=[("127.0.0.1", free_port())])
    async with bob:
        await alice.start()
        try:
            async def decline() -> None:
                punch = await bob.next_event(10)
                assert isinstance(punch, PunchInstruction)
                await asyncio.sleep(0.3)        # alice is punching by now
                await bob.report_result(punch.session, "failed", reason="busy, try later")

            declining = asyncio.create_task(decline())
            started = time.monotonic()
            with pytest.raises(SignalingError, match="bob gave up: busy, try later") as info:
                await alice.connect("bob", timeout=10)
            assert info.value.code == ErrorCode.PEER_GAVE_UP
            assert time.monotonic() - started < 3
            await declining
            report = alice.last_report
            assert report is not None and report.route is None
            assert report.steps and report.steps[0].kind != "relay"   # stopped mid-punch
        finally:
            await alice.close()


@needs_coturn
@pytest.mark.asyncio
async def test_responder_stops_when_the_initiators_relay_fails(
        coturn, rendezvous: Rendezvous, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """alice's TURN allocation is refused (wrong password); bob, waiting for her relay offer,
    hears of it at once instead of after RELAY_TIMEOUT (10 s)."""
    before = fds()
    turn = coturn(users={USER: "right"})
    alice, bob = await peers(rendezvous, tmp_path, f"turn:127.0.0.1:{turn.config.port}",
                             turn_user=USER, turn_password="wrong")
    try:
        with caplog.at_level(logging.WARNING, logger="pyholepunch.peer"):
            started = time.monotonic()
            with pytest.raises(RelayError, match="401"):
                await alice.connect("bob", timeout=15)
            for _ in range(100):
                if "alice gave up" in caplog.text:
                    break
                await asyncio.sleep(0.02)
            assert time.monotonic() - started < 4
        assert "incoming connection from alice failed: alice gave up: TURN relay" in caplog.text
        assert "401" in caplog.text.split("alice gave up:")[1]
    finally:
        await asyncio.gather(alice.close(), bob.close())
    assert await settled(before) == set()
