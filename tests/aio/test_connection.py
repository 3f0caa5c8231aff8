"""Connection over real loopback TCP + pinned TLS, keepalive on the socket, and the report."""
from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from pyholepunch import security as sec
from pyholepunch import strategy
from pyholepunch.connection import Connection, KeepAlive
from pyholepunch.engine import PunchStats
from pyholepunch.errors import PunchTimeout
from pyholepunch.identity import Identity
from pyholepunch.nat.profile import Allocation, Filtering, Mapping, NatProfile, SynResponse
from pyholepunch.report import ConnectionReport, Outcome, Route

ALICE, BOB = Identity.generate(), Identity.generate()


async def _tls_pair(insecure: bool = False) -> tuple[tuple[Any, Any], tuple[Any, Any]]:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        client = socket.create_connection(srv.getsockname(), timeout=5)
        server, _ = srv.accept()
    return tuple(await asyncio.gather(  # type: ignore[return-value]
        sec.secure_stream(client, identity=ALICE, peer_id=BOB.peer_id,
                          peer_cert=sec.certificate_for(BOB), initiator=True, insecure_plain=insecure),
        sec.secure_stream(server, identity=BOB, peer_id=ALICE.peer_id,
                          peer_cert=sec.certificate_for(ALICE), initiator=False,
                          insecure_plain=insecure)))


@pytest_asyncio.fixture
async def pair() -> AsyncIterator[tuple[Connection, Connection]]:
    (ra, wa), (rb, wb) = await _tls_pair()
    a = Connection(ra, wa, peer_id=BOB.peer_id, peer_name="bob", route="direct",
                   report=ConnectionReport("initiator", peer_id=BOB.peer_id, peer_name="bob"))
    b = Connection(rb, wb, peer_id=ALICE.peer_id, route=Route.DIRECT,
                   report=ConnectionReport("responder", peer_id=ALICE.peer_id))
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


def _sockopts(conn: Connection) -> tuple[int, int, int, int]:
    s = conn.writer.get_extra_info("socket")
    return (s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
            s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT))


@pytest.mark.asyncio
async def test_send_recv_both_ways(pair: tuple[Connection, Connection]) -> None:
    a, b = pair
    assert a.route == "direct" and a.encrypted and b.encrypted
    assert a.peer_name == "bob" and "bob" in repr(a) and "open" in repr(a)
    await a.send(b"hello")
    assert await b.recv() == b"hello"
    blob = os.urandom(1 << 20)
    sender = asyncio.create_task(b.send(blob))
    got = bytearray()
    while len(got) < len(blob):
        chunk = await a.receive(65536)            # seed-style alias
        assert chunk
        got += chunk
    await sender
    assert bytes(got) == blob
    await b.send(memoryview(b"xyz"))
    assert await a.recv_exactly(3) == b"xyz"
    assert a.local_address == b.remote_address


@pytest.mark.asyncio
async def test_eof_and_close(pair: tuple[Connection, Connection]) -> None:
    a, b = pair
    async with a:
        await a.send(b"last words")
    assert a.closed and "closed" in repr(a)
    assert await b.recv() == b"last words"
    assert await b.recv() == b""                  # EOF after the peer closed
    await a.close()                               # idempotent
    with pytest.raises(ConnectionResetError, match="is closed"):
        await a.send(b"late")


@pytest.mark.asyncio
async def test_bad_arguments(pair: tuple[Connection, Connection]) -> None:
    a, _ = pair
    with pytest.raises(TypeError, match="takes bytes, got str"):
        await a.send("text")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive integer"):
        await a.recv(0)


