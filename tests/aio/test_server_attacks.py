"""The rendezvous server under attack (issue #11), signaling side: each attack against a real
`Rendezvous` on loopback over real TLS, and a legitimate pair coordinating right after it
within 2 x its idle time. Floods (idle connections, partial preambles, memory) are in
test_server_attacks_flood.py; the relay in test_server_attacks_relay.py."""
from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest
import pytest_asyncio

from pyholepunch.errors import QuotaError
from pyholepunch.identity import Identity
from pyholepunch.security import certificate_for
from pyholepunch.serve import Rendezvous
from pyholepunch.signal.client import SignalClient, _punch
from pyholepunch.signal.protocol import (
    MAX_START_AHEAD,
    Connect,
    Error,
    ErrorCode,
    Ping,
    Pong,
    Punch,
    Registered,
)
from pyholepunch.signal.server import ServerConfig
from pyholepunch.signal.store import NameLimits, RedisStore
from tests.aio.attack_tools import RawPeer, coordinate, idle_time, within_twice
from tests.aio.test_signal_redis import redis_url  # noqa: F401  (fixture)

pytestmark = pytest.mark.timeout(60)
CFG = ServerConfig(sync_pings=2, keepalive=3600, handshake_timeout=3.0)


@pytest_asyncio.fixture
async def app() -> AsyncIterator[Rendezvous]:
    async with Rendezvous(("127.0.0.1", 0), config=replace(CFG), relay=False) as r:
        yield r


def victim_of(app: Rendezvous, name: str = "victim", **kw: Any) -> SignalClient:
    return SignalClient(app.address, Identity.generate(), name=name, reconnect=False,
                        server_fingerprint=app.fingerprint, **kw)


async def attacker(app: Rendezvous, name: str, **kw: Any) -> RawPeer:
    peer = RawPeer(app.address, app.fingerprint, name, bind=kw.pop("bind", "127.0.0.2"))
    assert isinstance(await peer.register(**kw), Registered)
    return peer


async def error_of(peer: RawPeer, timeout: float = 5.0) -> tuple[int, bool]:
    """(code, fatal) of the next ERROR the server sends ``peer``."""
    while True:
        msg = await peer.recv(timeout)
        if isinstance(msg, Error):
            return msg.code, msg.fatal
        if hasattr(msg, "error"):                     # ConnectionClosed
            err = msg.error                           # type: ignore[union-attr]
            assert err is not None, "closed without an error frame"
            return err.code, True


async def still_online(app: Rendezvous, victim: SignalClient) -> None:
    """The victim kept its one connection and still receives punches."""
    assert victim.failure is None and victim.registrations == 1
    async with victim_of(app, f"probe-{os.urandom(2).hex()}") as probe:
        p = await probe.connect(victim.name)
        q = await victim.next_event(5)
        assert q.session == p.session                 # type: ignore[union-attr]


# 1. -------------------------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_no_peer_can_disconnect_another_by_name(app: Rendezvous) -> None:
    """A 40 kB certificate or 40 kB of profiles made the PUNCH for the target exceed the
    frame limit and the server closed the TARGET. Now both are refused on arrival, to the
    sender, and the target never notices."""
    idle = await idle_time(app.address, app.fingerprint)
    async with victim_of(app) as victim:
        big_cert = RawPeer(app.address, app.fingerprint, "mallory")
        answer = await big_cert.register(cert=os.urandom(40_000))
        assert not isinstance(answer, Registered)
        assert answer.error.code == ErrorCode.MALFORMED   # type: ignore[union-attr]
        await big_cert.close()
        # A well-formed certificate for another key is refused as well (it would be the
        # victim's only trust anchor for mallory).
        forged = RawPeer(app.address, app.fingerprint, "mallory2")
        answer = await forged.register(cert=certificate_for(Identity.generate()))
        assert answer.error.code == ErrorCode.BAD_REQUEST  # type: ignore[union-attr]
        await forged.close()
        mallory = await attacker(app, "mallory3")
        for _ in range(3):
            mallory.send_frame(Connect(session=os.urandom(8).hex(), target="victim",
                                       profiles=[{"transport": "tcp", "pad": "x" * 40_000}]))
        assert (await error_of(mallory))[0] == ErrorCode.MALFORMED
        await mallory.close()
        await still_online(app, victim)
        assert within_twice(await coordinate(app.address, app.fingerprint), idle)


