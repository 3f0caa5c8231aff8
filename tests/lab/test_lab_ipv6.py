"""IPv6 in the lab: each side behaviour measured and verified, addresses and routes in every
topology, delay and loss on IPv6, an IPv6-only peer, bad arguments, teardown."""
from __future__ import annotations

import json
import socket
import statistics
import subprocess
import sys
import time

import pytest

from pyholepunch.engine import Engine
from pyholepunch.lab import Lab, verify6
from pyholepunch.lab import nat as nat_mod

from ..conftest import netns_list
from ..engine.helpers import punch_side
from .helpers import connect_times_ms, datagrams_through

pytestmark = pytest.mark.lab

PORT = 3478


@pytest.fixture(scope="module")
def results() -> list[verify6.Measured6]:
    return verify6.verify6()  # all five behaviours, concurrently


def test_every_v6_behaviour_matches_its_row(results: list[verify6.Measured6]) -> None:
    assert [m.behaviour for m in results] == list(nat_mod.V6_BEHAVIOURS)
    assert all(m.ok for m in results), "\n" + verify6.table6(results)
    by = {m.behaviour: m for m in results}
    assert by["firewall"].unsolicited_syn == "drop" and by["firewall"].simultaneous_open == "pass"
    assert by["firewall-rst"].unsolicited_syn == "rst"
    assert by["open"].unsolicited_syn == "reaches-host" and by["open"].address == "own"
    assert by["blackhole"].outbound == "timeout" and by["blackhole"].simultaneous_open == "fail"
    assert by["none"].outbound == "unreachable"


@pytest.mark.parametrize("measured_as, claimed", [("firewall", "open"), ("open", "firewall"),
                                                  ("firewall", "firewall-rst"),
                                                  ("blackhole", "firewall"), ("none", "open")])
def test_a_v6_behaviour_that_differs_from_its_row_fails(results: list[verify6.Measured6],
                                                        measured_as: str, claimed: str) -> None:
    raw = next(m.raw for m in results if m.behaviour == measured_as)
    m = verify6.interpret6(claimed, raw)
    assert not m.ok and m.problems


def test_a_translated_source_address_fails() -> None:
    raw = {"outbound": "ok", "own": "2001:db8:a:1::2", "observed": "2001:db8:0:a::2",
           "unsolicited": "ok", "simultaneous_open": True}
    m = verify6.interpret6("open", raw)
    assert not m.ok and "2001:db8:0:a::2" in m.problems[0]


def _listener(lab: Lab, node: str, ip: str, kind: int = socket.SOCK_STREAM) -> socket.socket:
    s = lab.socket(node, socket.AF_INET6, kind)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((ip, PORT))
    if kind == socket.SOCK_STREAM:
        s.listen(8)
    s.settimeout(3)
    return s


def _reach(lab: Lab, src: str, dst: str, dst_ip: str) -> str:
    """TCP src -> dst_ip (listening in dst); the source address dst saw."""
    with _listener(lab, dst, dst_ip) as ls, lab.socket(src, socket.AF_INET6) as c:
        c.settimeout(3)
        c.connect((dst_ip, PORT))
        conn, addr = ls.accept()
        conn.close()
        return str(addr[0])


@pytest.mark.parametrize("kw", [dict(a="cgnat", b="no-ipv4"), dict(a="cgnat", same_nat=True),
                                dict(a="full-cone", same_nat=True, hairpin=True),
                                dict(a="symmetric-random", b="none")],
                         ids=["cgnat+v6only", "same-carrier", "same-nat", "symmetric+none"])
def test_every_topology_routes_ipv6_end_to_end(kw: dict[str, object]) -> None:
    """Each peer reaches the server and the other peer at its own global address (no NAT)."""
    with Lab(**kw, v6_a="open", v6_b="open") as lab:  # type: ignore[arg-type]
        a6, b6 = lab.public_ip6("a"), lab.public_ip6("b")
        assert a6 != b6 and all(ip.startswith("2001:db8:") for ip in (a6, b6))
        for peer, ip in (("a", a6), ("b", b6)):
            assert _reach(lab, peer, "server", lab.server_ip6) == ip
            assert _reach(lab, peer, "server", lab.server_alt_ip6) == ip
        assert _reach(lab, "a", "b", b6) == a6
        assert _reach(lab, "b", "a", a6) == b6
        info = lab.describe()
        assert info["public6"] == {"a": a6, "b": b6} and info["server_ip6"] == lab.server_ip6
        if kw.get("b") == "no-ipv4":
            with pytest.raises(ValueError, match="no IPv4"):
                lab.public_ip("b")
            with lab.socket("b") as c:            # an IPv6-only host: IPv4 goes nowhere
                c.settimeout(1)
                with pytest.raises(OSError):
                    c.connect((lab.server_ip, PORT))


def test_ipv4_only_lab_has_no_ipv6() -> None:
    with Lab(a="port-restricted", b="none") as lab:
        with pytest.raises(ValueError, match="no IPv6"):
            lab.public_ip6("a")
        out = lab.run("server", ["ip", "-6", "addr"]).stdout
        assert "2001:db8" not in out and lab.describe()["public6"] == {}


def test_delay_applies_to_ipv6() -> None:
    with Lab(a="port-restricted", b="none", v6_a="firewall", rtt_ms=40) as lab, \
            _listener(lab, "server", lab.server_ip6) as ls:
        samples = connect_times_ms(lab, "a", socket.AF_INET6, ls, (lab.server_ip6, PORT), 4)
        assert 40 <= statistics.median(samples) <= 60, samples


