"""``pyholepunch.Punch`` on loopback, in-process, against a real STUN server (no pyholepunch
rendezvous): two sides connect from their offers alone; bad offers are refused before
anything is opened; ``strategies=`` is validated, for Punch and for Peer."""
from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

import pyholepunch
from pyholepunch.errors import StateError
from pyholepunch.relay.builtin import RelayHub, RelayServer
from pyholepunch.serve import Rendezvous
from pyholepunch.stun.server import StunServer
from tests.coturn import Coturn, CoturnConfig

pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio]

LEAD = 0.3     # both offers are in hand at once here


@pytest_asyncio.fixture
async def stun() -> AsyncIterator[str]:
    async with StunServer(("127.0.0.1", 0), "127.0.0.2") as srv:
        host, port = srv.primary
        yield f"{host}:{port}"


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def _pair(a: pyholepunch.Punch, b: pyholepunch.Punch, **offer: object
                ) -> tuple[pyholepunch.Connection, pyholepunch.Connection]:
    oa, ob = await a.offer(**offer), await b.offer(**offer)  # type: ignore[arg-type]
    return await asyncio.gather(a.connect(ob, peer_id=b.peer_id), b.connect(oa))


async def test_two_sides_connect_from_their_offers_alone(stun: str) -> None:
    async with pyholepunch.Punch(stun, lead=LEAD, name="alice") as a, \
            pyholepunch.Punch(stun, lead=LEAD, name="bob") as b:
        ca, cb = await _pair(a, b)
        async with ca, cb:
            assert ca.route == cb.route == "direct"
            assert (ca.peer_id, cb.peer_id) == (b.peer_id, a.peer_id)
            assert (ca.peer_name, cb.peer_name) == ("bob", "alice")
            assert ca.writer.get_extra_info("ssl_object").version() == "TLSv1.3"
            assert {ca.report.role, cb.report.role} == {"initiator", "responder"}
            assert ca.report.to_dict()["plan"] == cb.report.to_dict()["plan"]
            assert ca.report.to_dict()["start_sync"]["method"] == "wall-clocks"
            await ca.send(b"ping")
            assert await cb.recv_exactly(4) == b"ping"
        # Each offer is good for one session; the next one is made from a fresh punch port.
        ca, cb = await _pair(a, b)
        async with ca, cb:
            await cb.send(b"again")
            assert await ca.recv_exactly(5) == b"again"


async def test_bad_offers_are_refused_before_anything_opens(stun: str) -> None:
    async with pyholepunch.Punch(stun, lead=LEAD) as a, pyholepunch.Punch(stun, lead=LEAD) as b:
        with pytest.raises(StateError, match="call offer"):
            await a.connect(b"x")
        mine = await a.offer()
        theirs = await b.offer()
        fds, tasks = _fds(), len(asyncio.all_tasks())
        with pytest.raises(pyholepunch.OfferError, match="our own offer"):
            await a.connect(mine)
        with pytest.raises(pyholepunch.OfferError, match="truncated"):
            await a.connect(theirs[:-20])
        with pytest.raises(pyholepunch.AuthenticationError, match="not " + a.peer_id):
            await a.connect(theirs, peer_id=a.peer_id)
        assert _fds() == fds and len(asyncio.all_tasks()) == tasks    # nothing leaked
        ca, cb = await asyncio.gather(a.connect(theirs), b.connect(mine))
        await ca.close()
        await cb.close()
        await a.offer()
        with pytest.raises(pyholepunch.StaleOffer, match="used already: a replay"):
            await a.connect(theirs)
    # The same offer replayed an hour later, to a fresh side that never saw it.
    async with pyholepunch.Punch(stun, lead=LEAD, clock=lambda: time.time() + 3600) as late:
        await late.offer()
        with pytest.raises(pyholepunch.StaleOffer, match=r"created 360\d s ago"):
            await late.connect(theirs)


async def test_strategies_are_validated_and_agreed(stun: str) -> None:
    async with pyholepunch.Punch(stun, lead=LEAD) as a, pyholepunch.Punch(stun, lead=LEAD) as b:
        with pytest.raises(pyholepunch.StrategyError, match="unknown step kind 'udp'"):
            await a.offer(strategies=["simopen", "udp"])
        with pytest.raises(pyholepunch.StrategyError, match="a list of step kinds, got the string"):
            await a.offer(strategies="simopen")
        # Both sides use what both offers allow: simopen here.
        oa, ob = await a.offer(strategies=["lan", "simopen"]), await b.offer(strategies=["simopen"])
        ca, cb = await asyncio.gather(a.connect(ob), b.connect(oa))
        async with ca, cb:
            assert [s.kind for s in ca.report.steps] == ["simopen"]
            assert ca.report.winning_step is not None and ca.report.winning_step.kind == "simopen"
        oa, ob = await a.offer(strategies=["lan"]), await b.offer(strategies=["simopen"])
        with pytest.raises(pyholepunch.StrategyError, match="no step kind in common"):
            await a.connect(ob)
        # A kind the plan for this pair does not have.
        oa, ob = await a.offer(strategies=["birthday"]), await b.offer()
        with pytest.raises(pyholepunch.StrategyError,
                           match=r"none of the chosen steps \(birthday\) is in the plan"):
            await a.connect(ob)