@pytest.mark.asyncio
async def test_a_push_that_cannot_be_built_is_refused_to_its_sender() -> None:
    """Whatever slips past the field bounds (here: a server with a tiny frame limit), the
    PUNCH that would not fit is refused to the peer that asked, which stays connected."""
    cfg = replace(CFG, max_frame=2500)
    async with Rendezvous(("127.0.0.1", 0), config=cfg, relay=False) as app:
        async with victim_of(app, max_frame=2500) as victim:
            mallory = await attacker(app, "mallory", profiles=[{"transport": "tcp",
                                                                "pad": "x" * 2000}])
            for _ in range(3):
                mallory.send(Connect(session=os.urandom(8).hex(), target="victim"))
                assert await error_of(mallory) == (ErrorCode.BAD_REQUEST, False)
            await still_online(app, victim)
            mallory.send(Connect(session=os.urandom(8).hex(), target=victim.name))
            assert await error_of(mallory) == (ErrorCode.BAD_REQUEST, False)   # still served
            await mallory.close()


# 4. -------------------------------------------------------------------------------------------

def lying_pong(ping: Ping, at: float) -> Pong:
    """Echo t1 but claim the reply left a billion seconds before the ping arrived."""
    return Pong(t1=ping.t1, t2=at, t3=at - 1e9)


def forged_pong(ping: Ping, at: float) -> Pong:
    """A pong for a ping the server never sent."""
    return Pong(t1=ping.t1 - 1e6, t2=at, t3=at)


async def punch_ahead(victim: SignalClient) -> float:
    event = await victim.next_event(5)
    assert isinstance(event.start_at, float)          # type: ignore[union-attr]
    return event.start_at - time.time()               # type: ignore[union-attr]


@pytest.mark.asyncio
async def test_peers_cannot_set_their_own_timing() -> None:
    """A peer's claimed round trip scheduled a PUNCH 28.5 years ahead. Now a pong counts
    only if it echoes a ping the server sent and its times fit the measured round trip, and
    any start is clamped to MAX_START_AHEAD."""
    cfg = replace(CFG, keepalive=0.2)
    async with Rendezvous(("127.0.0.1", 0), config=cfg, relay=False) as app:
        idle = await idle_time(app.address, app.fingerprint)
        async with victim_of(app) as victim:
            liar = RawPeer(app.address, app.fingerprint, "liar", bind="127.0.0.2")
            answer = await liar.register(pong=lying_pong, timeout=6)
            if isinstance(answer, Registered):        # (the old server took any sample)
                assert answer.rtt < cfg.max_rtt
                liar.send(Connect(session=os.urandom(8).hex(), target="victim"))
                assert await punch_ahead(victim) <= MAX_START_AHEAD + 0.5
            await liar.close()
            # Honest while registering, lying on every keepalive after.
            mallory = await attacker(app, "mallory")
            for pong in (lying_pong, forged_pong):
                await mallory.answer_pings(pong, 0.7)
                mallory.send(Connect(session=os.urandom(8).hex(), target="victim"))
                assert await punch_ahead(victim) <= MAX_START_AHEAD + 0.5
            await mallory.close()
            assert within_twice(await coordinate(app.address, app.fingerprint), idle)


