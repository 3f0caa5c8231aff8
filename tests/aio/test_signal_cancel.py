"""A connect given up on before its PUNCH came must cost the other peer nothing: the server
hears of it at once and tells the other peer (which stops punching and lets go of its punch
port), and a PUNCH that still arrives is not mistaken for an incoming session. And the server
sends its small frames at once (no Nagle delay behind the peer's delayed ACK)."""
from __future__ import annotations

import asyncio
import socket

import pytest

from pyholepunch.errors import SignalingError
from pyholepunch.serve import Rendezvous
from pyholepunch.signal.client import PunchInstruction, SessionAborted

from .helpers import rendezvous_client

pytestmark = pytest.mark.timeout(30)


@pytest.mark.asyncio
@pytest.mark.parametrize("how", ["cancelled", "timed out"])
async def test_a_connect_given_up_before_its_punch_ends_the_other_side(
        rendezvous: Rendezvous, how: str) -> None:
    alice, bob = rendezvous_client(rendezvous, "alice"), rendezvous_client(rendezvous, "bob")
    async with alice, bob:
        if how == "cancelled":
            task = asyncio.ensure_future(alice.connect("bob"))
            await asyncio.sleep(0)              # CONNECT is sent: give up before the PUNCH
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        else:
            with pytest.raises(TimeoutError):
                await alice.connect("bob", timeout=0)
        punch = await bob.next_event(5)
        assert isinstance(punch, PunchInstruction) and punch.role == "responder"
        aborted = await bob.next_event(5)
        assert isinstance(aborted, SessionAborted) and aborted.session == punch.session
        assert "alice gave up: stopped waiting before the punch" in aborted.reason
        # The server sent alice her PUNCH before it handled her RESULT: one more round trip
        # on the same stream and that PUNCH has been read, and dropped, not queued as an
        # incoming session of ours.
        with pytest.raises(SignalingError) as info:
            await alice.connect("nobody", timeout=5)
        assert info.value.code == 404
        assert alice.incoming.empty()


@pytest.mark.asyncio
async def test_server_connections_send_small_frames_at_once(rendezvous: Rendezvous) -> None:
    """The server takes its sockets from accept() (proto 0), where asyncio leaves Nagle on:
    a PUNCH behind an unacknowledged frame then waited for the peer's delayed ACK (~40 ms)."""
    async with rendezvous_client(rendezvous, "alice"), rendezvous_client(rendezvous, "bob"):
        peers = list(rendezvous.signal.peers.values())
        assert len(peers) == 2
        for proto in peers:
            sock = proto.transport.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0, proto.name
