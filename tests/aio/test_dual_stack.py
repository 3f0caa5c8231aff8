"""Dual stack on loopback (127.0.0.1 and ::1): serve on both families, the server naming its
other-family address, peers announcing and racing both families, the race's choice, and two
peers without a common family relayed with the reason."""
from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path

import jsonschema
import pytest

from pyholepunch import engine as engine_mod
from pyholepunch.engine import PunchResult, PunchStats
from pyholepunch.errors import PunchError
from pyholepunch.peer import Peer
from pyholepunch.race import KEEP, race_lanes
from pyholepunch.report import load_schema
from pyholepunch.serve import Rendezvous, _port_sets
from pyholepunch.signal.server import ServerConfig
from pyholepunch.strategy import NO_COMMON_FAMILY
from pyholepunch.stun.client import StunTcpConnection, StunUdpClient

pytestmark = pytest.mark.timeout(60)
CFG = ServerConfig(sync_pings=2, keepalive=3600)


@pytest.mark.asyncio
async def test_serve_listens_on_both_families_and_names_the_other() -> None:
    async with Rendezvous([("127.0.0.1", 0), ("::1", 0)], config=CFG) as app:
        v4, v6 = app.addresses
        assert v4[0] == "127.0.0.1" and v6[0] == "::1" and app.address == v4
        for server, other, local in ((v4, v6, "127.0.0.1"), (v6, v4, "::1")):
            async with await StunTcpConnection.open(server) as conn:
                tcp = await conn.binding()
            assert tcp.mapped[0] == local and tcp.other_family == other
            async with await StunUdpClient.open((local, 0)) as udp:
                res = await udp.binding(server, timeout=3)
            assert res.mapped[0] == local and res.other_family == other
        m = app.metrics()
        assert m["addresses"] == [list(v4), list(v6)]
        assert m["stun"]["udp_in"] >= 2 and m["demux"]["stun"] == 2   # both families counted


@pytest.mark.asyncio
async def test_a_one_family_server_names_no_other() -> None:
    async with Rendezvous(("127.0.0.1", 0), config=CFG, relay=False) as app:
        async with await StunTcpConnection.open(app.address) as conn:
            assert (await conn.binding()).other_family is None


