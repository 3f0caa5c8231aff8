"""``pyholepunch.Punch`` in the NAT lab: two peers, each its own process behind its own NAT
(port-restricted x symmetric-random, 40 ms RTT), exchange their offers over plain files —
no pyholepunch server anywhere, only a STUN server on the lab's server host — and connect
directly with TLS 1.3 pinned to each other's peer ids. Then the same with Debian's coturn as
the only server (STUN for the classification, TURN for the relay); with one side's clock 3 s
off (an answer agrees the start); and two random symmetric NATs through the built-in relay
of a `pyholepunch serve --relay-secret` (tokens minted by the two sides, no rendezvous)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pyholepunch._process import OutputLines
from tests.backend.punch_peer import PunchJob, job_argv
from tests.coturn import CoturnConfig, wait_listening

pytestmark = [pytest.mark.lab, pytest.mark.timeout(150)]

ROOT = Path(__file__).resolve().parents[2]
STUN_PORT = 3478
TURN_PORT = 3490
USER, PASSWORD = "alice", "lab-password"
A, B = "port-restricted", "symmetric-random"


def _run_pair(lab: Any, tmp: Path, stun: str, bob: dict[str, Any] | None = None,
              alice: dict[str, Any] | None = None,
              **job: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """alice in node a, bob in node b, offers through files in ``tmp``; both results.
    ``job``: both sides' further PunchJob fields; ``bob``, ``alice``: one side's only."""
    own = {"alice": alice or {}, "bob": bob or {}}
    jobs = {node: PunchJob(name=name, stun=stun, offer_file=str(tmp / f"{name}.offer"),
                           their_offer_file=str(tmp / f"{other}.offer"),
                           result_file=str(tmp / f"{name}.json"), **job | own[name])
            for node, name, other in (("a", "alice", "bob"), ("b", "bob", "alice"))}
    procs = {node: lab.spawn(node, job_argv(j), cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=open(tmp / f"{j.name}.log", "wb"))   # noqa: SIM115
             for node, j in jobs.items()}
    try:
        for proc in procs.values():
            proc.wait(60)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    out = []
    for j in jobs.values():
        path = Path(j.result_file)
        log = (tmp / f"{j.name}.log").read_text(errors="replace")[-3000:]
        assert path.exists(), f"{j.name} died: {log}"
        out.append(json.loads(path.read_text()) | {"log": log})
    return out[0], out[1]


def _our_stun_server(lab: Any) -> str:
    """`python -m pyholepunch.stun` on the lab's server host, both addresses: its host:port."""
    stun = f"{lab.server_ip}:{STUN_PORT}"
    proc = lab.spawn("server", [sys.executable, "-m", "pyholepunch.stun", "--listen", stun,
                                "--alt-ip", lab.server_alt_ip],
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT)
    OutputLines(proc, "stdout", "the STUN server").wait_for("ready", 20)
    return stun


def _check_direct(alice: dict[str, Any], bob: dict[str, Any]) -> None:
    for me, other in ((alice, bob), (bob, alice)):
        assert me.get("ok"), me
        assert me["route"] == "direct", me["report"]
        assert me["peer"] == other["peer_id"]          # pinned to the id in the offer
        assert me["tls"] == "TLSv1.3"
        assert me["got"] == f"hello from {other['name']}\n"
        assert me["report"]["winning_step"] is not None or any(
            s["outcome"] == "success" for s in me["report"]["steps"])
    assert {alice["report"]["role"], bob["report"]["role"]} == {"initiator", "responder"}
    # Both derived the same plan from the two offers alone.
    assert alice["report"]["plan"] == bob["report"]["plan"]


def test_offers_over_files_port_restricted_x_symmetric_random(tmp_path: Path) -> None:
    from pyholepunch.lab import Lab

    with Lab(a=A, b=B, rtt_ms=40) as lab:
        stun = _our_stun_server(lab)
        alice, bob = _run_pair(lab, tmp_path, stun)
    _check_direct(alice, bob)
    assert alice["nat"]["nat_type"] == "port-restricted"
    assert bob["nat"]["nat_type"] == "symmetric"
    kinds = [s["kind"] for s in alice["report"]["plan"]["steps"]]
    assert "relay" not in kinds            # no relay given: none planned
    won = [s for s in alice["report"]["steps"] if s["outcome"] == "success"]
    assert won and won[0]["kind"] == "birthday", alice["report"]["steps"]


@pytest.mark.skipif(shutil.which("turnserver") is None and not os.environ.get("CI"),
                    reason="coturn (turnserver) is not installed")