async def test_peer_connect_takes_strategies(tmp_path: Path) -> None:
    async with Rendezvous(("127.0.0.1", 0), state_dir=str(tmp_path / "server")) as app:
        def peer(name: str) -> pyholepunch.Peer:
            return pyholepunch.Peer(app.address, name=name, config_dir=tmp_path / name,
                                    server_fingerprint=app.fingerprint)
        async with peer("bob") as bob, peer("alice") as alice:
            with pytest.raises(pyholepunch.StrategyError, match="unknown step kind 'tcp'"):
                await alice.connect("bob", strategies=["tcp"])
            incoming = asyncio.ensure_future(bob.accept())
            try:
                conn = await alice.connect("bob", strategies=["simopen"])
            except pyholepunch.PunchError:
                assert alice.last_report is not None
                pytest.fail(alice.last_report.summary())
            async with conn, await incoming as theirs:
                steps = conn.report.to_dict()["plan"]["steps"]
                left_out = [s["kind"] for s in steps if s["reason"] == "left out by strategies="]
                assert left_out and "simopen" not in left_out
                assert conn.report.winning_step is not None
                assert conn.report.winning_step.kind == "simopen"
                await conn.send(b"hi")
                assert await theirs.recv_exactly(2) == b"hi"


@pytest.mark.skipif(shutil.which("turnserver") is None and not os.environ.get("CI"),
                    reason="coturn (turnserver) is not installed")
async def test_one_side_with_turn_relays_whichever_side_initiates(stun: str) -> None:
    """strategies=["relay"]: the session goes through coturn's TURN. Only one side brings
    credentials: once the initiator, once the responder (the lower peer id initiates)."""
    low, high = sorted((pyholepunch.Identity.generate() for _ in range(2)),
                       key=lambda i: i.peer_id)
    with Coturn(CoturnConfig(users={"user": "pw"})) as turn:
        relay = {"relay": f"turn:127.0.0.1:{turn.address[1]}", "turn_user": "user",
                 "turn_password": "pw"}
        for owner in (low, high):
            async with pyholepunch.Punch(stun, identity=low, lead=LEAD,
                                         **(relay if owner is low else {})) as a, \
                    pyholepunch.Punch(stun, identity=high, lead=LEAD,
                                      **(relay if owner is high else {})) as b:
                ca, cb = await _pair(a, b, strategies=["relay"])
                async with ca, cb:
                    assert ca.route == cb.route == "relay"
                    assert ca.report.role == "initiator" and cb.report.role == "responder"
                    assert ca.writer.get_extra_info("ssl_object").version() == "TLSv1.3"
                    await ca.send(b"via turn")
                    assert await cb.recv_exactly(8) == b"via turn"


async def _answered(a: pyholepunch.Punch, b: pyholepunch.Punch, **offer: object
                    ) -> tuple[pyholepunch.Connection, pyholepunch.Connection]:
    """a offers, b answers it (offer(reply_to=...)), both connect."""
    oa = await a.offer(**offer)  # type: ignore[arg-type]
    ob = await b.offer(reply_to=oa, **offer)  # type: ignore[arg-type]
    return await asyncio.gather(a.connect(ob), b.connect(oa))


async def test_an_answer_agrees_the_start_whatever_the_clocks(stun: str) -> None:
    """alice's clock is 3 s ahead: offers made independently would start her punch 3 s
    before bob's (the start is in two clocks); an answer measures the offset instead."""
    async with pyholepunch.Punch(stun, lead=LEAD, name="alice",
                                 clock=lambda: time.time() + 3.0) as a, \
            pyholepunch.Punch(stun, lead=LEAD, name="bob") as b:
        ca, cb = await _answered(a, b, strategies=["simopen"])
        async with ca, cb:
            assert ca.route == cb.route == "direct"
            sa, sb = ca.report.start_sync, cb.report.start_sync
            assert sa is not None and sb is not None
            assert (sa["method"], sb["method"]) == ("answer", "answered")
            assert abs(sa["offset_s"] + 3.0) < 0.05 and 0 <= sa["delay_s"] < 0.5
            # One instant for both (the reports' times are the hosts' own clock here).
            assert abs(ca.report.started - cb.report.started) < 0.05
            await ca.send(b"in step")
            assert await cb.recv_exactly(7) == b"in step"
        # An answer paired with another offer than the one it answers is refused, before
        # anything opens, on both sides.
        old = await a.offer()
        answer = await b.offer(reply_to=old)
        await a.offer()                                 # a newer offer replaces the old one
        with pytest.raises(pyholepunch.OfferError, match="answers another offer") as e:
            await a.connect(answer)
        assert e.value.field == "reply_to"


