"""The relay decision in under a second (#19, relay_race.py), whole CLI flow at 40 ms RTT.

The core drops every packet between the two NATs' public networks: the plan's direct steps
cannot succeed (nobody can tell in advance), and the relay must carry data <= 1.0 s after
connect(), where before it ran only after every direct step had failed (3+ s)."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from pyholepunch.cli.demo import run_pair
from pyholepunch.lab import Lab

from .peers import lab_with_server, run_peers

pytestmark = [pytest.mark.lab, pytest.mark.skipif(os.geteuid() != 0, reason="the NAT lab needs root")]

CUT = """table ip hpl_cut {
  chain between_nats {
    type filter hook forward priority -300; policy accept;
    ip saddr 198.51.100.0/24 ip daddr 192.0.2.0/24 drop
    ip saddr 192.0.2.0/24 ip daddr 198.51.100.0/24 drop
  }
}
"""


@pytest.mark.parametrize(("a", "b"), [("port-restricted", "port-restricted"),
                                      ("symmetric-seq", "symmetric-seq")])
def test_relay_carries_data_within_a_second_when_direct_cannot_work(a: str, b: str,
                                                                    tmp_path: Path) -> None:
    with Lab(a=a, b=b, rtt_ms=40) as lab:
        r = lab.run("core", ["nft", "-f", "-"], input=CUT)
        assert r.returncode == 0, r.stderr
        res = run_pair(lab.spawn, lab.server_ip, lab.server_alt_ip, tmp_path, timeout=20)
    report = res["report"]
    assert res["echo_ok"], res
    assert report["route"] == "relay", report
    relay = [s for s in report["steps"] if s["kind"] == "relay" and s["outcome"] == "success"]
    assert relay, report["steps"]
    ready = relay[0]["ended"] - report["started"]
    assert ready <= 1.0, f"relay carried data {ready:.3f} s after connect(): {report['steps']}"
    assert "relay carries the data" in report["relay_reason"] or "failed" in report["relay_reason"]
    assert report["relay_cause"] in ("direct_pending", "punch_failed")


@pytest.mark.timeout(90)
def test_a_relayed_connection_upgrades_once_a_direct_path_exists(tmp_path: Path) -> None:
    """Connection.upgrade() (#19): the first connect is relayed (the core cuts the NATs
    apart), the cut goes, and the relayed connection's upgrade() gives a direct one, which the
    other peer accepts like any connection."""
    upgrade = tmp_path / "upgrade"
    relayed = Path(str(upgrade) + ".relayed")
    with lab_with_server(tmp_path, a="port-restricted", b="port-restricted",
                         rtt_ms=40) as (lab, srv):
        r = lab.run("core", ["nft", "-f", "-"], input=CUT)
        assert r.returncode == 0, r.stderr

        def uncut_when_relayed() -> None:
            end = time.monotonic() + 40
            while not relayed.exists() and time.monotonic() < end:
                time.sleep(0.05)
            lab.run("core", ["nft", "delete", "table", "ip", "hpl_cut"])
            upgrade.touch()

        helper = threading.Thread(target=uncut_when_relayed, daemon=True)
        helper.start()
        alice, bob = run_peers(lab, srv, tmp_path, timeout=60, accept={"sessions": 2},
                               connect={"sessions": 1, "timeout": 15.0,
                                        "upgrade_file": str(upgrade)})
        helper.join(5)
    sessions = alice.get("sessions") or []
    assert len(sessions) == 1 and sessions[0]["ok"], alice
    first = sessions[0]
    assert first["report"]["route"] == "relay", first["report"]
    upgraded = first.get("upgraded")
    assert upgraded and upgraded["ok"], first
    assert upgraded["report"]["route"] == "direct", upgraded["report"]
    routes = [s["report"]["route"] for s in bob.get("sessions") or []]
    assert routes == ["relay", "direct"], bob
