"""`pyholepunch listen`/`connect --relay turn:HOST:PORT` between two random symmetric NATs:
no direct path exists, so the peers meet through Debian's coturn on the lab's server host,
with end-to-end TLS on top, all through the real CLI in real namespaces."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pyholepunch.demo import MESSAGE, PORT, _cli, _Lines
from pyholepunch.relay.coturn import CoturnConfig, wait_listening

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


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(5)
        if p.poll() is None:
            p.kill()
            p.wait()
        for stream in (p.stdin, p.stdout, p.stderr):
            if stream is not None:
                stream.close()


def test_random_symmetric_pair_relays_through_coturn(tmp_path: Path) -> None:
    from pyholepunch.lab import Lab

    procs: list[subprocess.Popen[bytes]] = []
    with Lab(a=NAT, b=NAT, rtt_ms=40) as lab:
        try:
            turn = CoturnConfig(listen_ip=lab.server_ip, port=TURN_PORT, realm="lab.test",
                                users={USER: PASSWORD})
            (tmp_path / "coturn").mkdir()
            procs.append(lab.spawn("server", turn.argv(tmp_path / "coturn"),
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL))
            server = f"{lab.server_ip}:{PORT}"
            srv = lab.spawn("server", _cli("serve", "--listen", server, "--alt-ip",
                                           lab.server_alt_ip, "--state-dir",
                                           str(tmp_path / "server")),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            procs.append(srv)
            fingerprint = _Lines(srv, "stdout", "the server").wait_for("fingerprint",
                                                                        TIMEOUT).split()[-1]
            lab.call("a", wait_listening, (lab.server_ip, TURN_PORT), 10, timeout=15)
            relay = ["--relay", f"turn:{lab.server_ip}:{TURN_PORT}"]
            common = ["--server", server, "--server-fingerprint", fingerprint, *relay]

            # bob holds no TURN credentials: the initiator allocates, bob only dials.
            bob = lab.spawn("b", _cli("listen", *common, "--name", "bob", "--echo", "--once",
                                      "--config-dir", str(tmp_path / "bob"),
                                      "--json", str(tmp_path / "bob.json")),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            procs.append(bob)
            _Lines(bob, "stderr", "peer b").wait_for("listening as", TIMEOUT)

            alice = lab.spawn("a", _cli("connect", *common, "--name", "alice", "bob",
                                        "--turn-user", USER, "--turn-password", PASSWORD,
                                        "--config-dir", str(tmp_path / "alice"),
                                        "--json", str(tmp_path / "alice.json"),
                                        "--timeout", str(TIMEOUT)),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
            procs.append(alice)
            out, err = alice.communicate(MESSAGE, timeout=TIMEOUT + 30)
            tail = err.decode(errors="replace")[-2000:]
            assert alice.returncode == 0, tail
            assert out == MESSAGE, tail
            report = json.loads((tmp_path / "alice.json").read_text())
            assert report["route"] == "relay", report
            assert [s["kind"] for s in report["steps"]] == ["relay"], report["steps"]
            assert report["remote_nat"]["nat_type"] == "symmetric", report["remote_nat"]
            bob.wait(10)
            bob_report = json.loads((tmp_path / "bob.json").read_text())
            assert bob_report["route"] == "relay"
            assert bob_report["peer_name"] == "alice"
        finally:
            _stop(procs)