@pytest.mark.parametrize(("listen", "alt", "message"), [
    ([("127.0.0.1", 1), ("127.0.0.2", 2)], None, "one listen address per IP family"),
    ([("127.0.0.1", 1)], ["::2"], "has no listen address of its family"),
    ([("127.0.0.1", 1), ("::1", 1)], ["127.0.0.2", "127.0.0.3"], "one alternate IP per IP family"),
    ([], None, "needs a listen address"),
])
def test_bad_listen_sets_are_refused(listen: list[tuple[str, int]], alt: list[str] | None,
                                     message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _port_sets(listen, alt)


def test_listen_sets_pair_each_family_with_its_alternate() -> None:
    assert _port_sets([("203.0.113.10", 3478), ("2001:db8::10", 3478)],
                      ["2001:db8::11", "203.0.113.11"]) == [
        (("203.0.113.10", 3478), "203.0.113.11"), (("2001:db8::10", 3478), "2001:db8::11")]


def _connected_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        a = socket.create_connection(lsock.getsockname())
        b, _ = lsock.accept()
    return a, b


async def _after(delay: float, result: PunchResult | BaseException) -> PunchResult:
    await asyncio.sleep(delay)
    if isinstance(result, BaseException):
        raise result
    return result


@pytest.mark.asyncio
async def test_the_race_keeps_the_initiators_first_connection_on_both_sides() -> None:
    """Both lanes connect; the initiator's IPv4 lane is first on its side, the responder sees
    IPv6 first: both keep the initiator's choice and close the other connection."""
    (i4, r4), (i6, r6) = _connected_pair(), _connected_pair()
    res = lambda s: PunchResult(s, PunchStats())   # noqa: E731
    deadline = time.time() + 2
    ini, resp = await asyncio.gather(
        race_lanes("initiator", {"ipv6": _after(0.1, res(i6)), "ipv4": _after(0.0, res(i4))},
                   deadline=deadline),
        race_lanes("responder", {"ipv6": _after(0.0, res(r6)), "ipv4": _after(0.05, res(r4))},
                   deadline=deadline))
    assert ini.result.sock is i4 and resp.result.sock is r4 and ini.family == "ipv4"
    await asyncio.sleep(0.2)
    # The responder's IPv6 connection came up, was not chosen, and is closed. (The
    # initiator's IPv6 lane was cancelled before it returned: its own steps close what it
    # brings up later, see test_punch_groups.)
    assert r6.fileno() == -1
    i4.sendall(b"x")
    assert r4.recv(1) == b"x"                               # KEEP was consumed, data flows
    for s in (i4, r4, i6):
        s.close()


@pytest.mark.asyncio
async def test_a_failed_handshake_lets_the_race_go_on() -> None:
    """The first mutually authenticated connection wins: the IPv6 pair comes up first but
    its handshake fails (on both sides), so both go on to the IPv4 pair."""
    (i4, r4), (i6, r6) = _connected_pair(), _connected_pair()
    res = lambda s: PunchResult(s, PunchStats())   # noqa: E731
    handshakes: list[socket.socket] = []

    async def secure(result: PunchResult) -> str:
        handshakes.append(result.sock)
        if result.sock in (i6, r6):
            raise ConnectionResetError("handshake failed")
        return "streams"

    deadline = time.time() + 2
    ini, resp = await asyncio.gather(
        race_lanes("initiator", {"ipv6": _after(0.0, res(i6)), "ipv4": _after(0.1, res(i4))},
                   deadline=deadline, secure=secure),
        race_lanes("responder", {"ipv6": _after(0.0, res(r6)), "ipv4": _after(0.1, res(r4))},
                   deadline=deadline, secure=secure))
    assert (ini.result.sock, ini.family, ini.streams) == (i4, "ipv4", "streams")
    assert (resp.result.sock, resp.family, resp.streams) == (r4, "ipv4", "streams")
    assert handshakes[:2] in ([i6, r6], [r6, i6]) and i6.fileno() == r6.fileno() == -1
    for s in (i4, r4):
        s.close()


@pytest.mark.asyncio
async def test_a_race_where_every_lane_fails_names_each_lane() -> None:
    with pytest.raises(PunchError, match="ipv6: .*no v6.*ipv4: .*no v4|ipv4: .*no v4.*ipv6"):
        await race_lanes("initiator", {"ipv6": _after(0.0, PunchError("no v6")),
                                       "ipv4": _after(0.01, PunchError("no v4"))},
                         deadline=time.time() + 1)
    assert KEEP != b"\x01"          # distinct from a sweep's MARK


def _peer(app: Rendezvous, tmp: Path, name: str, server: tuple[str, int],
          **kw: object) -> Peer:
    return Peer(server, name=name, config_dir=tmp / name, server_fingerprint=app.fingerprint,
                **kw)  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_dual_stack_peers_race_both_families_and_report_every_pair(tmp_path: Path) -> None:
    """Told only the IPv4 address, both peers learn the server's IPv6 one, classify it, and
    announce candidates of both families; the plan races IPv6 against IPv4 (IPv4 after the
    race delay), IPv6 connects first, and the report lists the pairs tried with family,
    step, outcome and time."""
    async with Rendezvous([("127.0.0.1", 0), ("::1", 0)], config=CFG) as app:
        alice = _peer(app, tmp_path, "alice", app.addresses[0])
        bob = _peer(app, tmp_path, "bob", app.addresses[0])
        async with alice, bob:
            assert set(alice.ports) == {"ipv4", "ipv6"}
            assert alice.family_profiles["ipv6"].family == "ipv6"
            fams = {(c.family, c.origin) for c in alice._candidates()}
            assert {("ipv4", "stun"), ("ipv6", "stun")} <= fams
            conn = await alice.connect("bob", timeout=20)
            incoming = await asyncio.wait_for(bob.accept(), 10)
            async with conn, incoming:
                assert conn.route == incoming.route == "direct"
                await conn.send(b"over either family")
                assert await asyncio.wait_for(incoming.recv(), 5) == b"over either family"
                report = conn.report.to_dict()
                assert report["plan"]["race_delay"] > 0
                assert {s["family"] for s in report["plan"]["steps"]} >= {"ipv6", "ipv4"}
                assert report["winning_family"] == "ipv6"
                first = report["pairs"][0]
                assert first["family"] == "ipv6" and first["outcome"] == "success"
                assert first["local"].startswith("[::1]:") and first["remote"].startswith("[::1]:")
                assert first["duration"] < 1.0
                local = conn.writer.get_extra_info("socket").getsockname()[0]
                assert local == "::1"
                jsonschema.Draft202012Validator(load_schema()).validate(report)


@pytest.mark.asyncio
async def test_no_common_family_relays_with_the_reason(tmp_path: Path) -> None:
    async with Rendezvous([("127.0.0.1", 0), ("::1", 0)], config=CFG) as app:
        alice = _peer(app, tmp_path, "alice", app.addresses[1], families=["ipv6"])
        bob = _peer(app, tmp_path, "bob", app.addresses[0], families=["ipv4"])
        async with alice, bob:
            assert set(alice.ports) == {"ipv6"} and set(bob.ports) == {"ipv4"}
            conn = await alice.connect("bob", timeout=20)
            incoming = await asyncio.wait_for(bob.accept(), 10)
            async with conn, incoming:
                assert conn.route == incoming.route == "relay"
                assert NO_COMMON_FAMILY in conn.report.relay_reason
                await conn.send(b"relayed across families")
                assert await asyncio.wait_for(incoming.recv(), 5) == b"relayed across families"


def test_the_engine_in_use(request: pytest.FixtureRequest) -> None:
    """For the record in CI logs: which engine the loopback races above ran."""
    assert engine_mod.get().name in ("native", "pure") or os.environ.get("PYHOLEPUNCH_ENGINE")


def test_candidates_put_the_server_observed_address_first_then_the_bound_one() -> None:
    from pyholepunch.punchport import PunchPort, candidates
    ports = {"ipv4": PunchPort("ipv4", ("127.0.0.1", 1), "127.0.0.1", 40000,
                               announced=("198.51.100.9", 40001)),
             "ipv6": PunchPort("ipv6", ("::1", 1), "2001:db8::9", 40002,
                               announced=("2001:db8::9", 40002))}
    got = candidates(ports)
    assert [(c.family, c.origin, c.address) for c in got[:1]] == [
        ("ipv6", "stun", ("2001:db8::9", 40002))]        # IPv6 first; a global IPv6 is both
    v4 = [c for c in got if c.family == "ipv4"]
    assert [(c.origin, c.address) for c in v4[:2]] == [("stun", ("198.51.100.9", 40001)),
                                                       ("host", ("127.0.0.1", 40000))]
    assert all(c.port == 40000 for c in v4[1:]) and len(got) <= 16


def test_a_peer_refuses_unknown_families(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="families must be among"):
        Peer(("127.0.0.1", 1), name="x", config_dir=tmp_path, families=["ipx"])


def test_serve_listen_text_takes_bracketed_ipv6_and_names_the_form_otherwise() -> None:
    import argparse

    from pyholepunch.cli.serve import _parse_hostport
    assert _parse_hostport("[2001:db8::10]:3478") == ("2001:db8::10", 3478)
    assert _parse_hostport(":3478") == ("0.0.0.0", 3478)
    with pytest.raises(argparse.ArgumentTypeError, match=r"needs brackets.*\[2001:db8::10\]:3478"):
        _parse_hostport("2001:db8::10:3478")
    with pytest.raises(argparse.ArgumentTypeError, match="needs a scope id"):
        _parse_hostport("[fe80::1]:3478")
