"""The NAT lab itself: reachability and filtering per type, delay, loss, teardown, CLI."""
from __future__ import annotations

import os
import signal
import socket
import statistics
import subprocess
import sys
import time

import pytest

from pyholepunch.errors import LabError
from pyholepunch.lab import NAT_TYPES, Lab, process_alive, state

from .helpers import connect_times_ms, datagrams_through

pytestmark = pytest.mark.lab

PORT = 3478


def _serve_once(lab: Lab, kind: int) -> socket.socket:
    s = lab.socket("server", socket.AF_INET, kind)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((lab.server_ip, PORT))
    if kind == socket.SOCK_STREAM:
        s.listen(8)
    s.settimeout(3)
    return s


def _tcp_connect(s: socket.socket, dst: tuple[str, int], timeout: float) -> str:
    s.settimeout(timeout)
    try:
        s.connect(dst)
        return "ok"
    except ConnectionRefusedError:
        return "rst"
    except TimeoutError:
        return "timeout"


def _reach_server(lab: Lab, peer: str) -> None:
    """TCP and UDP from the peer reach the server, seen from the peer's public address."""
    with _serve_once(lab, socket.SOCK_STREAM) as ls, lab.socket(peer) as c:
        assert _tcp_connect(c, (lab.server_ip, PORT), 3) == "ok"
        conn, addr = ls.accept()
        conn.close()
        assert addr[0] == lab.public_ip(peer)
    with _serve_once(lab, socket.SOCK_DGRAM) as us, \
            lab.socket(peer, socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.settimeout(2)
        u.sendto(b"hi", (lab.server_ip, PORT))
        data, addr = us.recvfrom(64)
        assert data == b"hi" and addr[0] == lab.public_ip(peer)
        us.sendto(b"back", addr)
        assert u.recv(64) == b"back"


def _unsolicited(lab: Lab, peer: str, listen_port: int, wait: float = 0.5) -> tuple[str, bool]:
    """The server connects / sends to the peer's public address on `listen_port`, where the peer
    listens (TCP and UDP). Returns (TCP outcome, whether the UDP datagram arrived)."""
    with lab.socket(peer) as ls, lab.socket(peer, socket.AF_INET, socket.SOCK_DGRAM) as lu, \
            lab.socket("server") as c, lab.socket("server", socket.AF_INET, socket.SOCK_DGRAM) as cu:
        ls.bind(("0.0.0.0", listen_port))
        ls.listen(4)
        lu.bind(("0.0.0.0", listen_port))
        tcp = _tcp_connect(c, (lab.public_ip(peer), listen_port), wait)
        cu.sendto(b"unsolicited", (lab.public_ip(peer), listen_port))
        lu.settimeout(wait)
        try:
            got_udp = lu.recv(64) == b"unsolicited"
        except TimeoutError:
            got_udp = False
        return tcp, got_udp


@pytest.mark.parametrize("nat_type", NAT_TYPES)
def test_peer_reaches_server_and_unsolicited_is_filtered(nat_type: str) -> None:
    with Lab(a=nat_type, b="none") as lab:
        _reach_server(lab, "a")
        if nat_type == "none":
            assert _unsolicited(lab, "a", 40001) == ("ok", True)
        elif nat_type == "full-cone":
            # A port never used outbound is closed; a mapped port is open to anyone.
            assert _unsolicited(lab, "a", 40001)[1] is False
            with lab.socket("a", socket.AF_INET, socket.SOCK_DGRAM) as u:
                u.bind(("0.0.0.0", 40002))
                u.sendto(b"open", (lab.server_alt_ip, 9))  # opens the mapping (nothing listens)
            time.sleep(0.05)
            with lab.socket("a") as t:  # same for TCP: a SYN out opens the mapping
                t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                t.bind(("0.0.0.0", 40002))
                assert _tcp_connect(t, (lab.server_alt_ip, 9), 1) == "rst"
            with lab.socket("a") as ls:
                ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                ls.bind(("0.0.0.0", 40002))
                ls.listen(4)
                for src in (lab.server_ip, lab.server_alt_ip):  # the mapping survives inbound flows
                    with lab.socket("server") as c:
                        c.bind((src, 0))
                        assert _tcp_connect(c, (lab.public_ip("a"), 40002), 1) == "ok"
                        conn, _ = ls.accept()
                        with conn:
                            conn.sendall(b"reply goes out through the NAT")
                            assert c.recv(64)
        else:
            tcp, udp = _unsolicited(lab, "a", 40001)
            assert not udp
            assert tcp == ("rst" if nat_type == "port-restricted-rst" else "timeout")


@pytest.mark.parametrize("nat_type", ["port-restricted", "cgnat"])
def test_simultaneous_open_through_two_nats(nat_type: str) -> None:
    """Conntrack matches the inbound SYN to the outbound flow: TCP simultaneous open works."""
    from pyholepunch.lab.verify import Client, simultaneous_open

    with Lab(a=nat_type, b=nat_type) as lab:
        ca, cb = Client(lab, "a", 0.5), Client(lab, "b", 0.5)
        # Port-preserving EIM NATs: the public port is the local port.
        assert simultaneous_open([(ca, 41000, (lab.public_ip("b"), 42000)),
                                   (cb, 42000, (lab.public_ip("a"), 41000))], [], 3.0)


def test_delay_gives_the_requested_rtt() -> None:
    with Lab(a="port-restricted", b="none", rtt_ms=40) as lab, \
            _serve_once(lab, socket.SOCK_STREAM) as ls:
        samples = connect_times_ms(lab, "a", socket.AF_INET, ls, (lab.server_ip, PORT), 5)
        assert 40 <= statistics.median(samples) <= 60, samples


def test_loss_drops_about_the_requested_share() -> None:
    with Lab(a="none", b="none", loss_pct=50) as lab, _serve_once(lab, socket.SOCK_DGRAM) as us, \
            lab.socket("a", socket.AF_INET, socket.SOCK_DGRAM) as u:
        n = 400
        got = datagrams_through(u, us, (lab.server_ip, PORT), n)
        assert 0.3 * n < got < 0.7 * n, got


def test_conntrack_sysctl_applies_in_every_nat() -> None:
    with Lab(a="cgnat", b="port-restricted", conntrack={"tcp_timeout_established": 37}) as lab:
        for node in ("nat_a", "cgn_a", "nat_b"):
            r = lab.run(node, ["cat", "/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_established"])
            assert r.stdout.strip() == "37"


def test_unknown_conntrack_setting_is_a_clear_error_and_leaves_nothing() -> None:
    with pytest.raises(LabError, match="no_such_timeout"):
        Lab(conntrack={"no_such_timeout": 5}).start()


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="'bogus'"):
        Lab(a="bogus")
    with pytest.raises(ValueError, match="loss_pct"):
        Lab(loss_pct=100)
    with pytest.raises(ValueError, match="rtt_ms"):
        Lab(rtt_ms=-1)
    with pytest.raises(ValueError, match="hairpin"):
        Lab(hairpin=True)
    with pytest.raises(ValueError, match="same_nat"):
        Lab(a="none", same_nat=True)
    with Lab(a="none", b="none") as lab:
        with pytest.raises(ValueError, match="'nope'"):
            lab.run("nope", ["true"])
        with pytest.raises(ValueError, match="argv"):
            lab.run("a", "ip addr")  # type: ignore[arg-type]