def test_offers_over_files_through_coturn_only(tmp_path: Path) -> None:
    """coturn is the STUN server (classification learns less from it: no RFC 5780 over TCP)
    and the TURN relay both sides may use; still no pyholepunch server."""
    from pyholepunch.lab import Lab

    with Lab(a=A, b=B, rtt_ms=40) as lab:
        turn = CoturnConfig(listen_ip=lab.server_ip, port=TURN_PORT, realm="lab.test",
                            users={USER: PASSWORD},
                            # two listening addresses: coturn's RFC 5780 (OTHER-ADDRESS)
                            extra=["--listening-ip", lab.server_alt_ip])
        (tmp_path / "coturn").mkdir()
        lab.spawn("server", turn.argv(tmp_path / "coturn"), stdin=subprocess.DEVNULL,
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        lab.call("a", wait_listening, (lab.server_ip, TURN_PORT), 10, timeout=15)
        address = f"{lab.server_ip}:{TURN_PORT}"
        alice, bob = _run_pair(lab, tmp_path, address, relay=f"turn:{address}",
                               turn_user=USER, turn_password=PASSWORD)
    _check_direct(alice, bob)
    assert "relay" in [s["kind"] for s in alice["report"]["plan"]["steps"]]


@pytest.mark.skipif(shutil.which("turnserver") is None and not os.environ.get("CI"),
                    reason="coturn (turnserver) is not installed")
def test_no_direct_path_relays_through_turn_or_fails_loudly(tmp_path: Path) -> None:
    """Two random symmetric NATs: with a TURN relay (one side's credentials suffice) the
    session is relayed (TLS end to end, coturn only carries ciphertext); without one,
    connect() raises PunchError and the report says why."""
    from pyholepunch.lab import Lab

    with Lab(a=B, b=B, rtt_ms=40) as lab:
        turn = CoturnConfig(listen_ip=lab.server_ip, port=TURN_PORT, realm="lab.test",
                            users={USER: PASSWORD}, extra=["--listening-ip", lab.server_alt_ip])
        (tmp_path / "coturn").mkdir()
        lab.spawn("server", turn.argv(tmp_path / "coturn"), stdin=subprocess.DEVNULL,
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        lab.call("a", wait_listening, (lab.server_ip, TURN_PORT), 10, timeout=15)
        address = f"{lab.server_ip}:{TURN_PORT}"
        (tmp_path / "turn").mkdir()
        # Only bob has TURN credentials: his allocation is used, whichever side initiates.
        relayed = _run_pair(lab, tmp_path / "turn", address, bob=dict(
            relay=f"turn:{address}", turn_user=USER, turn_password=PASSWORD))
        (tmp_path / "none").mkdir()
        failed = _run_pair(lab, tmp_path / "none", address)
    for me, other in (relayed, relayed[::-1]):
        assert me.get("ok"), me
        assert me["route"] == "relay" and me["tls"] == "TLSv1.3", me["report"]
        assert me["peer"] == other["peer_id"] and me["got"] == f"hello from {other['name']}\n"
        assert me["report"]["steps"][-1]["kind"] == "relay"
    for me in failed:
        assert not me["ok"] and me["error"].startswith("PunchError: no direct path"), me
        assert "relaying is off" in me["error"]
        assert me["report"]["route"] is None and "relaying is off" in me["report"]["error"]


RELAY_SECRET = "lab-relay-secret-0123456789"


def test_a_clock_3_s_off_still_starts_both_sides_together(tmp_path: Path) -> None:
    """alice's clock reads 3 s ahead; bob answers her offer (offer(reply_to=...)), so the
    start is his, converted into her clock with the offset measured over the exchange: both
    punch at one instant (the lab's nodes share the host's real clock, so the reports'
    start times compare directly) and connect directly. Offers made independently start her
    3 s early (measured: birthday still connects, after 4.1 s instead of 1.1 s; on loopback
    simultaneous open fails outright)."""
    from pyholepunch.lab import Lab

    with Lab(a=A, b=B, rtt_ms=40) as lab:
        stun = _our_stun_server(lab)
        alice, bob = _run_pair(lab, tmp_path, stun, alice=dict(clock_skew=3.0),
                               bob=dict(answer=True))
    _check_direct(alice, bob)
    sa, sb = alice["report"]["start_sync"], bob["report"]["start_sync"]
    assert (sa["method"], sb["method"]) == ("answer", "answered")
    assert abs(sa["offset_s"] + 3.0) < 0.1, sa      # bob's clock minus alice's
    assert abs(alice["report"]["started"] - bob["report"]["started"]) < 0.05


def test_two_random_symmetric_nats_meet_on_the_builtin_relay(tmp_path: Path) -> None:
    """No direct path (random symmetric x random symmetric: the plan is the relay alone);
    both sides bring relay="hp:..." and the operator's secret, each mints its token for the
    session both derive from the two offers, and `pyholepunch serve --relay-secret-file`
    pairs them — no rendezvous, TLS end to end."""
    from pyholepunch.lab import Lab

    secret_file = tmp_path / "relay.secret"
    secret_file.write_text(RELAY_SECRET + "\n")
    with Lab(a=B, b=B, rtt_ms=40) as lab:
        address = f"{lab.server_ip}:{STUN_PORT}"
        proc = lab.spawn("server", [sys.executable, "-m", "pyholepunch", "serve", "--listen",
                                    address, "--alt-ip", lab.server_alt_ip, "--state-dir",
                                    str(tmp_path / "server"), "--relay-secret-file",
                                    str(secret_file)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT)
        OutputLines(proc, "stdout", "the server").wait_for("fingerprint", 20)
        alice, bob = _run_pair(lab, tmp_path, address, relay=f"hp:{address}",
                               relay_secret=RELAY_SECRET, bob=dict(answer=True))
    for me, other in ((alice, bob), (bob, alice)):
        assert me.get("ok"), me
        assert me["route"] == "relay" and me["tls"] == "TLSv1.3", me["report"]
        assert me["peer"] == other["peer_id"] and me["got"] == f"hello from {other['name']}\n"
        assert me["report"]["route"] == "relay"
        assert me["report"]["relay_cause"] == "no_direct_plan"
        assert me["report"]["steps"][-1]["kind"] == "relay"
        assert me["report"]["steps"][-1]["outcome"] == "success"
    assert [s["kind"] for s in alice["report"]["plan"]["steps"]] == ["relay"]