def test_loss_applies_to_ipv6() -> None:
    with Lab(a="none", b="none", v6_a="open", loss_pct=50) as lab, \
            _listener(lab, "server", lab.server_ip6, socket.SOCK_DGRAM) as us, \
            lab.socket("a", socket.AF_INET6, socket.SOCK_DGRAM) as u:
        n = 400
        got = datagrams_through(u, us, (lab.server_ip6, PORT), n)
        assert 0.3 * n < got < 0.7 * n, got


def test_bad_v6_arguments() -> None:
    with pytest.raises(ValueError, match="'nope'"):
        Lab(v6_a="nope")
    with pytest.raises(ValueError, match="neither IPv4"):
        Lab(a="no-ipv4")
    with pytest.raises(ValueError, match="v6_b"):
        Lab(a="cgnat", same_nat=True, v6_a="open", v6_b="firewall")
    with pytest.raises(ValueError, match="same_nat"):
        Lab(a="no-ipv4", v6_a="open", same_nat=True)


def test_v6_ruleset_text() -> None:
    text = nat_mod.v6_firewall_ruleset("firewall-rst", "wan", host=False)
    assert text.startswith("table ip6 hpl_v6") and "hook forward" in text
    assert 'iifname "wan" ct state established,related accept' in text
    assert 'iifname "wan" meta l4proto tcp reject with tcp reset' in text and "ipv6-icmp" not in text
    host = nat_mod.v6_firewall_ruleset("firewall", "eth0", host=True)
    assert "hook input" in host and 'iifname "eth0" meta l4proto ipv6-icmp accept' in host
    assert "reject" not in host
    with pytest.raises(ValueError, match="'open'"):
        nat_mod.v6_firewall_ruleset("open", "wan", host=False)
    hole = nat_mod.v6_blackhole_ruleset(["pb"])
    assert 'iifname "pb" drop' in hole and 'oifname "pb" drop' in hole
    assert nat_mod.v6_blackhole_ruleset([]) == ""
    assert nat_mod.loss_ruleset(5).startswith("table inet ")


def test_cli_up_and_verify_v6() -> None:
    up = subprocess.Popen([sys.executable, "-m", "pyholepunch.lab", "up", "--a", "cgnat", "--v6-a",
                           "firewall", "--b", "no-ipv4", "--v6-b", "open", "--json"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert up.stdout is not None
        info = json.loads(up.stdout.readline())
        assert info["v6_a"] == "firewall" and info["b"] == "no-ipv4" and "b" not in info["public"]
        assert set(info["public6"]) == {"a", "b"}
        mine = {ns for ns in netns_list() if ns.startswith(info["name"])}
        assert len(mine) == len(info["nodes"])
    finally:
        up.terminate()
        up.wait(10)
    assert not {ns for ns in netns_list() if ns.startswith(info["name"])}
    r = subprocess.run([sys.executable, "-m", "pyholepunch.lab", "verify", "--v6", "firewall-rst",
                        "--json"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    (doc,) = json.loads(r.stdout)
    assert doc["v6_behaviour"] == "firewall-rst" and doc["ok"] and doc["unsolicited_syn"] == "rst"


@pytest.mark.parametrize("a, v6_a, b, v6_b, connects", [
    ("symmetric-random", "firewall", "symmetric-random", "firewall", True),
    ("cgnat", "firewall-rst", "symmetric-seq", "open", True),
    ("none", "firewall-rst", "no-ipv4", "firewall", True),        # host firewalls
    ("port-restricted", "blackhole", "port-restricted", "firewall", False),
], ids=["symrandom-fw--symrandom-fw", "cgnat-fwrst--symseq-open", "none-fwrst--v6only-fw",
        "prc-blackhole--prc-fw"])
def test_engine_punches_over_ipv6(engine: Engine, a: str, v6_a: str, b: str, v6_b: str,
                                  connects: bool) -> None:
    """Whatever the IPv4 NATs (symmetric-random twice is relayed on IPv4), simultaneous open
    over IPv6 passes two stateful firewalls: each side's SYN opens its own, the other's is then
    a reply. A blackholed side gets nowhere."""
    from concurrent.futures import ThreadPoolExecutor

    with Lab(a=a, b=b, v6_a=v6_a, v6_b=v6_b) as lab:
        a6, b6 = lab.public_ip6("a"), lab.public_ip6("b")
        start_at, budget = time.time() + 0.5, 3.0 if connects else 1.0
        with ThreadPoolExecutor(2) as pool:
            fa = pool.submit(lab.call, "a", punch_side, engine.name, (a6, 43210), (b6, 43211),
                             start_at, budget, True, 0.01, b"from a", timeout=20)
            fb = pool.submit(lab.call, "b", punch_side, engine.name, (b6, 43211), (a6, 43210),
                             start_at, budget, True, 0.01, b"from b", timeout=20)
            ra, rb = fa.result(), fb.result()
    if connects:
        assert ra.get("got") == b"from b" and rb.get("got") == b"from a", (ra, rb)
        assert ra["peername"] == (b6, 43211) and rb["peername"] == (a6, 43210)
    else:
        assert "PunchTimeout" in ra["error"] and "PunchTimeout" in rb["error"]