def _where(expected: str) -> str:
    return socket.if_nameindex()[-1][1] + ":" + expected


def _boom(msg: str) -> None:
    raise KeyError(msg)


def test_run_spawn_call() -> None:
    with Lab(a="port-restricted", b="none") as lab:
        assert lab.name.startswith("hpl") and lab.netns("a") == f"{lab.name}-a"
        assert set(lab.nodes) == {"core", "server", "nat_a", "a", "b"}
        r = lab.run("a", ["ip", "-4", "-br", "addr", "show", "eth0"])
        assert r.returncode == 0 and lab.private_ip("a") in r.stdout
        assert lab.call("nat_a", _where, "x") in ("wan:x", "lan:x")
        with pytest.raises(KeyError, match="inside"):
            lab.call("a", _boom, "inside")
        with pytest.raises(TimeoutError):
            lab.call("a", time.sleep, 5, timeout=0.3)
        p = lab.spawn("server", ["sleep", "30"])
    assert p.poll() is not None  # killed at teardown


@pytest.mark.asyncio
async def test_async_api() -> None:
    async with Lab(a="symmetric-random", b="full-cone") as lab:
        r = await lab.arun("b", ["ip", "-4", "-br", "addr"])
        assert lab.private_ip("b") in r.stdout
        proc = await lab.aspawn("server", ["sleep", "30"])
        assert await lab.acall("nat_b", _where, "y") in ("wan:y", "lan:y")
        name = lab.name
    assert proc.returncode is not None
    assert not state.namespaces_of(name)


