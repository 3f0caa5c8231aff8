"""The HTTP API over real peers on loopback, driven by real curl: p2pd's routes and ours, the
report against its schema, events, metrics parsed with prometheus_client's parser, the relay
fallback's one WARNING."""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pyholepunch.report import load_schema
from pyholepunch.serve import Rendezvous
from tests.aio.test_relay_peering import relay_only

from .conftest import TOKEN, Side, curl

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]


def samples(text: str | bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, parsed by prometheus_client: (name, labels) -> value."""
    if isinstance(text, bytes):
        text = text.decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def validate_report(report: dict) -> None:  # type: ignore[type-arg]
    import jsonschema
    jsonschema.Draft202012Validator(load_schema()).validate(report)


async def open_pair(alice: Side, bob: Side, con: str = "c1", route: str = "direct") -> str:
    """alice opens `con` to bob; returns the name bob's API gave the incoming side."""
    accepted = asyncio.create_task(bob.get("/accept/timeout/20"))
    opened = await alice.get(f"/open/{con}/bob")
    assert opened.status == 201, opened
    info = opened.json()
    assert info["error"] == 0 and info["name"] == con and info["route"] == route
    got = await accepted
    assert got.status == 200, got
    return str(got.json()["name"])


async def test_open_send_recv_close_through_curl(pair: tuple[Side, Side],
                                                 rendezvous: Rendezvous) -> None:
    alice, bob = pair
    version = (await alice.get("/version")).json()
    assert version["title"] == "pyholepunch" and version["error"] == 0
    assert (await alice.get("/addr")).json()["addr"] == alice.peer.peer_id
    assert (await alice.get("/nat")).json()["profiles"]["tcp"]["nat_type"] == "open"
    assert (await alice.get("/ifs")).json()["ifs"]
    incoming = await open_pair(alice, bob)
    assert incoming == "alice"
    names = [c["name"] for c in (await bob.get("/connections")).json()["connections"]]
    assert names == ["alice"]

    sent = await alice.get("/send/c1/hello%20bob")
    assert sent.json() == {"name": "c1", "sent": 9, "error": 0}
    got = (await bob.get("/recv/alice/timeout/5")).json()
    assert got["data"] == "hello bob" and got["client_tup"]
    assert (await bob.get("/send/alice/hi/there")).json()["sent"] == 8   # slashes are text too
    assert (await alice.get("/recv/c1")).json()["data"] == "hi/there"
    nothing = await alice.get("/recv/c1/timeout/0.2")
    assert nothing.status == 504 and nothing.json()["error"] == "timeout"

    info = (await alice.get("/info/c1")).json()
    assert info["bytes_sent"] == 9 and info["bytes_received"] == 8 and info["tls"] is True
    report = (await alice.get("/connections/c1/report")).json()
    validate_report(report)
    assert report["route"] == "direct" and report["winning_step"] == info["strategy"]
    validate_report((await bob.get("/connections/alice/report")).json())

    assert (await alice.get("/close/c1")).json() == {"closed": "c1", "error": 0}
    gone = await bob.get("/recv/alice/timeout/5")
    assert gone.status == 410 and gone.json()["error"] == "connection_closed"
    assert (await bob.get("/info/alice")).status == 404

    # the server counted the session once, by winning step and NAT-pair class
    scrape = await curl(f"http://127.0.0.1:{rendezvous.prometheus_address[1]}/metrics", token=None)
    m = samples(scrape.body)
    key = ("pyholepunch_server_punch_outcomes_total",
           (("nat_pair", "open+open"), ("route", "direct"), ("step", report["winning_step"])))
    assert m[key] == 1.0
    assert m[("pyholepunch_server_time_to_connect_seconds_count", (("route", "direct"),))] == 1.0
    assert m[("pyholepunch_server_peers_online", ())] == 2.0
    assert m[("pyholepunch_server_coordinations_total", ())] == 1.0
    peer_m = samples((await alice.get("/metrics")).body)
    assert peer_m[("pyholepunch_peer_connections_total",
                   (("direction", "out"), ("route", "direct"), ("step", report["winning_step"])))] == 1
    assert peer_m[("pyholepunch_peer_api_bytes_total", (("direction", "out"),))] == 9


async def test_binary_round_trip_with_sha256(pair: tuple[Side, Side], tmp_path: Path) -> None:
    alice, bob = pair
    incoming = await open_pair(alice, bob)
    blob = os.urandom(3 << 20)
    (tmp_path / "up.bin").write_bytes(blob)
    download = asyncio.create_task(bob.get(f"/binary/{incoming}/timeout/10?size={len(blob)}",
                                           out=tmp_path / "down.bin"))
    up = await alice.get("/binary/c1", "--data-binary", f"@{tmp_path / 'up.bin'}",
                         "-H", "Content-Type: application/octet-stream")
    assert up.json() == {"name": "c1", "sent": len(blob), "error": 0}
    assert (await download).status == 200
    assert hashlib.sha256((tmp_path / "down.bin").read_bytes()).digest() == hashlib.sha256(blob).digest()
    # without ?size: what has arrived, as raw bytes
    await bob.get(f"/send/{incoming}/raw")
    assert (await alice.get("/binary/c1/timeout/5")).body == b"raw"


async def test_tunnel_carries_bytes_both_ways(pair: tuple[Side, Side]) -> None:
    alice, bob = pair
    incoming = await open_pair(alice, bob)

    async def tunnel(side: Side, con: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        r, w = await asyncio.open_connection(*side.api.address)
        w.write(f"GET /tunnel/{con} HTTP/1.1\r\nHost: 127.0.0.1:{side.api.address[1]}\r\n"
                f"Authorization: Bearer {TOKEN}\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n\r\n"
                .encode())
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101"), head
        return r, w

    (ra, wa), (rb, wb) = await tunnel(alice, "c1"), await tunnel(bob, incoming)
    stream = os.urandom(256 << 10)
    wa.write(stream)
    assert await asyncio.wait_for(rb.readexactly(len(stream)), 10) == stream
    wb.write(b"and back")
    assert await asyncio.wait_for(ra.readexactly(8), 5) == b"and back"
    busy = await alice.get("/send/c1/x")        # the tunnel holds the connection
    assert busy.status == 409
    wa.close()                                  # one side ends: the other sees EOF
    assert await asyncio.wait_for(rb.read(), 10) == b""
    wb.close()
    no_upgrade = await bob.get(f"/tunnel/{incoming}")
    assert no_upgrade.status in (404, 426)


async def test_events_stream_plan_steps_and_route(pair: tuple[Side, Side]) -> None:
    alice, bob = pair
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sSN", "--max-time", "20", "-H", f"Authorization: Bearer {TOKEN}",
        alice.api.url + "/events", stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    first = await asyncio.wait_for(proc.stdout.readline(), 5)
    assert first == b"event: classification\n"
    await open_pair(alice, bob)
    seen: list[tuple[str, dict]] = []  # type: ignore[type-arg]
    event = ""
    while not any(e == "connection" for e, _ in seen):
        line = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode().rstrip("\n")
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            seen.append((event, json.loads(line[6:])))
    proc.terminate()
    await proc.wait()
    kinds = [e for e, _ in seen]
    assert kinds[kinds.index("plan"):].count("step") >= 2        # started, finished
    assert "route" in kinds and kinds.index("plan") < kinds.index("route")
    route = next(d for e, d in seen if e == "route")
    assert route["con"] == "c1" and route["route"] == "direct" and route["role"] == "initiator"


async def test_relay_fallback_warns_once_and_is_counted(
        pair: tuple[Side, Side], rendezvous: Rendezvous, caplog: pytest.LogCaptureFixture) -> None:
    alice, bob = pair
    for side in pair:
        await relay_only(side.peer)
    for _ in range(100):       # the server must hold bob's update before alice's CONNECT
        rec = await rendezvous.signal.store.find("bob")
        if rec is not None and any(p.get("allocation") == "random" for p in rec.profiles):
            break
        await asyncio.sleep(0.01)
    with caplog.at_level(logging.WARNING, logger="pyholepunch.peer"):
        await open_pair(alice, bob, route="relay")
    report = (await alice.get("/connections/c1/report")).json()
    validate_report(report)
    assert report["route"] == "relay" and report["relay_cause"] == "no_direct_plan"
    warnings = [r for r in caplog.records if "falling back to the relay" in r.getMessage()]
    assert len(warnings) == 2      # one per connection: alice's and bob's side
    assert {w.getMessage().split(" for ")[1].split(":")[0] for w in warnings} == {"alice", "bob"}
    for _ in range(50):
        m = samples(rendezvous.prometheus.exposition())
        if m.get(("pyholepunch_server_relay_fallbacks_total", (("reason", "no_direct_plan"),))):
            break
        await asyncio.sleep(0.05)
    assert m[("pyholepunch_server_relay_fallbacks_total", (("reason", "no_direct_plan"),))] == 1
    assert m[("pyholepunch_server_punch_outcomes_total",
              (("nat_pair", "symmetric+symmetric"), ("route", "relay"), ("step", "relay")))] == 1
    await alice.get("/send/c1/through%20the%20relay")
    assert (await bob.get("/recv/alice/timeout/5")).json()["data"] == "through the relay"
