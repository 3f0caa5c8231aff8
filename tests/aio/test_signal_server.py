"""Rendezvous server over real TLS on 127.0.0.1: refusals with their codes, frame counts, clock skew."""
from __future__ import annotations

import asyncio
import os
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from pyholepunch.errors import SignalingError
from pyholepunch.identity import Identity
from pyholepunch.relay.builtin import RelayHub, open_builtin_relay
from pyholepunch.security import certificate_for
from pyholepunch.signal.auth import make_token
from pyholepunch.signal.client import SignalClient
from pyholepunch.signal.machine import ConnectionClosed, Role, SignalConnection
from pyholepunch.signal.protocol import (
    Error,
    ErrorCode,
    Hello,
    Message,
    Ping,
    Pong,
    Register,
    Registered,
    registration_message,
)
from pyholepunch.signal.server import ServerConfig, SignalServer
from pyholepunch.signal.store import MemoryStore
from pyholepunch.signal.tls import client_context, generate_credentials

from .helpers import listening

CREDS = generate_credentials()     # one P-256 key for the module: key generation is not under test


class RawPeer:
    """A hand-driven client: lets a test send exactly the frames it wants."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = SignalConnection(Role.CLIENT)
        self.hello: Hello | None = None
        self.inbox: list[Message | ConnectionClosed] = []   # read, not yet returned

    @classmethod
    async def open(cls, port: int) -> RawPeer:
        r, w = await asyncio.open_connection("127.0.0.1", port, ssl=client_context())
        peer = cls(r, w)
        msg = await peer.recv()
        assert isinstance(msg, Hello)
        peer.hello = msg
        return peer

    async def recv(self, timeout: float = 5.0) -> Message | ConnectionClosed:
        """The next message (a read may bring several: the registration's sync pings)."""
        while not self.inbox:
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
            self.inbox += self.conn.receive_data(data)
        return self.inbox.pop(0)

    def send(self, msg: Message) -> None:
        self.writer.write(self.conn.send(msg))

    def register_msg(self, ident: Identity, name: str, **kw: Any) -> Register:
        assert self.hello is not None
        sig = ident.sign(registration_message(self.hello.nonce, self.hello.server_id, name,
                                              ident.public_key))
        return Register(name=name, public_key=ident.public_key, challenge=self.hello.nonce,
                        signature=sig, **kw)

    async def register(self, ident: Identity, name: str, **kw: Any) -> Message | ConnectionClosed:
        """Register and answer the sync pings; return REGISTERED or the closing error."""
        self.send(self.register_msg(ident, name, **kw))
        while True:
            msg = await self.recv()
            if isinstance(msg, Ping):
                self.send(Pong(t1=msg.t1, t2=time.time(), t3=time.time()))
            else:
                return msg

    async def refused(self) -> int:
        """Read until the fatal ERROR; return its code (and check the socket then closes)."""
        msg = await self.recv()
        assert isinstance(msg, ConnectionClosed) and msg.error is not None, msg
        assert await asyncio.wait_for(self.reader.read(), 5.0) == b""
        return msg.error.code

    def close(self) -> None:
        self.writer.close()


def refused_code(msg: Message | ConnectionClosed) -> int:
    assert isinstance(msg, ConnectionClosed) and msg.error is not None, msg
    return msg.error.code


@pytest_asyncio.fixture
async def server() -> AsyncIterator[SignalServer]:
    async with listening(SignalServer(CREDS, MemoryStore(), ServerConfig(
            sync_pings=3, keepalive=3600, handshake_timeout=5.0), relay_hub=RelayHub())) as srv:
        yield srv


def port_of(srv: SignalServer) -> int:
    return int(srv._servers[0].sockets[0].getsockname()[1])


def client(srv: SignalServer, name: str, **kw: Any) -> SignalClient:
    return SignalClient(("127.0.0.1", port_of(srv)), kw.pop("identity", None) or Identity.generate(),
                        name=name, server_fingerprint=srv.server_id, **kw)


async def assert_still_serving(srv: SignalServer) -> None:
    a, b = client(srv, f"ok-{os.urandom(3).hex()}"), client(srv, f"ok-{os.urandom(3).hex()}")
    async with a, b:
        p = await a.connect(b.name)
        q = await b.next_event(5)
        assert p.session == q.session and q.peer.peer_id == a.peer_id


@pytest.mark.asyncio
async def test_register_and_punch_exchange(server: SignalServer) -> None:
    bob = Identity.generate()
    bob_cert = certificate_for(bob)      # the server checks it is DER holding bob's key
    async with client(server, "alice", candidates=[("10.0.0.2", 4000)]) as a, \
            client(server, "bob", identity=bob, cert=bob_cert) as b:
        assert a.rtt is not None and a.registrations == 1
        p = await a.connect("bob", candidates=[("10.0.0.2", 4001)])
        q = await b.next_event(5)
        assert (p.role, q.role) == ("initiator", "responder")
        assert p.peer.peer_id == b.peer_id and p.peer.public_key == b.identity.public_key
        assert p.peer.cert == bob_cert
        assert [c.address for c in q.peer.candidates] == [("10.0.0.2", 4001)]
        p2 = await a.connect(b.peer_id)                     # by peer_id too
        assert (await b.next_event(5)).session == p2.session


@pytest.mark.asyncio
async def test_one_punch_is_one_request_and_two_pushes(server: SignalServer) -> None:
    async with client(server, "alice") as a, client(server, "bob") as b:
        before = dict(server.metrics)
        a_out, b_in = a._conn.frames_out, b._conn.frames_in  # type: ignore[union-attr]
        p = await a.connect("bob")
        await b.next_event(5)
        await a.report_result(p.session, "direct", {"syns": 2})
        await b.report_result(p.session, "direct")
        for _ in range(100):
            if server.metrics["successes"] == before["successes"] + 2:
                break
            await asyncio.sleep(0.01)
        assert server.metrics["frames_in"] - before["frames_in"] == 3     # CONNECT + 2 RESULT
        assert server.metrics["frames_out"] - before["frames_out"] == 2   # 2 PUNCH
        assert a._conn.frames_out - a_out == 2 and b._conn.frames_in - b_in == 1  # type: ignore[union-attr]
        assert server.metrics["successes"] - before["successes"] == 2


@pytest.mark.asyncio
@pytest.mark.parametrize("skew", [3.0, -3.0])
async def test_start_times_agree_under_clock_skew(server: SignalServer, skew: float) -> None:
    skewed = lambda: time.time() + skew  # noqa: E731
    async with client(server, "alice") as a, client(server, "bob", clock=skewed) as b:
        assert b.offset == pytest.approx(skew, abs=0.005)
        for initiator, responder in ((a, b), (b, a)):
            p = await initiator.connect(responder.name)
            q = await responder.next_event(5)
            real = {c.name: (ins.start_at - (skew if c is b else 0.0)) for c, ins in
                    ((initiator, p), (responder, q))}
            assert abs(real["alice"] - real["bob"]) < 0.005
            # Near now, not 3 s off: the skew is corrected. (The start is 10 ms + the peers'
            # RTT spread after the PUNCHes leave; on loopback a loaded test machine may hand
            # them over later than that, which is the machine's delay, not the clock's.)
            assert -0.1 < real["alice"] - time.time() < 1.0


@pytest.mark.asyncio
async def test_wrong_signature(server: SignalServer) -> None:
    raw = await RawPeer.open(port_of(server))
    ident = Identity.generate()
    good = raw.register_msg(ident, "mallory")
    raw.send(Register(name="mallory", public_key=ident.public_key, challenge=good.challenge,
                      signature=bytes(64)))
    assert await raw.refused() == ErrorCode.BAD_SIGNATURE
    raw = await RawPeer.open(port_of(server))          # a valid signature by another key
    other = raw.register_msg(Identity.generate(), "mallory")
    raw.send(Register(name="mallory", public_key=ident.public_key, challenge=other.challenge,
                      signature=other.signature))
    assert await raw.refused() == ErrorCode.BAD_SIGNATURE
    await assert_still_serving(server)


@pytest.mark.asyncio
async def test_replayed_challenge(server: SignalServer) -> None:
    ident = Identity.generate()
    first = await RawPeer.open(port_of(server))
    captured = first.register_msg(ident, "carol")
    assert isinstance(await first.register(ident, "carol"), Registered)
    replay = await RawPeer.open(port_of(server))       # an eavesdropper replays the REGISTER
    replay.send(captured)
    assert await replay.refused() == ErrorCode.REPLAYED_CHALLENGE
    first.close()
    await assert_still_serving(server)


@pytest.mark.asyncio
async def test_stolen_name(server: SignalServer) -> None:
    async with client(server, "dave"):
        pass
    thief = client(server, "dave")
    with pytest.raises(SignalingError) as e:
        await thief.start()
    assert e.value.code == ErrorCode.NAME_TAKEN
    await thief.close()
    raw = await RawPeer.open(port_of(server))
    assert refused_code(await raw.register(Identity.generate(), "a" * 32)) == ErrorCode.BAD_NAME
    await assert_still_serving(server)


@pytest.mark.asyncio
async def test_unknown_target_is_not_fatal(server: SignalServer) -> None:
    async with client(server, "erin") as a, client(server, "frank"):
        with pytest.raises(SignalingError) as e:
            await a.connect("nobody")
        assert e.value.code == ErrorCode.UNKNOWN_TARGET
        with pytest.raises(SignalingError) as e:
            await a.connect("erin")
        assert e.value.code == ErrorCode.BAD_REQUEST
        p = await a.connect("frank")                         # same connection still works
        with pytest.raises(SignalingError) as e:
            await a.connect("frank", session=p.session)
        assert e.value.code == ErrorCode.SESSION_EXISTS
        with pytest.raises(SignalingError) as e:
            await a.request_relay("not-a-session-of-mine")
        assert e.value.code == ErrorCode.UNKNOWN_SESSION


@pytest.mark.asyncio
async def test_tokens() -> None:
    async with listening(SignalServer(CREDS, config=ServerConfig(sync_pings=2, token="s3cret"))) as srv:
        for token, code in ((None, ErrorCode.TOKEN_REQUIRED), ("guess", ErrorCode.TOKEN_INVALID),
                            (make_token("s3cret", time.time() - 1), ErrorCode.TOKEN_EXPIRED)):
            c = client(srv, "gina", token=token)
            with pytest.raises(SignalingError) as e:
                await c.start()
            assert e.value.code == code, token
            await c.close()
        async with client(srv, "gina", token=make_token("s3cret", time.time() + 60)), \
                client(srv, "hank", token="s3cret"):
            assert len(srv.peers) == 2


@pytest.mark.asyncio
@pytest.mark.parametrize("junk, code", [
    (struct.pack("!I", 10 * 1024 * 1024), ErrorCode.FRAME_TOO_LARGE),
    (struct.pack("!I", 3) + b"\xc1\xc1\xc1", ErrorCode.MALFORMED),
    (struct.pack("!I", 2) + b"\x81\xa1", ErrorCode.MALFORMED),
    (Pong(t1=1.0, t2=1.0, t3=1.0).to_wire(), ErrorCode.UNEXPECTED),
])
async def test_bad_frames(server: SignalServer, junk: Any, code: ErrorCode) -> None:
    async with client(server, "ivan"):                      # a bystander stays registered
        raw = await RawPeer.open(port_of(server))
        if isinstance(junk, dict):
            raw.conn.state = raw.conn.state.__class__.READY   # force an out-of-turn PONG out
            raw.send(Pong(**{k: v for k, v in junk.items() if k != "t"}))
        else:
            raw.writer.write(junk)
        assert await raw.refused() == code
        assert "ivan" in {p.record.name for p in server.peers.values() if p.record}
        await assert_still_serving(server)


@pytest.mark.asyncio
async def test_rate_limit_and_handshake_timeout() -> None:
    async with listening(SignalServer(CREDS, config=ServerConfig(
            sync_pings=1, rate=5, burst=5, handshake_timeout=0.3))) as srv:
        raw = await RawPeer.open(port_of(srv))
        assert isinstance(await raw.register(Identity.generate(), "judy"), Registered)
        for _ in range(20):
            raw.send(Ping(t1=time.time()))
        codes = []
        while True:
            msg = await raw.recv()
            if isinstance(msg, ConnectionClosed):
                codes.append(msg.error.code if msg.error else None)
                break
        assert codes == [ErrorCode.RATE_LIMITED]
        slow = await RawPeer.open(port_of(srv))             # says nothing after HELLO
        assert await slow.refused() == ErrorCode.TIMEOUT
        await assert_still_serving(srv)


@pytest.mark.asyncio
async def test_relay_grant_reaches_both_and_relays(server: SignalServer) -> None:
    async with client(server, "kim") as a, client(server, "lee") as b:
        p = await a.connect("lee")
        await b.next_event(5)
        grant_a = await a.request_relay(p.session)
        grant_b = await b.next_event(5)
        assert grant_a.session == grant_b.session == p.session and grant_a.token != grant_b.token
        with pytest.raises(SignalingError) as e:            # one token pair per session
            await b.request_relay(p.session)
        assert e.value.code == ErrorCode.SESSION_EXISTS
        # The hub behind this server honours the tokens (its own listener here; serve.py
        # shares one port, tested in test_serve.py).
        from pyholepunch.relay.builtin import RelayServer
        async with RelayServer(server.relay_hub) as relay:
            (ra, wa), (rb, wb) = await asyncio.gather(
                open_builtin_relay(relay.address, grant_a.token, timeout=5),
                open_builtin_relay(relay.address, grant_b.token, timeout=5))
            wa.write(b"ping")
            assert await asyncio.wait_for(rb.readexactly(4), 5) == b"ping"
            wa.close()
            wb.close()
        assert server.metrics["relays"] == 1


@pytest.mark.asyncio
async def test_relay_unavailable_without_hub() -> None:
    async with listening(SignalServer(CREDS, config=ServerConfig(sync_pings=1))) as srv:
        async with client(srv, "mo") as a, client(srv, "ned") as b:
            p = await a.connect("ned")
            await b.next_event(5)
            with pytest.raises(SignalingError) as e:
                await a.request_relay(p.session)
            assert e.value.code == ErrorCode.RELAY_UNAVAILABLE


@pytest.mark.asyncio
async def test_update_and_reregistration_replaces_old_connection(server: SignalServer) -> None:
    ident = Identity.generate()
    async with client(server, "olga", identity=ident) as old, client(server, "pat") as b:
        await old.update(candidates=[("192.0.2.9", 9999)])
        await asyncio.sleep(0.05)
        p = await b.connect("olga")
        assert [c.address for c in p.peer.candidates] == [("192.0.2.9", 9999)]
        await old.next_event(5)
        raw = await RawPeer.open(port_of(server))
        assert isinstance(await raw.register(ident, "olga"), Registered)
        for _ in range(100):                                # the old connection is told and closed
            if old.failure is not None:
                break
            await asyncio.sleep(0.02)
        assert isinstance(old.failure, SignalingError) and old.failure.code == ErrorCode.REPLACED
        raw.close()


@pytest.mark.asyncio
async def test_server_full_and_idle_timeout() -> None:
    async with listening(SignalServer(CREDS, config=ServerConfig(
            sync_pings=1, max_peers=1, keepalive=0.1, idle_timeout=0.3))) as srv:
        silent = await RawPeer.open(port_of(srv))
        assert isinstance(await silent.register(Identity.generate(), "quiet"), Registered)
        extra = client(srv, "one-too-many")
        with pytest.raises(SignalingError) as e:
            await extra.start()
        assert e.value.code == ErrorCode.SERVER_FULL
        await extra.close()
        # keepalive pings arrive; a peer that never answers is dropped after idle_timeout
        msg = await silent.recv()
        assert isinstance(msg, Ping) and msg.rtt is not None
        while isinstance(msg, Ping):
            msg = await silent.recv()
        assert refused_code(msg) == ErrorCode.TIMEOUT
        for _ in range(100):
            if not srv.peers:
                break
            await asyncio.sleep(0.01)
        assert not srv.peers and await srv.store.online_count() == 0
        async with client(srv, "answers-pings") as ok:     # the real client keeps itself alive
            await asyncio.sleep(0.6)
            assert ok.connected.is_set() and ok.registrations == 1


@pytest.mark.asyncio
async def test_unregistered_connection_flood_is_capped() -> None:
    async with listening(SignalServer(CREDS, config=ServerConfig(sync_pings=1, max_unregistered=3))) as srv:
        async with client(srv, "early"):                   # registered peers do not count
            idle = [await asyncio.open_connection("127.0.0.1", port_of(srv)) for _ in range(3)]
            r, w = await asyncio.open_connection("127.0.0.1", port_of(srv))
            try:
                assert await asyncio.wait_for(r.read(), 5) == b""
            except ConnectionResetError:
                pass
            assert srv.metrics["refused"] == 1
            for _, iw in idle:
                iw.close()
            w.close()
            await asyncio.sleep(0.1)
            await assert_still_serving(srv)


def test_error_codes_are_unique() -> None:
    assert len({int(c) for c in ErrorCode}) == len(ErrorCode)
    assert Error(code=1, reason="x").fatal