@pytest.mark.asyncio
async def test_keepalive_is_on_by_default_and_tunable(pair: tuple[Connection, Connection]) -> None:
    a, _ = pair
    assert _sockopts(a) == (1, 20, 5, 3)
    applied = a.keepalive(idle=7, interval=2, count=4, user_timeout=30)
    assert applied == a.keepalive_settings == KeepAlive(7, 2, 4, 30)
    assert _sockopts(a) == (1, 7, 2, 4)
    s = a.writer.get_extra_info("socket")
    assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 30_000


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"idle": 0}, "idle must be 1..32767"), ({"interval": -1}, "interval must be"),
    ({"count": 0}, "count must be an integer"), ({"count": 2.5}, "count must be an integer"),
    ({"idle": True}, "idle must be"), ({"user_timeout": 0}, "user_timeout must be"),
])
def test_bad_keepalive(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KeepAlive(**kwargs)


@pytest.mark.asyncio
async def test_keepalive_none_and_plain_streams() -> None:
    (ra, wa), (rb, wb) = await _tls_pair(insecure=True)
    a = Connection(ra, wa, peer_id=BOB.peer_id, route="relay", keepalive=None,
                   report=ConnectionReport("initiator"))
    b = Connection(rb, wb, peer_id=ALICE.peer_id, route="relay",
                   keepalive=KeepAlive(idle=60, interval=10, count=5),
                   report=ConnectionReport("responder"))
    try:
        assert not a.encrypted and a.route is Route.RELAY
        assert _sockopts(a)[0] == 0 and a.keepalive_settings is None
        assert _sockopts(b) == (1, 60, 10, 5)
        await b.send(b"ok")
        assert await a.recv() == b"ok"
    finally:
        await a.close()
        await b.close()
    with pytest.raises(ValueError, match="route must be 'direct' or 'relay', got 'carrier-pigeon'"):
        Connection(ra, wa, peer_id="x", route="carrier-pigeon", report=ConnectionReport("initiator"))


@pytest.mark.asyncio
async def test_relayed_connection_over_the_builtin_relay() -> None:
    from pyholepunch.relay.builtin import RelayHub, RelayServer, open_builtin_relay

    hub = RelayHub()
    async with RelayServer(hub, ("127.0.0.1", 0)) as server:
        tok_a, tok_b = hub.issue("s")
        ia, ib = await asyncio.gather(open_builtin_relay(server.address, tok_a, timeout=5),
                                      open_builtin_relay(server.address, tok_b, timeout=5))
        (ra, wa), (rb, wb) = await asyncio.gather(
            sec.secure_stream(ia, identity=ALICE, peer_id=BOB.peer_id,
                              peer_cert=sec.certificate_for(BOB), initiator=True),
            sec.secure_stream(ib, identity=BOB, peer_id=ALICE.peer_id,
                              peer_cert=sec.certificate_for(ALICE), initiator=False))
        a = Connection(ra, wa, peer_id=BOB.peer_id, route="relay",
                       report=ConnectionReport("initiator"), keepalive=KeepAlive(idle=9))
        b = Connection(rb, wb, peer_id=ALICE.peer_id, route="relay",
                       report=ConnectionReport("responder"))
        try:
            assert a.encrypted and a.remote_address == server.address   # TCP peer: the relay
            assert _sockopts(a) == (1, 9, 5, 3)
            await a.send(b"via relay")
            assert await b.recv() == b"via relay"
            await b.send(b"back")
            assert await a.recv() == b"back"
            await a.close()
            assert await b.recv() == b""
        finally:
            await a.close()
            await b.close()


# --- report ------------------------------------------------------------------------------

PR = NatProfile(mapping=Mapping.ENDPOINT_INDEPENDENT, filtering=Filtering.ADDRESS_AND_PORT_DEPENDENT,
                allocation=Allocation.PRESERVING, unsolicited_syn=SynResponse.DROP)
SYM = NatProfile(mapping=Mapping.ADDRESS_AND_PORT_DEPENDENT,
                 filtering=Filtering.ADDRESS_AND_PORT_DEPENDENT, allocation=Allocation.RANDOM)


def test_report_direct_success_is_json_and_readable() -> None:
    plan = strategy.plan(PR, SYM, rtt=0.04)
    rep = ConnectionReport("initiator", peer_id=BOB.peer_id, peer_name="bob", started=1000.0,
                           plan=plan.to_dict(), local_nat=PR.to_dict(), remote_nat=SYM.to_dict())
    step = rep.step_started("birthday", at=1000.05)
    stats = PunchStats(attempts=1024, syns_sent=1024, rsts_seen=3, sockets_opened=1024,
                       first_syn_delay_ns=120_000, local_port=40000, remote=("203.0.113.9", 51234))
    rep.step_finished(step, "success", at=1000.2, stats=stats)
    rep.step_skipped("relay", "a direct step won", at=1000.2)
    rep.finish("direct", at=1000.25)
    assert rep.total_time == pytest.approx(0.25) and rep.route is Route.DIRECT
    assert rep.winning_step is step and step.duration == pytest.approx(0.15)
    d = json.loads(json.dumps(rep.to_dict(), allow_nan=False))
    assert d["route"] == "direct" and d["winning_step"] == "birthday" and d["relay_reason"] == ""
    assert d["steps"][0]["remote"] == ["203.0.113.9", 51234] and d["steps"][0]["local_port"] == 40000
    assert d["steps"][0]["stats"]["rsts_seen"] == 3 and d["steps"][1]["outcome"] == "skipped"
    assert d["plan"]["steps"][0]["kind"] == "birthday" and d["remote_nat"]["nat_type"] == "symmetric"
    text = rep.summary()
    assert text.splitlines()[0].startswith("bob (") and "direct in 250 ms" in text
    assert "1. birthday" in text and "SYNs 1024 RSTs 3 ICMP 0" in text
    assert ":40000 -> 203.0.113.9:51234" in text and "port-restricted" in text


def test_report_relay_fallback_and_failures() -> None:
    rep = ConnectionReport("responder", peer_id="abc", started=10.0)
    step = rep.step_started("simopen", at=10.0)
    rep.step_finished(step, Outcome.TIMEOUT, at=11.5,
                      error=PunchTimeout("no connection in 1.5 s", PunchStats(syns_sent=4)),
                      stats=PunchStats(syns_sent=4))
    parallel = rep.step_started("lan", at=10.0)
    with pytest.raises(ValueError, match="already finished"):
        rep.step_finished(step, "error")
    with pytest.raises(ValueError, match="'running'"):
        rep.step_finished(parallel, "running")
    rep.finish("relay", at=12.0, relay_reason="every direct step failed: simopen timed out")
    assert parallel.outcome is Outcome.SKIPPED and "another step won" in parallel.error
    assert rep.route == "relay" and "relay because: every direct step failed" in rep.summary()
    assert "PunchTimeout: no connection in 1.5 s" in rep.summary()
    failed = ConnectionReport("initiator", peer_id="abc", started=5.0)
    running = failed.step_started("direct", at=5.0)
    failed.fail(TimeoutError("rendezvous did not answer"), at=7.0)
    assert running.outcome is Outcome.ERROR and failed.total_time is None
    assert "FAILED after 2000 ms: TimeoutError: rendezvous did not answer" in failed.summary()
    assert json.dumps(failed.to_dict())
    with pytest.raises(ValueError, match="role must be"):
        ConnectionReport("bystander")
    with pytest.raises(ValueError, match="route must be"):
        rep.finish("teleport")