@pytest.mark.asyncio
async def test_punches_per_target_are_rate_limited(app: Rendezvous) -> None:
    """5 peers delivered 200 PUNCHes/s to one victim; now at most punch_burst plus
    punch_rate/s reach it, the senders hear 429, and everyone else is unaffected."""
    idle = await idle_time(app.address, app.fingerprint)
    cfg = app.signal.config
    async with victim_of(app) as victim:
        gang = [await attacker(app, f"gang-{i}") for i in range(5)]
        started = time.monotonic()
        for _ in range(40):
            for peer in gang:
                peer.send(Connect(session=os.urandom(8).hex(), target="victim"))
            await asyncio.sleep(0.01)
        got = 0
        while True:
            try:
                await victim.next_event(0.5)
            except TimeoutError:
                break
            got += 1
        elapsed = time.monotonic() - started
        assert got <= cfg.punch_burst + cfg.punch_rate * elapsed + 1, (got, elapsed)
        codes = set()
        for peer in gang:
            with pytest.raises(TimeoutError):
                while True:
                    msg = await peer.recv(0.2)
                    if isinstance(msg, Error):
                        codes.add(msg.code)
            assert peer.closed is None              # refused, not disconnected
            await peer.close()
        assert ErrorCode.RATE_LIMITED in codes
        assert within_twice(await coordinate(app.address, app.fingerprint), idle)


@pytest.mark.asyncio
async def test_candidates_must_be_addresses_a_peer_can_have() -> None:
    """PUNCH candidates were whatever the other side announced: a victim dialled
    attacker-chosen addresses. Multicast, unspecified, broadcast and (from a peer that is
    not on the server's host, here by configuration) loopback are refused to the sender."""
    cfg = replace(CFG, loopback_candidates=False)
    async with Rendezvous(("127.0.0.1", 0), config=cfg, relay=False) as app:
        async with victim_of(app) as victim:
            mallory = await attacker(app, "mallory")
            for bad in (("224.0.0.5", 80), ("0.0.0.0", 9), ("255.255.255.255", 9),
                        ("127.0.0.1", 22), ("::ffff:10.0.0.1", 80)):
                mallory.send_frame(Connect(session=os.urandom(8).hex(), target="victim",
                                           candidates=[bad]))
                code, _ = await error_of(mallory)
                assert code in (ErrorCode.BAD_REQUEST, ErrorCode.MALFORMED), bad
                if mallory.closed is not None:
                    await mallory.close()
                    mallory = await attacker(app, f"mallory-{os.urandom(2).hex()}")
            many = [(f"198.51.100.{i}", 1000 + i) for i in range(40)]
            mallory.send_frame(Connect(session=os.urandom(8).hex(), target="victim",
                                       candidates=many))
            assert (await error_of(mallory))[0] == ErrorCode.MALFORMED
            await mallory.close()
            with pytest.raises(TimeoutError):
                await victim.next_event(0.3)          # no PUNCH reached the victim
            await still_online(app, victim)


def test_the_peer_clamps_a_far_start_itself() -> None:
    """The client side of the clamp: a PUNCH from any server starts at most MAX_START_AHEAD
    from when it arrived."""
    now = time.time()
    peer = {"peer_id": "a" * 32, "name": "x", "public_key": b"k" * 32, "cert": None,
            "candidates": [], "profiles": []}
    far = Punch(session="session-1", role="responder", start_at=now + 9e8, peer=peer)
    assert _punch(far, now).start_at == now + MAX_START_AHEAD
    near = replace(far, start_at=now + 0.2)
    assert _punch(near, now).start_at == now + 0.2


# 6. and 7. -----------------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_malformed_tokens_are_refused_never_a_500(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    async with Rendezvous(("127.0.0.1", 0), token="s3cret", config=replace(CFG),
                          relay=False) as app:
        for token in ("hp1.\u00b2.x", "hp1." + "9" * 5000 + "." + "0" * 32, "hp1.1.2.3",
                      "hp1.\u0661\u0662.abc", "hp1.99999999999.zz"):
            peer = RawPeer(app.address, app.fingerprint, "tok")
            answer = await peer.register(token=token)
            code = answer.error.code                       # type: ignore[union-attr]
            assert code in (ErrorCode.TOKEN_INVALID, ErrorCode.MALFORMED), token   # 4xx
            await peer.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


