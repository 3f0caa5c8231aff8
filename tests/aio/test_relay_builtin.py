"""The built-in relay end to end on loopback: tokens, pairing, bytes, limits, refusals, fds."""
from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable
from typing import Any

import pytest

from pyholepunch import engine as engine_mod
from pyholepunch.errors import RelayError
from pyholepunch.relay.builtin import RelayHub, RelayServer, open_builtin_relay

from .helpers import closed, fds, settled

pytestmark = pytest.mark.timeout(20)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["native", "pure", "tap"])
def pump(request: pytest.FixtureRequest) -> dict[str, Any]:
    """How the hub moves bytes: either engine's relay_pump, or the in-process tap pump."""
    if request.param == "tap":
        seen: list[tuple[str, bytes]] = []
        return {"tap": lambda d, b: seen.append((d, b)), "seen": seen}
    try:
        return {"engine": engine_mod.get(request.param)}
    except ImportError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"the {request.param} engine is not available under CI: {exc}")
        pytest.skip(f"{request.param} engine unavailable: {exc}")


HubFactory = Callable[..., Any]


async def pair(srv: RelayServer, session: str = "s1", timeout: float = 5.0) -> tuple[Any, Any]:
    ta, tb = srv.hub.issue(session)
    a, b = await asyncio.gather(open_builtin_relay(srv.address, ta, timeout=timeout),
                                open_builtin_relay(srv.address, tb, timeout=timeout))
    return a, b


async def close(*streams: Any) -> None:
    await closed(*(w for _r, w in streams))


async def close_and_settle(srv: RelayServer, *streams: Any) -> None:
    """Close both ends, then wait (up to 2 s) until the hub has no relay left pumping."""
    await close(*streams)
    for _ in range(100):
        if srv.hub.metrics.active_relays == 0:
            break
        await asyncio.sleep(0.02)


@pytest.mark.asyncio
async def test_bytes_both_ways_and_half_close(make_server: HubFactory, pump: dict[str, Any]) -> None:
    before = fds()
    srv = await make_server(engine=pump.get("engine"), tap=pump.get("tap"))
    (ra, wa), (rb, wb) = await pair(srv)
    payload = os.urandom(300_000)
    wa.write(payload)
    await wa.drain()
    wa.write_eof()                                  # a half-closes: b sees EOF after the data
    assert await asyncio.wait_for(rb.read(), 5) == payload
    wb.write(b"reply after half-close")             # b can still talk to a
    await wb.drain()
    wb.write_eof()
    assert await asyncio.wait_for(ra.read(), 5) == b"reply after half-close"
    await close_and_settle(srv, (ra, wa), (rb, wb))
    m = srv.hub.metrics
    assert m.active_relays == 0 and m.relays_total == 1
    assert m.bytes_relayed == len(payload) + len(b"reply after half-close")
    if "seen" in pump:
        seen = pump["seen"]
        assert b"".join(c for d, c in seen if d == "a>b") == payload
        assert b"".join(c for d, c in seen if d == "b>a") == b"reply after half-close"
    await srv.close()
    assert await settled(before) == set()   # closing transports run a loop turn later


@pytest.mark.asyncio
async def test_tokens_of_different_sessions_never_pair(make_server: HubFactory) -> None:
    srv = await make_server(engine=engine_mod.get("pure"), pair_timeout=0.4, token_ttl=0.1)
    s1 = srv.hub.issue("one")
    s2 = srv.hub.issue("two")
    results = await asyncio.gather(open_builtin_relay(srv.address, s1[0], timeout=5),
                                   open_builtin_relay(srv.address, s2[1], timeout=5),
                                   return_exceptions=True)
    for res in results:
        assert isinstance(res, RelayError) and "peer did not arrive" in str(res)
    assert srv.hub.metrics.relays_total == 0 and srv.hub.metrics.unpaired == 2
    # The same side of one session twice is no pair either: the second use is refused.
    s3 = srv.hub.issue("three")
    first = asyncio.ensure_future(open_builtin_relay(srv.address, s3[0], timeout=5))
    await asyncio.sleep(0.1)
    with pytest.raises(RelayError, match="token already used"):
        await open_builtin_relay(srv.address, s3[0], timeout=5)
    with pytest.raises(RelayError, match="peer did not arrive"):
        await first


@pytest.mark.asyncio
async def test_token_used_twice_is_refused(make_server: HubFactory) -> None:
    srv = await make_server(engine=engine_mod.get("pure"))
    ta, tb = srv.hub.issue("s")
    a, b = await asyncio.gather(open_builtin_relay(srv.address, ta, timeout=5),
                                open_builtin_relay(srv.address, tb, timeout=5))
    for tok in (ta, tb):
        with pytest.raises(RelayError, match="token already used"):
            await open_builtin_relay(srv.address, tok, timeout=5)
    # The live relay is untouched by the refused attempts.
    a[1].write(b"still here")
    await a[1].drain()
    assert await asyncio.wait_for(b[0].readexactly(10), 5) == b"still here"
    await close(a, b)
    assert srv.hub.metrics.refused == {"reused": 2}


