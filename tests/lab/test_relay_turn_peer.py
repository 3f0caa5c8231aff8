"""`pyholepunch listen`/`connect --relay turn:HOST:PORT` between two random symmetric NATs:
no direct path exists, so the peers meet through Debian's coturn on the lab's server host,
with end-to-end TLS on top, all through the real CLI in real namespaces."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pyholepunch.cli.demo import PORT, run_pair
from tests.coturn import CoturnConfig, wait_listening

pytestmark = [
    pytest.mark.lab,
    pytest.mark.timeout(120),
    pytest.mark.skipif(shutil.which("turnserver") is None and not os.environ.get("CI"),
                       reason="coturn (turnserver) is not installed"),
]

NAT = "symmetric-random"
TURN_PORT = PORT + 10          # coturn next to `pyholepunch serve` on the server host
USER, PASSWORD = "alice", "lab-password"
TIMEOUT = 30.0


def test_random_symmetric_pair_relays_through_coturn(tmp_path: Path) -> None:
    from pyholepunch.lab import Lab

    with Lab(a=NAT, b=NAT, rtt_ms=40) as lab:
        turn = CoturnConfig(listen_ip=lab.server_ip, port=TURN_PORT, realm="lab.test",
                            users={USER: PASSWORD})
        (tmp_path / "coturn").mkdir()
        coturn = lab.spawn("server", turn.argv(tmp_path / "coturn"), stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            lab.call("a", wait_listening, (lab.server_ip, TURN_PORT), 10, timeout=15)
            # Only alice (the initiator) holds TURN credentials: she allocates, bob only dials.
            result = run_pair(lab.spawn, lab.server_ip, lab.server_alt_ip, tmp_path,
                              timeout=TIMEOUT, connect_args=[
                                  "--relay", f"turn:{lab.server_ip}:{TURN_PORT}",
                                  "--turn-user", USER, "--turn-password", PASSWORD])
        finally:
            coturn.terminate()
            coturn.wait(10)
    report, bob_report = result["report"], result["responder_report"]
    assert result["exit_code"] == 0 and result["echo_ok"], result["echo"]
    assert report["route"] == "relay", report
    assert [s["kind"] for s in report["steps"]] == ["relay"], report["steps"]
    assert report["remote_nat"]["nat_type"] == "symmetric", report["remote_nat"]
    assert bob_report["route"] == "relay"
    assert bob_report["peer_name"] == "alice"