def _hub_options(srv: RelayServer, secret: str = "operator-secret-0123456789"
                 ) -> dict[str, object]:
    return {"relay": f"hp:127.0.0.1:{srv.address[1]}", "relay_secret": secret}


async def test_the_builtin_relay_without_a_rendezvous(stun: str) -> None:
    """relay="hp:..." + relay_secret: each side mints its own token for the session; the
    relay pairs them. TLS end to end; the relay sees one session, counted and then freed."""
    async with RelayServer(RelayHub(secret="operator-secret-0123456789")) as srv:
        hub = _hub_options(srv)
        async with pyholepunch.Punch(stun, lead=LEAD, **hub) as a, \
                pyholepunch.Punch(stun, lead=LEAD, **hub) as b:   # type: ignore[arg-type]
            ca, cb = await _answered(a, b, strategies=["relay"])
            async with ca, cb:
                assert ca.route == cb.route == "relay"
                assert ca.writer.get_extra_info("ssl_object").version() == "TLSv1.3"
                assert ca.report.steps[-1].kind == "relay"
                await ca.send(b"via our relay")
                assert await cb.recv_exactly(13) == b"via our relay"
            assert srv.hub.metrics.relays_total == 1
            # Both sides must bring it, with the same secret; else it is not planned.
            async with pyholepunch.Punch(stun, lead=LEAD) as plain, \
                    pyholepunch.Punch(stun, lead=LEAD, **_hub_options(
                        srv, "another-secret-0123456789")) as other:  # type: ignore[arg-type]
                for c in (plain, other):
                    theirs = await c.offer(strategies=["relay"])
                    await a.offer(strategies=["relay"])
                    with pytest.raises(pyholepunch.StrategyError, match=r"\(relay\) is in the plan"):
                        await a.connect(theirs)
    # The relay refuses (it was started with another secret than both sides hold): the
    # connect fails naming the relay and its reason.
    async with RelayServer(RelayHub(secret="not-the-apps-secret-01234")) as srv:
        hub = _hub_options(srv)
        async with pyholepunch.Punch(stun, lead=LEAD, **hub) as a, \
                pyholepunch.Punch(stun, lead=LEAD, **hub) as b:   # type: ignore[arg-type]
            results = await asyncio.gather(*(await _offers_and_connects(a, b)),
                                           return_exceptions=True)
            for res in results:
                assert isinstance(res, pyholepunch.RelayError), res
                assert "built-in relay 127.0.0.1:" in str(res) and "bad token" in str(res)


async def _offers_and_connects(a: pyholepunch.Punch, b: pyholepunch.Punch) -> list[Any]:
    oa = await a.offer(strategies=["relay"])
    ob = await b.offer(strategies=["relay"], reply_to=oa)
    return [a.connect(ob), b.connect(oa)]


async def test_relay_options_are_checked(stun: str) -> None:
    with pytest.raises(ValueError, match=r"needs relay_secret"):
        pyholepunch.Punch(stun, relay="hp:127.0.0.1:3478")
    with pytest.raises(ValueError, match="a relay is turn:HOST:PORT .* or hp:HOST:PORT"):
        pyholepunch.Punch(stun, relay="relay.example:3478")
    with pytest.raises(ValueError, match="a relay is turn:HOST:PORT .* or hp:HOST:PORT"):
        pyholepunch.Punch(stun, relay="hp:nowhere", relay_secret="x" * 16)
    with pytest.raises(ValueError, match="relay_secret is for relay='hp:HOST:PORT'"):
        pyholepunch.Punch(stun, relay_secret="x" * 16)
    with pytest.raises(ValueError, match="relay_secret is for relay='hp:HOST:PORT'"):
        pyholepunch.Punch(stun, relay="turn:127.0.0.1:3478", relay_secret="x" * 16)
    with pytest.raises(ValueError, match="at least 16 bytes"):
        pyholepunch.Punch(stun, relay="hp:127.0.0.1:3478", relay_secret="short")