@pytest.mark.asyncio
async def test_unknown_expired_and_malformed(make_server: HubFactory) -> None:
    clock = FakeClock()
    srv = await make_server(engine=engine_mod.get("pure"), token_ttl=10, clock=clock)
    with pytest.raises(RelayError, match="unknown token"):
        await open_builtin_relay(srv.address, os.urandom(16), timeout=5)
    ta, _tb = srv.hub.issue("late")
    clock.now += 10.5
    with pytest.raises(RelayError, match="expired token"):
        await open_builtin_relay(srv.address, ta, timeout=5)
    # Not our protocol at all: refused with a reason, connection closed, nothing hangs.
    r, w = await asyncio.open_connection(*srv.address)
    w.write(b"GET / HTTP/1.1\r\n\r\n")
    await w.drain()
    reply = await asyncio.wait_for(r.read(), 5)
    assert reply[0] == 1 and reply[2:] == b"bad preamble"
    await close((r, w))
    # The magic but a truncated token: refused once the handshake time is up.
    srv2 = await make_server(engine=engine_mod.get("pure"), handshake_timeout=0.3)
    r, w = await asyncio.open_connection(*srv2.address)
    w.write(b"HPR1" + b"\x00" * 5)
    await w.drain()
    assert (await asyncio.wait_for(r.read(), 5))[2:] == b"bad preamble"
    await close((r, w))
    with pytest.raises(ValueError, match="16 bytes"):
        await open_builtin_relay(srv.address, b"short", timeout=5)
    with pytest.raises(ValueError, match="already issued"):
        srv.hub.issue("late")


@pytest.mark.asyncio
async def test_unpaired_side_times_out(make_server: HubFactory) -> None:
    srv = await make_server(engine=engine_mod.get("pure"), pair_timeout=0.3, token_ttl=0.2)
    ta, _ = srv.hub.issue("alone")
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(RelayError, match="peer did not arrive"):
        await open_builtin_relay(srv.address, ta, timeout=5)
    assert loop.time() - t0 < 2.0
    # The client's own timeout also bounds the wait, with its own message.
    srv2 = await make_server(engine=engine_mod.get("pure"), pair_timeout=10)
    tc, _ = srv2.hub.issue("alone")
    with pytest.raises(RelayError, match="no pairing within 0.3 s"):
        await open_builtin_relay(srv2.address, tc, timeout=0.3)


@pytest.mark.asyncio
async def test_unreachable_relay() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()                                   # nobody listens there now
    with pytest.raises(RelayError, match="unreachable"):
        await open_builtin_relay(("127.0.0.1", port), os.urandom(16), timeout=2)


@pytest.mark.asyncio
async def test_byte_limit(make_server: HubFactory, pump: dict[str, Any]) -> None:
    srv = await make_server(engine=pump.get("engine"), tap=pump.get("tap"), max_bytes=10_000)
    (ra, wa), (rb, wb) = await pair(srv)
    wa.write(os.urandom(100_000))
    try:
        await asyncio.wait_for(wa.drain(), 5)
    except (ConnectionError, TimeoutError):
        pass
    got = await asyncio.wait_for(rb.read(), 5)       # EOF comes: the relay ended
    assert len(got) <= 10_000
    await close_and_settle(srv, (ra, wa), (rb, wb))
    assert srv.hub.metrics.ended == {"limit": 1}


@pytest.mark.asyncio
async def test_idle_limit(make_server: HubFactory, pump: dict[str, Any]) -> None:
    srv = await make_server(engine=pump.get("engine"), tap=pump.get("tap"), idle_timeout=0.3)
    (ra, wa), (rb, wb) = await pair(srv)
    wa.write(b"x")
    assert await asyncio.wait_for(rb.readexactly(1), 5) == b"x"
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    assert await asyncio.wait_for(rb.read(), 5) == b""     # closed for idleness
    assert 0.2 < loop.time() - t0 < 3.0
    await close_and_settle(srv, (ra, wa), (rb, wb))
    assert srv.hub.metrics.ended == {"idle": 1}