def test_teardown_when_the_body_raises() -> None:
    with pytest.raises(RuntimeError, match="body failed"):
        with Lab(a="cgnat", b="symmetric-seq", rtt_ms=10) as lab:
            name = lab.name
            p = lab.spawn("a", ["sleep", "30"])
            assert len(state.namespaces_of(name)) == len(lab.nodes)
            raise RuntimeError("body failed")
    assert state.namespaces_of(name) == [] and state.read(name) is None
    assert p.poll() is not None


_CRASH = """
import os, subprocess
from pyholepunch.lab import Lab
lab = Lab(a="port-restricted", b="none").start()
p = lab.spawn("a", ["sleep", "60"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(lab.name, p.pid, flush=True)
os._exit(0)  # a crash: no teardown, no atexit
"""


def _lab_cli(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyholepunch.lab", *args], capture_output=True,
                          text=True, timeout=30, **kw)  # type: ignore[call-overload]


def test_down_all_mine_removes_only_orphans() -> None:
    crashed = subprocess.run([sys.executable, "-c", _CRASH], capture_output=True, text=True, timeout=30)
    orphan, sleeper = crashed.stdout.split()
    assert state.namespaces_of(orphan), crashed.stderr
    with Lab(a="none", b="none") as live:
        r = _lab_cli("down", "--all-mine")
        assert r.returncode == 0, r.stderr
        assert orphan in r.stdout
        assert state.namespaces_of(orphan) == [] and state.read(orphan) is None
        assert state.namespaces_of(live.name)  # our own live lab is kept
        assert not process_alive(int(sleeper))  # the orphan's process went with its namespaces


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_lab_up_stops_on_signal(sig: int) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "pyholepunch.lab", "up", "--a", "port-restricted",
                             "--b", "none", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        import json

        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        name = info["name"]
        assert state.namespaces_of(name)
        r = _lab_cli("exec", name, "a", "--", "ip", "-4", "-br", "addr", "show", "eth0")
        assert info["private"]["a"] in r.stdout
        proc.send_signal(sig)
        assert proc.wait(timeout=10) == 0
        assert state.namespaces_of(name) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


_SIGTERM_BODY = """
import time
from pyholepunch.lab import Lab
with Lab(a="none", b="none") as lab:
    print(lab.name, flush=True)
    time.sleep(30)
"""


