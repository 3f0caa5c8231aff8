"""The matrix pairs a router port mapping changes, with miniupnpd on one NAT (40 ms RTT, the
real CLI as in test_matrix): the pairs that relay today connect directly, by dialing the
mapping; a cone pair with a mapping is no slower. And a peer killed by SIGTERM leaves no
mapping at its router.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from pyholepunch._process import OutputLines
from pyholepunch.cli.demo import run_pair
from pyholepunch.errors import PortMapUnavailable
from pyholepunch.lab import Lab
from pyholepunch.portmap import PortMapper

from .helpers import in_netns

pytestmark = [pytest.mark.lab, pytest.mark.slow]


def _cli(*argv: str) -> list[str]:
    """The pyholepunch command line, run by this interpreter."""
    return [sys.executable, "-m", "pyholepunch", *argv]


def _pair(a: str, b: str, tmp_path: Path, **portmap: bool) -> tuple[dict[str, Any], Lab]:
    with Lab(a=a, b=b, rtt_ms=40, **portmap) as lab:
        result = run_pair(lab.spawn, lab.server_ip, lab.server_alt_ip, tmp_path, timeout=30)
        result["rules_left"] = {p: r.redirects() for p, r in lab.routers.items()}
    assert result["echo_ok"], result["echo"]
    return result, lab


@pytest.mark.parametrize(("a", "b", "side"), [
    ("symmetric-random", "symmetric-random", "a"),
    ("symmetric-seq", "symmetric-random", "b"),
], ids=["random-random-mapped-a", "seq-random-mapped-b"])
def test_relay_pairs_go_direct_through_a_mapping(a: str, b: str, side: str, tmp_path: Path) -> None:
    result, _ = _pair(a, b, tmp_path, **{f"portmap_{side}": True})
    report = result["report"]
    assert report["route"] == "direct", report
    assert report["winning_step"] == "direct", report
    nat = report["local_nat" if side == "a" else "remote_nat"]
    assert nat["mapped_by"] in ("PCP", "NAT-PMP", "UPnP") and nat["label"].endswith(nat["mapped_by"])
    assert "via " + nat["mapped_by"] in report["plan"]["steps"][0]["reason"]
    # Every peer has exited: the mappings went with them.
    assert result["rules_left"] == {side: []}, result["rules_left"]


def test_a_cone_pair_with_a_mapping_is_no_slower(tmp_path: Path) -> None:
    """port-restricted x port-restricted: simultaneous open without a mapping; with one on
    b's router the initiator dials it first. Measured under the machine's load, so the
    bound is loose: no slower than without plus 25 %, or 150 ms."""
    bare, _ = _pair("port-restricted", "port-restricted", tmp_path / "bare")
    mapped, _ = _pair("port-restricted", "port-restricted", tmp_path / "mapped", portmap_b=True)
    t_bare, t_mapped = bare["report"]["total_time"], mapped["report"]["total_time"]
    assert mapped["report"]["route"] == "direct"
    assert mapped["report"]["winning_step"] == "direct", mapped["report"]
    assert bare["report"]["winning_step"] == "simopen", bare["report"]
    print(f"\ncone pair: {t_bare * 1000:.0f} ms without a mapping, {t_mapped * 1000:.0f} ms with")
    assert t_mapped <= max(t_bare * 1.25, t_bare + 0.15), (t_bare, t_mapped)


def test_peer_killed_by_sigterm_leaves_no_mapping(tmp_path: Path) -> None:
    with Lab(a="none", b="symmetric-random", portmap_b=True) as lab:
        srv = lab.spawn("server", _cli("serve", "--listen", f"{lab.server_ip}:3478", "--alt-ip",
                                       lab.server_alt_ip, "--state-dir", str(tmp_path / "srv")),
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        fp = OutputLines(srv, "stdout", "the server").wait_for("fingerprint", 30).split()[-1]
        bob = lab.spawn("b", _cli("listen", "--server", f"{lab.server_ip}:3478",
                                  "--server-fingerprint", fp, "--name", "bob", "--echo",
                                  "--config-dir", str(tmp_path / "bob")),
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            OutputLines(bob, "stderr", "peer b").wait_for("listening as", 30)
            router = lab.router("b")
            rules = router.redirects()
            assert len(rules) == 1 and rules[0][1] == lab.private_ip("b"), rules
            t = time.monotonic()
            bob.send_signal(signal.SIGTERM)
            assert bob.wait(10) == -signal.SIGTERM
            assert router.redirects() == [], "the mapping outlived the peer"
            assert router.leases() == []
            print(f"\nSIGTERM to gone, mapping deleted: {(time.monotonic() - t) * 1000:.0f} ms")
        finally:
            for p in (bob, srv):
                if p.poll() is None:
                    p.kill()
                    p.wait()
                for s in (p.stdout, p.stderr):
                    if s is not None:
                        s.close()
    assert sys.executable


# A broken router: answers every port-mapping request on the NAT node with bytes no parser
# accepts (no real router software does this on purpose, so it is written here).
BROKEN_ROUTER = r"""
import select, socket, sys
socks = []
for port in (5351, 1900):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("10.0.1.1", port))
    socks.append(s)
print("ready", flush=True)
while True:
    for s in select.select(socks, [], [], 60)[0]:
        data, addr = s.recvfrom(2048)
        if s.getsockname()[1] == 1900:
            s.sendto(b"HTTP/1.1 200 OK\r\nLOCATION: ftp://10.0.1.1/x\r\n\r\n", addr)
        elif data[:1] == b"\x02":
            s.sendto(b"\x02\x80" + bytes(21), addr)
        else:
            s.sendto(b"\x00\x80\x00", addr)
"""


async def _map_fails(lab: Lab) -> str:
    async with PortMapper("10.0.1.1", lab.private_ip("a")) as mapper:
        t = time.monotonic()
        with pytest.raises(PortMapUnavailable) as info:
            await mapper.map(41000)
        assert time.monotonic() - t < 0.3
        return str(info.value)


def test_a_broken_router_costs_nothing_but_its_budget(tmp_path: Path) -> None:
    """Garbage answers to PCP, NAT-PMP and SSDP: the peer logs why (each malformed answer
    named), goes on without a mapping, and the pair connects by punching as usual."""
    with Lab(a="port-restricted", b="port-restricted", rtt_ms=40) as lab:
        broken = lab.spawn("nat_a", [sys.executable, "-c", BROKEN_ROUTER], stdout=subprocess.PIPE,
                           text=True)
        try:
            assert broken.stdout is not None and broken.stdout.readline().startswith("ready")
            why = in_netns(lab, "a", lambda: _map_fails(lab))
            result = run_pair(lab.spawn, lab.server_ip, lab.server_alt_ip, tmp_path, timeout=30)
        finally:
            broken.kill()
            broken.wait()
            if broken.stdout is not None:
                broken.stdout.close()
    assert "malformed answers" in why and "PCP response of 23 bytes" in why, why
    assert "NAT-PMP response of 3 bytes" in why and "not an http:// URL" in why, why
    report = result["report"]
    assert result["echo_ok"] and report["route"] == "direct", report
    assert report["winning_step"] == "simopen", report
    assert report["local_nat"]["port_mapping"] is None