@pytest.mark.asyncio
async def test_close_ends_live_relays_without_leaks(pump: dict[str, Any]) -> None:
    before = fds()
    srv = RelayServer(RelayHub(engine=pump.get("engine"), tap=pump.get("tap"), pair_timeout=5))
    await srv.start()
    try:
        a, b = await pair(srv)
        waiting_tok, _ = srv.hub.issue("waiting")
        waiter = asyncio.ensure_future(open_builtin_relay(srv.address, waiting_tok, timeout=5))
        await asyncio.sleep(0.1)
    finally:
        await asyncio.wait_for(srv.close(), 5)
    assert await asyncio.wait_for(b[0].read(), 5) == b""
    with pytest.raises(RelayError):
        await waiter
    await close(a, b)
    assert await settled(before) == set()   # closing transports run a loop turn later
    # A closed hub refuses politely rather than hanging.
    with pytest.raises(ValueError):
        RelayHub(token_ttl=0)


@pytest.mark.asyncio
async def test_waiting_side_that_leaves_or_talks_early_is_not_paired(
        make_server: HubFactory) -> None:
    srv = await make_server(engine=engine_mod.get("pure"), pair_timeout=0.4, token_ttl=0.6)
    # A joins and gives up before B arrives: B must hear "peer did not arrive", never a
    # relay to a dead socket.
    ta, tb = srv.hub.issue("left")
    r, w = await asyncio.open_connection(*srv.address)
    w.write(b"HPR1" + ta)
    await w.drain()
    await asyncio.sleep(0.05)
    await close((r, w))
    await asyncio.sleep(0.05)
    with pytest.raises(RelayError, match="peer did not arrive"):
        await open_builtin_relay(srv.address, tb, timeout=5)
    assert srv.hub.metrics.relays_total == 0
    # Payload before the OK byte breaks the protocol: refused with that reason.
    tc, _td = srv.hub.issue("eager")
    r, w = await asyncio.open_connection(*srv.address)
    w.write(b"HPR1" + tc + b"too soon")
    await w.drain()
    reply = await asyncio.wait_for(r.read(), 5)
    assert reply[0] == 7 and reply[2:] == b"data before pairing"
    await close((r, w))
    assert srv.hub.metrics.refused.get("early_data") == 1


@pytest.mark.asyncio
async def test_many_concurrent_relays_and_capacity(make_server: HubFactory) -> None:
    # More live relays than the loop's default executor has workers: all must flow at once.
    srv = await make_server(engine=engine_mod.get("pure"))
    pairs = [await pair(srv, f"s{i}") for i in range(12)]
    for i, ((_ra, wa), (_rb, _wb)) in enumerate(pairs):
        wa.write(f"relay {i:02d}".encode())
    for i, ((_ra, _wa), (rb, _wb)) in enumerate(pairs):
        assert await asyncio.wait_for(rb.readexactly(8), 5) == f"relay {i:02d}".encode()
    assert srv.hub.metrics.active_relays == 12
    await close(*[s for p in pairs for s in p])
    # At capacity, a new pair is refused on both sides with that reason.
    full = await make_server(engine=engine_mod.get("pure"), max_relays=1)
    live = await pair(full, "one")
    ta, tb = full.hub.issue("two")
    results = await asyncio.gather(open_builtin_relay(full.address, ta, timeout=5),
                                   open_builtin_relay(full.address, tb, timeout=5),
                                   return_exceptions=True)
    for res in results:
        assert isinstance(res, RelayError) and "relay at capacity" in str(res)
    await close(*live)


@pytest.mark.asyncio
async def test_a_released_session_frees_its_quota_and_refuses_its_tokens(
        make_server: HubFactory) -> None:
    """A relay granted beside a punch that then went direct (or a connect that was given up)
    is released by the server on the peers' RESULT: the quota is free at once, a side that
    already waits is refused, its tokens no longer work; a pumping relay is left alone."""
    from pyholepunch.errors import QuotaError
    srv = await make_server(engine=engine_mod.get("pure"))
    hub, quota = srv.hub, [("peer:alice", 1)]
    ta, tb = hub.issue("went-direct", quotas=quota)
    with pytest.raises(QuotaError):
        hub.issue("next", quotas=quota)
    waiting = asyncio.ensure_future(open_builtin_relay(srv.address, ta, timeout=5))
    for _ in range(100):                         # the first side is in, waiting for its peer
        if hub._sessions["went-direct"].waiting is not None:
            break
        await asyncio.sleep(0.01)
    assert hub.release("went-direct")
    with pytest.raises(RelayError, match="peer did not arrive"):
        await asyncio.wait_for(waiting, 5)
    with pytest.raises(RelayError, match="expired token"):
        await open_builtin_relay(srv.address, tb, timeout=5)
    a, b = await pair(srv, "next")               # the quota is free again
    assert not hub.release("next") and not hub.release("unknown")   # pumping: left alone
    a[1].write(b"x")
    await a[1].drain()
    assert await asyncio.wait_for(b[0].readexactly(1), 5) == b"x"
    await close_and_settle(srv, a, b)
