"""The classifier against every NAT type of the lab, over UDP and TCP, and against coturn.

Per lab type: our STUN server (python -m pyholepunch.stun) runs in the lab's server node on
both public addresses, Debian's coturn beside it on other ports (two listening IPs and an
alternate port, so RFC 5780 works); the classifier runs in node "a" behind the NAT.
"""
from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from pyholepunch._process import stop_processes
from pyholepunch.nat.classify import run_sync
from pyholepunch.nat.profile import Allocation, NatProfile, SynResponse

pytestmark = pytest.mark.lab

OUR_PORT = 3478
COTURN_PORT = 3490

# lab type -> (nat_type, allocation, delta, TCP unsolicited SYN)
GROUND_TRUTH: dict[str, tuple[str, Allocation, int | None, SynResponse]] = {
    "none": ("open", Allocation.PRESERVING, None, SynResponse.ACCEPT),
    "full-cone": ("full-cone", Allocation.PRESERVING, None, SynResponse.ACCEPT),
    "restricted-cone": ("restricted-cone", Allocation.PRESERVING, None, SynResponse.DROP),
    "port-restricted": ("port-restricted", Allocation.PRESERVING, None, SynResponse.DROP),
    "port-restricted-rst": ("port-restricted", Allocation.PRESERVING, None, SynResponse.RST),
    "symmetric-seq": ("symmetric", Allocation.SEQUENTIAL, 1, SynResponse.DROP),
    "symmetric-random": ("symmetric", Allocation.RANDOM, None, SynResponse.DROP),
    "cgnat": ("port-restricted", Allocation.PRESERVING, None, SynResponse.DROP),
}


@dataclass
class Env:
    lab: object
    nat: str
    ours: tuple[str, int]
    coturn: tuple[str, int]


def _wait_stun(server: tuple[str, int], deadline_s: float) -> bool:
    """Runs inside node a: poll until the server answers a Binding request."""
    import asyncio

    from pyholepunch.stun.client import stun_binding

    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            asyncio.run(stun_binding(server, rto=0.1, rc=2, rm=2))
            return True
        except Exception:
            time.sleep(0.1)
    return False


def _coturn_argv(ips: list[str], port: int, work: str) -> list[str]:
    """Debian's turnserver, no auth (STUN Binding only needs none); with two IPs it does
    RFC 5780 (alternate port = port + 1), with one it answers CHANGE-REQUEST with 420."""
    argv = ["turnserver", "-n", "--no-cli", "--no-tls", "--no-dtls", "-z", "--realm", "lab"]
    for ip in ips:
        argv += ["--listening-ip", ip]
    return argv + [
        "--relay-ip", ips[0], "--listening-port", str(port), "--alt-listening-port", str(port + 1),
        "--min-port", "40000", "--max-port", "40100", "--no-stdout-log", "--simple-log",
        "--log-file", f"{work}/turn-{ips[0]}.log", "--pidfile", f"{work}/turn-{ips[0]}.pid",
        "--userdb", f"{work}/turndb-{ips[0]}"]