def test_sigterm_tears_down_a_plain_with_block() -> None:
    proc = subprocess.Popen([sys.executable, "-c", _SIGTERM_BODY], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        name = proc.stdout.readline().strip()
        assert state.namespaces_of(name)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == -signal.SIGTERM  # still dies of SIGTERM, after teardown
        assert state.namespaces_of(name) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_lab_down_by_name_stops_the_owner() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "pyholepunch.lab", "up", "--a", "full-cone"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        name = proc.stdout.readline().split()[1]
        r = _lab_cli("down", name)
        assert r.returncode == 0 and name in r.stdout
        assert proc.wait(timeout=10) == 0
        assert state.namespaces_of(name) == []
        assert _lab_cli("down", name).returncode == 1
        assert _lab_cli("down", "not-a-lab").returncode == 2
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_same_nat_peers_share_a_public_address() -> None:
    with Lab(a="port-restricted", same_nat=True) as lab:
        assert lab.public_ip("a") == lab.public_ip("b")
        assert lab.b_type == "port-restricted"
        _reach_server(lab, "b")
        with lab.socket("b") as ls, lab.socket("a") as c:  # the LAN path
            ls.bind((lab.private_ip("b"), 5000))
            ls.listen(1)
            assert _tcp_connect(c, (lab.private_ip("b"), 5000), 2) == "ok"


def test_not_root_is_a_clear_error() -> None:
    code = ("import os\n"
            "from pyholepunch.lab import Lab\n"
            "from pyholepunch.errors import LabError\n"
            "os.setuid(65534)\n"
            "try:\n    Lab().start()\nexcept LabError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                       env=os.environ | {"PYTHONDONTWRITEBYTECODE": "1"})
    assert "needs root" in r.stdout, r.stderr


def test_jitter_spreads_the_rtt() -> None:
    with Lab(a="none", b="none", rtt_ms=20, jitter_ms=8) as lab, \
            _serve_once(lab, socket.SOCK_STREAM) as ls:
        samples = []
        for _ in range(12):
            with lab.socket("a") as c:
                t0 = time.perf_counter()
                c.connect((lab.server_ip, PORT))
                samples.append((time.perf_counter() - t0) * 1000)
            ls.accept()[0].close()
        # each crossing takes 10 ± 8 ms: the RTT lies in [4, 36] ms (+ scheduling) and varies
        assert 4 <= min(samples) and max(samples) <= 45, samples
        assert max(samples) - min(samples) > 3, samples


def test_delay_schedule_orders_by_due_time() -> None:
    import random

    from pyholepunch.lab.delay import DelaySchedule

    s = DelaySchedule(0.010, 0.005, rng=random.Random(1))
    dues = [s.push(i, now=1.0 + i * 0.001) for i in range(50)]
    assert all(1.005 - 1e-9 <= d - i * 0.001 <= 1.015 + 1e-9 for i, d in enumerate(dues))
    assert s.pop_due(1.0) == [] and len(s) == 50
    released = s.pop_due(2.0)
    assert sorted(released, key=lambda i: dues[i]) == released and len(released) == 50
    with pytest.raises(ValueError, match="-1"):
        DelaySchedule(-1)


def test_ruleset_text_per_type() -> None:
    from pyholepunch.lab.nat import NatConfig, loss_ruleset, ruleset

    base = dict(wan_if="wan", wan_ip="198.51.100.2", lan_if="lan", lan_net="10.0.1.0/24")
    assert "reject with tcp reset" in ruleset(NatConfig("port-restricted-rst", **base))
    assert "reject" not in ruleset(NatConfig("port-restricted", **base))
    assert "fully-random" in ruleset(NatConfig("symmetric-random", **base))
    seq = ruleset(NatConfig("symmetric-seq", seq_offset=5, **base))
    assert "0 : 20005, 1 : 20006" in seq and "numgen inc" in seq
    assert "ct status dnat snat ip to 198.51.100.2" in ruleset(NatConfig("full-cone", hairpin=True, **base))
    with pytest.raises(ValueError, match="'none'"):
        ruleset(NatConfig("none", **base))
    assert loss_ruleset(0) == "" and "< 250 drop" in loss_ruleset(2.5)


@pytest.mark.asyncio
async def test_cancelled_async_start_leaves_nothing() -> None:
    import asyncio

    lab = Lab(a="cgnat", b="cgnat")
    task = asyncio.ensure_future(lab.__aenter__())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert lab.name and state.namespaces_of(lab.name) == []
