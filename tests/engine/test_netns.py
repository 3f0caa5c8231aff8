"""The punch tests again across a real routed namespace pair (veth, no NAT), over IPv4 and IPv6:
Lab(a="none", b="none", v6_a="open", v6_b="open").

Each side runs in its own namespace through lab.call (a forked child), both at once from two
threads. The core router between them decrements TTLs and answers TTL-expired SYNs with ICMP.
"""
from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pyholepunch import engine as engine_mod
from pyholepunch.engine import Engine
from pyholepunch.errors import PunchTimeout

from .helpers import PACKET_OUTGOING, Family, capture_socket, drop_rst_rules, parse_ip_tcp, punch_side

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def lab() -> Iterator[Any]:
    from pyholepunch.lab import Lab

    with Lab(a="none", b="none", v6_a="open", v6_b="open") as lab:
        yield lab


def ips(lab: Any, fam: Family) -> tuple[str, str]:
    """a's and b's address in the family under test."""
    if fam.name == "v6":
        return lab.public_ip6("a"), lab.public_ip6("b")
    return lab.public_ip("a"), lab.public_ip("b")


def concurrently(*jobs: Callable[[], Any]) -> list[Any]:
    """Run each job in a thread; return results in order, re-raising the first failure."""
    out: list[Any] = [None] * len(jobs)
    errs: list[BaseException] = []

    def run(i: int, job: Callable[[], Any]) -> None:
        try:
            out[i] = job()
        except BaseException as exc:  # re-raised below, in the test's thread
            errs.append(exc)

    threads = [threading.Thread(target=run, args=(i, j)) for i, j in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    if errs:
        raise errs[0]
    return out


_port = iter(range(42000, 43000, 2))


@pytest.mark.parametrize("listen", [False, True], ids=["pure-simopen", "listen"])
def test_simultaneous_open_across_namespaces(lab: Any, engine: Engine, fam: Family,
                                             listen: bool) -> None:
    ia, ib = ips(lab, fam)
    pa = pb = next(_port)
    if not listen:
        # As a NAT would drop the early SYN instead of answering RST (helpers.private_loopback).
        for node in ("a", "b"):
            out = lab.run(node, ["nft", "-f", "-"], input=drop_rst_rules((pa,), f"hpe{pa}"))
            assert out.returncode == 0, out.stderr
    start_at = time.time() + 0.5
    a, b = concurrently(
        lambda: lab.call("a", punch_side, engine.name, (ia, pa), (ib, pb), start_at, 8.0, listen,
                         0.005, b"from a", timeout=20),
        lambda: lab.call("b", punch_side, engine.name, (ib, pb), (ia, pa), start_at, 8.0, listen,
                         0.005, b"from b", timeout=20),
    )
    assert "error" not in a, a
    assert "error" not in b, b
    assert a["got"] == b"from b" and b["got"] == b"from a"
    assert a["peername"] == (ib, pb) and b["peername"] == (ia, pa)
    if not listen:
        for side in (a, b):
            st = side["stats"]
            assert not st["accepted"] and st["attempts"] == 1 and st["rsts_seen"] == 0, st


def _late_listener(ip: str, port: int, delay: float, wait: float) -> bytes:
    time.sleep(delay)
    with socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((ip, port))
        s.listen(1)
        s.settimeout(wait)
        conn, _ = s.accept()
        with conn:
            conn.settimeout(wait)
            return conn.recv(16)


def _connect_and_say(engine_name: str, local: tuple[str, int], remote: tuple[str, int],
                     **kw: Any) -> dict[str, Any]:
    res = engine_mod.get(engine_name).simultaneous_open(local, remote, None, 5.0, **kw)
    with res.sock as s:
        s.sendall(b"hi")
    return res.stats.as_dict()


def test_rst_rearm_across_namespaces(lab: Any, engine: Engine, fam: Family) -> None:
    ia, ib = ips(lab, fam)
    pa = pb = next(_port)
    got, stats = concurrently(
        lambda: lab.call("b", _late_listener, ib, pb, 0.4, 5.0, timeout=20),
        lambda: lab.call("a", _connect_and_say, engine.name, (ia, pa), (ib, pb), interval=0.02,
                         listen=False, timeout=20),
    )
    assert got == b"hi"
    assert stats["rsts_seen"] > 0 and stats["attempts"] == stats["rsts_seen"] + 1


def _sweep(engine_name: str, pairs: list[Any], local_ip: str) -> dict[str, Any]:
    res = engine_mod.get(engine_name).sweep(pairs, time.time() + 0.3, 5.0, local_ip=local_ip)
    with res.sock as s:
        s.sendall(b"hi")
    return res.stats.as_dict()


def test_sweep_across_namespaces(lab: Any, engine: Engine, fam: Family) -> None:
    ia, ib = ips(lab, fam)
    ports = list(range(20000, 21024))
    target = ports[700]
    pairs = [(0, (ib, p)) for p in ports]
    got, stats = concurrently(
        lambda: lab.call("b", _late_listener, ib, target, 0.0, 5.0, timeout=20),
        lambda: (time.sleep(0.2), lab.call("a", _sweep, engine.name, pairs, ia, timeout=20))[1],
    )
    assert got == b"hi"
    assert tuple(stats["remote"]) == (ib, target) and stats["rsts_seen"] >= 700


def _capture_syns(src_ip: str, dst_ip: str, seconds: float) -> list[dict[str, Any]]:
    """Inside a namespace: every TCP SYN src_ip -> dst_ip arriving on any interface."""
    out = []
    with capture_socket() as cap:
        cap.settimeout(0.05)
        end = time.time() + seconds
        while time.time() < end:
            try:
                frame, addr = cap.recvfrom(65535)
            except TimeoutError:
                continue
            if addr[2] == PACKET_OUTGOING:
                continue
            seen = parse_ip_tcp(frame)
            if seen and seen.src[0] == src_ip and seen.dst[0] == dst_ip and seen.flags & 0x12 == 2:
                out.append({"ttl": seen.ttl, "sport": seen.src[1], "dport": seen.dst[1],
                            "ip_ok": seen.ip_ok, "tcp_ok": seen.tcp_ok})
    return out


def _raw(engine_name: str, src: tuple[str, int], dst: tuple[str, int], ttl: int,
         start_at: float) -> int:
    return engine_mod.get(engine_name).raw_syn(src, dst, ttl=ttl, count=2, spacing=0.01,
                                               start_at=start_at).sent


def test_raw_syn_across_namespaces(lab: Any, engine: Engine, fam: Family) -> None:
    """Hand-built SYNs cross the router: TTL decremented by one hop, checksums still valid."""
    ia, ib = ips(lab, fam)
    start_at = time.time() + 0.4
    seen, sent = concurrently(
        lambda: lab.call("b", _capture_syns, ia, ib, 1.2, timeout=20),
        lambda: lab.call("a", _raw, engine.name, (ia, 43001), (ib, 43002), 9, start_at, timeout=20),
    )
    assert sent == 2
    ours = [s for s in seen if (s["sport"], s["dport"]) == (43001, 43002)]
    assert len(ours) == 2
    assert all(s["ttl"] == 8 and s["ip_ok"] and s["tcp_ok"] for s in ours), ours


def _simopen_ttl1(engine_name: str, local: tuple[str, int], remote: tuple[str, int],
                  start_at: float) -> dict[str, Any]:
    try:
        engine_mod.get(engine_name).simultaneous_open(local, remote, start_at, 0.3, interval=0.05,
                                                      syn_ttl=1, listen=False)
    except PunchTimeout as exc:
        assert exc.stats is not None
        return exc.stats.as_dict()
    raise AssertionError("a closed port was connected")


def test_low_ttl_syn_dies_before_the_peer(lab: Any, engine: Engine, fam: Family) -> None:
    """syn_ttl=1: the router drops the first SYN (ICMP time exceeded, a re-arm), later ones arrive.

    IPv6: Linux keeps a connect in SYN_SENT on ICMPv6 time exceeded (a soft error, where IPv4
    ends it), so there is no re-arm: the one SYN dies at the router and nothing reaches b.
    """
    ia, ib = ips(lab, fam)
    pa = pb = next(_port)
    start_at = time.time() + 0.4
    seen, stats = concurrently(
        lambda: lab.call("b", _capture_syns, ia, ib, 1.0, timeout=20),
        lambda: lab.call("a", _simopen_ttl1, engine.name, (ia, pa), (ib, pb), start_at, timeout=20),
    )
    ours = [s for s in seen if (s["sport"], s["dport"]) == (pa, pb)]
    if fam.name == "v6":
        assert stats["attempts"] == 1 and stats["syns_sent"] == 1 and ours == []
        return
    assert stats["attempts"] >= 2
    assert len(ours) == stats["attempts"] - 1          # all but the TTL-1 SYN reached b
    assert stats["icmp_errors"] >= 1 and stats["rsts_seen"] == len(ours)


def _link_local(lab: Any, node: str, ifname: str) -> str:
    out = lab.run(node, ["ip", "-6", "-o", "addr", "show", "dev", ifname, "scope", "link"]).stdout
    return str(out.split()[3].split("/")[0])


def _scoped_punch(engine_name: str, local: tuple[str, int], remote: tuple[str, int]) -> dict[str, Any]:
    eng = engine_mod.get(engine_name)
    res = eng.simultaneous_open(local, remote, None, 5.0, interval=0.02, listen=False)
    with res.sock as s:
        s.sendall(b"ll")
        out = {"stats": res.stats.as_dict(), "peer": s.getpeername()}
    res = eng.sweep([(0, (remote[0], 9)), (0, remote)], None, 5.0, local_ip=local[0])
    with res.sock:
        out["sweep_remote"] = res.stats.remote
    return out


def _accept_n(ip: str, port: int, n: int, wait: float) -> list[bytes]:
    """Listen on a (scoped) address; the first bytes of each of n connections."""
    got = []
    with socket.socket(socket.AF_INET6) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(socket.getaddrinfo(ip, port, type=socket.SOCK_STREAM)[0][4])  # keeps the %scope
        s.listen(4)
        s.settimeout(wait)
        for _ in range(n):
            conn, _ = s.accept()
            with conn:
                conn.settimeout(wait)
                got.append(conn.recv(16))
    return got


def test_link_local_with_scope(lab: Any, engine: Engine) -> None:
    """fe80::/10 needs its interface: a's link-local %eth0 to the core's on the same link,
    simultaneous_open (re-armed until the core listens) and a sweep."""
    mine, theirs = _link_local(lab, "a", "eth0"), _link_local(lab, "core", "pa")
    port = next(_port)
    got, out = concurrently(
        lambda: (time.sleep(0.2), lab.call("core", _accept_n, f"{theirs}%pa", port, 2, 5.0,
                                           timeout=20))[1],
        lambda: lab.call("a", _scoped_punch, engine.name, (f"{mine}%eth0", 0),
                         (f"{theirs}%eth0", port), timeout=20),
    )
    assert got == [b"ll", b""]
    assert tuple(out["stats"]["remote"]) == (f"{theirs}%eth0", port)
    assert out["peer"][:2] == (theirs, port) and out["peer"][3] > 0   # Python: scope as index
    assert tuple(out["sweep_remote"]) == (f"{theirs}%eth0", port)