@contextlib.contextmanager
def our_stun(lab: Any) -> Iterator[None]:
    """``python -m pyholepunch.stun`` on the lab's server node, both addresses, until exit."""
    proc = lab.spawn("server", [sys.executable, "-m", "pyholepunch.stun", "--listen",
                                f"{lab.server_ip}:{OUR_PORT}", "--alt-ip", lab.server_alt_ip],
                     stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout is not None else ""
        assert line.startswith("ready"), f"our STUN server did not start: {line!r}"
        yield
    finally:
        stop_processes(proc)


@pytest.fixture(scope="module", params=list(GROUND_TRUTH))
def env(request: pytest.FixtureRequest) -> Iterator[Env]:
    from pyholepunch.lab import Lab

    nat = request.param
    with Lab(a=nat, b="none") as lab, tempfile.TemporaryDirectory() as work, our_stun(lab):
        coturn = lab.spawn("server", _coturn_argv([lab.server_ip, lab.server_alt_ip], COTURN_PORT, work),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            assert lab.call("a", _wait_stun, (lab.server_ip, COTURN_PORT), 8.0, timeout=15), \
                "coturn did not answer"
            yield Env(lab, nat, (lab.server_ip, OUR_PORT), (lab.server_ip, COTURN_PORT))
        finally:
            stop_processes(coturn)


def _classify(env: Env, server: tuple[str, int], transport: str) -> NatProfile:
    return env.lab.call("a", run_sync, server, transport=transport, timeout=5.0)  # type: ignore[attr-defined]


def _check(env: Env, p: NatProfile, transport: str) -> None:
    nat_type, allocation, delta, syn = GROUND_TRUTH[env.nat]
    assert p.nat_type == nat_type, (env.nat, transport, p.to_dict())
    assert p.allocation is allocation, (env.nat, transport, p.to_dict())
    assert p.delta == delta
    assert p.public_ips == (env.lab.public_ip("a"),)  # type: ignore[attr-defined]
    assert p.local_ips == (env.lab.private_ip("a"),)  # type: ignore[attr-defined]
    assert p.not_learned == (), p.not_learned
    if transport == "tcp":
        assert p.unsolicited_syn is syn, (env.nat, p.to_dict())


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_verdict_matches_ground_truth(env: Env, transport: str) -> None:
    _check(env, _classify(env, env.ours, transport), transport)


def test_coturn_gives_the_same_udp_verdict(env: Env) -> None:
    ours = _classify(env, env.ours, "udp")
    theirs = _classify(env, env.coturn, "udp")
    _check(env, theirs, "udp")
    assert (theirs.mapping, theirs.filtering, theirs.allocation, theirs.delta) == \
        (ours.mapping, ours.filtering, ours.allocation, ours.delta)


def test_coturn_over_tcp_learns_what_it_can_and_says_what_not(env: Env) -> None:
    """coturn has no TCP connect-back: mapping and allocation are learned, filtering is not,
    and the profile says why instead of guessing."""
    nat_type, allocation, delta, _ = GROUND_TRUTH[env.nat]
    p = _classify(env, env.coturn, "tcp")
    expected = nat_type if nat_type in ("open", "symmetric") else "unknown"
    assert p.nat_type == expected, p.to_dict()
    assert (p.allocation, p.delta) == (allocation, delta)
    assert p.filtering.value == "unknown" and p.unsolicited_syn is SynResponse.UNKNOWN
    assert any(n.startswith("filtering:") and "400" in n for n in p.not_learned), p.not_learned


@pytest.mark.parametrize("hairpin", [True, False], ids=["hairpin", "no-hairpin"])
def test_hairpin_matches_the_lab(hairpin: bool) -> None:
    """Two hosts behind one port-restricted NAT that does or does not hairpin: the classifier
    says so, over UDP and TCP. (With br_netfilter loaded on the host, the lab's bridge used to
    bridge a hairpinned packet straight back unSNAT'ed, and this read "no" either way.)"""
    from pyholepunch.lab import Lab

    with Lab(a="port-restricted", b="port-restricted", same_nat=True, hairpin=hairpin) as lab:
        with our_stun(lab):
            for transport in ("udp", "tcp"):
                p = lab.call("a", run_sync, (lab.server_ip, OUR_PORT), transport=transport,
                             timeout=30)
                assert p.nat_type == "port-restricted", p.to_dict()
                assert p.hairpin is hairpin, (transport, p.to_dict())


def test_cli_json_under_40ms_rtt() -> None:
    """`pyholepunch nat-type --json` in node a on a 40 ms path: the probe waits scale with
    the measured RTT, the verdict stays right, the JSON schema is the documented one."""
    from pyholepunch.lab import Lab

    with Lab(a="symmetric-seq", b="none", rtt_ms=40) as lab:
        with our_stun(lab):
            out = lab.run("a", [sys.executable, "-m", "pyholepunch", "nat-type", "--server",
                                f"{lab.server_ip}:{OUR_PORT}", "--json"], timeout=30)
            assert out.returncode == 0, out.stderr
            doc = json.loads(out.stdout)
            assert doc["schema"] == 2
            for transport in ("udp", "tcp"):
                p = NatProfile.from_dict(doc["profiles"]["ipv4"][transport])
                assert p.label == "symmetric (sequential +1)", doc
                assert p.public_ips == (lab.public_ip("a"),) and p.not_learned == ()
            assert doc["profiles"]["ipv4"]["tcp"]["unsolicited_syn"] == "drop"


@pytest.mark.parametrize("nat", ["symmetric-seq", "port-restricted-rst"])
def test_loss_gives_right_or_honestly_unknown_verdicts(nat: str) -> None:
    """5 % loss on the path: each finding is the ground truth or ``unknown`` with a reason
    in ``not_learned`` — never a wrong verdict."""
    from pyholepunch.lab import Lab

    nat_type, allocation, delta, syn = GROUND_TRUTH[nat]
    with Lab(a=nat, b="none", rtt_ms=20, loss_pct=5) as lab:
        with our_stun(lab):
            for transport in ("udp", "tcp"):
                p = lab.call("a", run_sync, (lab.server_ip, OUR_PORT), transport=transport, timeout=30)
                assert p.nat_type in (nat_type, "unknown"), p.to_dict()
                assert (p.allocation, p.delta) in ((allocation, delta), (Allocation.UNKNOWN, None)), \
                    p.to_dict()
                if transport == "tcp":
                    assert p.unsolicited_syn in (syn, SynResponse.UNKNOWN), p.to_dict()
                if p.nat_type == "unknown" or p.allocation is Allocation.UNKNOWN:
                    assert p.not_learned, p.to_dict()


@pytest.mark.parametrize("nat", ["port-restricted", "symmetric-random"])
def test_plain_coturn_without_rfc5780(nat: str) -> None:
    """coturn on one address (no OTHER-ADDRESS, CHANGE-REQUEST -> 420): the profile says what
    it could not learn; a second plain server on another IP restores the mapping test."""
    from pyholepunch.lab import Lab

    nat_type, allocation, delta, _ = GROUND_TRUTH[nat]
    with Lab(a=nat, b="none") as lab, tempfile.TemporaryDirectory() as work:
        procs = [lab.spawn("server", _coturn_argv([ip], COTURN_PORT, work),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for ip in (lab.server_ip, lab.server_alt_ip)]
        try:
            first, second = (lab.server_ip, COTURN_PORT), (lab.server_alt_ip, COTURN_PORT)
            for server in (first, second):
                assert lab.call("a", _wait_stun, server, 8.0, timeout=15), "coturn did not answer"
            alone = lab.call("a", run_sync, first, transport="udp", timeout=30)
            assert alone.nat_type == "unknown" and (alone.allocation, alone.delta) == (allocation, delta)
            assert any("no OTHER-ADDRESS" in n for n in alone.not_learned), alone.not_learned
            assert any(n.startswith("filtering:") and "420" in n for n in alone.not_learned)
            paired = lab.call("a", run_sync, first, transport="udp", alt_server=second, timeout=30)
            expected = "symmetric" if nat_type == "symmetric" else "unknown"   # filtering still unknown
            assert paired.nat_type == expected, paired.to_dict()
            assert paired.mapping.value == ("address-and-port-dependent" if expected == "symmetric"
                                            else "endpoint-independent")
            assert not any(n.startswith("mapping:") and "OTHER-ADDRESS" in n for n in paired.not_learned)
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(5)