@pytest.mark.asyncio
async def test_a_name_is_matched_whole(app: Rendezvous) -> None:
    """ "bob\\n" registered as a name distinct from "bob" (the patterns ended in "$"). """
    async with victim_of(app, "bob"):
        for name in ("bob\n", "bob\n\n", "\nbob"):
            peer = RawPeer(app.address, app.fingerprint, name)
            answer = await peer.register()
            assert not isinstance(answer, Registered), repr(name)
            assert 400 <= answer.error.code < 500      # type: ignore[union-attr]
            await peer.close()
        mallory = await attacker(app, "mallory")
        mallory.send_frame(Connect(session="sess-0001\n", target="bob"))
        assert (await error_of(mallory))[0] == ErrorCode.MALFORMED


@pytest.mark.asyncio
async def test_name_bindings_expire_and_are_capped() -> None:
    """Names were never freed and unlimited: now a binding unused for ``ttl`` is free again,
    one key holds at most ``per_key`` names and one address at most ``per_source``."""
    cfg = replace(CFG, names=NameLimits(ttl=1.5, per_key=2, per_source=3,
                                                exempt_loopback=False))
    async with Rendezvous(("127.0.0.1", 0), config=cfg, relay=False) as app:
        key = Identity.generate()
        for i, expected in enumerate((True, True, False)):          # per key
            peer = RawPeer(app.address, app.fingerprint, f"k{i}", identity=key, bind="127.0.0.5")
            answer = await peer.register()
            assert isinstance(answer, Registered) is expected
            if not expected:
                assert answer.error.code == ErrorCode.QUOTA_EXCEEDED  # type: ignore[union-attr]
            await peer.close()
        other = RawPeer(app.address, app.fingerprint, "k2", bind="127.0.0.5")  # 3rd of .5
        assert isinstance(await other.register(), Registered)
        await other.close()
        fourth = RawPeer(app.address, app.fingerprint, "k3", bind="127.0.0.5")
        answer = await fourth.register()
        assert answer.error.code == ErrorCode.QUOTA_EXCEEDED    # type: ignore[union-attr]
        await fourth.close()
        thief = RawPeer(app.address, app.fingerprint, "k0", bind="127.0.0.6")
        answer = await thief.register()
        assert answer.error.code == ErrorCode.NAME_TAKEN        # type: ignore[union-attr]
        await thief.close()
        await asyncio.sleep(1.6)                     # k0 unused past its ttl: free again
        thief = RawPeer(app.address, app.fingerprint, "k0", bind="127.0.0.6")
        assert isinstance(await thief.register(), Registered)
        await thief.close()


@pytest.mark.skipif(not __import__("shutil").which("redis-server"), reason="needs redis-server")
@pytest.mark.asyncio
async def test_name_bindings_expire_and_are_capped_in_redis(redis_url: str) -> None:  # noqa: F811
    """The same rules for nodes sharing a REAL redis-server."""
    store = RedisStore(redis_url, names=NameLimits(ttl=1.0, per_key=2, per_source=2,
                                                   exempt_loopback=False))
    a, b, c = (Identity.generate().public_key for _ in range(3))
    try:
        await store.start("n1", lambda push: asyncio.sleep(0, True))
        assert await store.bind_name("r1", a, "198.51.100.1") is None
        assert await store.bind_name("r2", a, "198.51.100.2") is None
        with pytest.raises(QuotaError, match="this key"):
            await store.bind_name("r3", a, "198.51.100.3")
        assert await store.bind_name("r3", b, "198.51.100.1") is None
        with pytest.raises(QuotaError, match="198.51.100.1"):
            await store.bind_name("r4", c, "198.51.100.1")
        assert await store.bind_name("r1", c, "198.51.100.9") == a
        await asyncio.sleep(1.2)                      # every binding past its ttl
        assert await store.key_of("r1") is None
        assert await store.bind_name("r1", c, "198.51.100.1") is None
    finally:
        await store.close()
