"""simultaneous_open on loopback: two real processes, RST re-arm, deadlines, low TTL on the wire."""
from __future__ import annotations

import socket
import threading
import time
from typing import Any

import pytest

from pyholepunch.engine import Engine
from pyholepunch.errors import PunchError, PunchTimeout

from .helpers import (
    Family,
    LoCapture,
    free_port,
    in_netns,
    listen_later,
    private_loopback,
    punch_side,
    run_in_processes,
    silent_port,
    ticks_during,
)


@pytest.mark.root
def test_two_processes_simultaneous_open(engine: Engine, fam: Family, no_fd_leak: None) -> None:
    """listen=False on both sides: only a true simultaneous open (crossing SYNs) can connect.

    Runs on a private loopback whose RSTs are dropped, like a NAT dropping an unsolicited SYN
    (see helpers.private_loopback): on a plain lo the first SYN is refused and the sides race.
    """
    pa, pb = free_port(fam.a), free_port(fam.b)
    with private_loopback((pa, pb)) as ns:
        a, b, _, _, start_at = _punch_pair_at(engine, fam, False, pa, pb, ns)
    _check_pair(fam, a, b, pa, pb, start_at, listen=False)
    # Each side's one SYN met the other's: no refusal, no re-arm, crossing SYNs did it.
    for side in (a, b):
        assert side["stats"]["attempts"] == 1 and side["stats"]["rsts_seen"] == 0, side


def test_two_processes_punch_with_listen(engine: Engine, fam: Family, no_fd_leak: None) -> None:
    """listen=True on both sides, plain loopback: connect or accept, one connection either way."""
    pa, pb = free_port(fam.a), free_port(fam.b)
    _check_pair(fam, *_punch_pair_at(engine, fam, True, pa, pb, None), listen=True)


def _punch_pair_at(engine: Engine, fam: Family, listen: bool, pa: int, pb: int,
                   netns: str | None) -> tuple[Any, Any, int, int, float]:
    start_at = time.time() + 0.3
    side_a = (engine.name, (fam.a, pa), (fam.b, pb), start_at, 8.0, listen, 0.005, b"hello from a")
    side_b = (engine.name, (fam.b, pb), (fam.a, pa), start_at, 8.0, listen, 0.005, b"hello from b")
    if netns is None:
        a, b = run_in_processes((punch_side, side_a), (punch_side, side_b))
    else:
        a, b = run_in_processes((in_netns, (netns, punch_side, *side_a)),
                                (in_netns, (netns, punch_side, *side_b)))
    return a, b, pa, pb, start_at


def _check_pair(fam: Family, a: Any, b: Any, pa: int, pb: int, start_at: float, *,
                listen: bool) -> None:
    assert "error" not in a, a
    assert "error" not in b, b
    assert a["got"] == b"hello from b" and b["got"] == b"hello from a"
    assert a["sockname"] == (fam.a, pa) and a["peername"] == (fam.b, pb)
    assert b["sockname"] == (fam.b, pb) and b["peername"] == (fam.a, pa)
    assert a["blocking"] and b["blocking"]
    for side, port, peer in ((a, pa, (fam.b, pb)), (b, pb, (fam.a, pa))):
        st = side["stats"]
        assert st["local_port"] == port and tuple(st["remote"]) == peer
        assert st["attempts"] >= st["syns_sent"] and st["time_to_established_ns"] >= 0
        if st["syns_sent"]:
            assert st["first_syn_delay_ns"] >= 0 and st["first_syn_at"] >= start_at - 1e-5
            assert st["time_to_established_ns"] >= st["first_syn_delay_ns"]
        else:   # the peer's SYN reached our listener before ours left (connect found the
            assert st["accepted"]          # 4-tuple taken): only accept() can have won
    if not listen:
        assert not a["stats"]["accepted"] and not b["stats"]["accepted"]
    # One TCP connection: at most one side can have won it through accept().
    assert not (a["stats"]["accepted"] and b["stats"]["accepted"])


@pytest.mark.parametrize("listen", [False, True])
def test_rst_rearm_until_peer_comes_up(engine: Engine, fam: Family, listen: bool,
                                       no_fd_leak: None) -> None:
    """The peer's port answers RST for a while; re-arming every interval wins once it listens."""
    pa, pb = free_port(fam.a), free_port(fam.b)
    server = fam.sock()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    t = listen_later(server, (fam.b, pb), 0.3)
    try:
        res = engine.simultaneous_open((fam.a, pa), (fam.b, pb), None, 5.0, interval=0.02,
                                       listen=listen)
        t.join()
        with res.sock:
            peer, _ = server.accept()
            with peer:
                res.sock.sendall(b"x")
                assert peer.recv(1) == b"x"
            assert res.sock.getsockname()[:2] == (fam.a, pa)
        st = res.stats
        assert st.rsts_seen > 0
        assert st.attempts == st.rsts_seen + 1          # every refused attempt was re-armed
        assert st.local_port == pa and st.remote == (fam.b, pb) and not st.accepted
        assert st.time_to_established_ns is not None and st.time_to_established_ns >= 0.25e9
    finally:
        t.join()
        server.close()


def test_rst_rearm_until_peer_engine_comes_up(engine: Engine, fam: Family, no_fd_leak: None) -> None:
    """The late side is itself an engine punching back (listen=True) 0.3 s after us."""
    pa, pb = free_port(fam.a), free_port(fam.b)
    late: dict[str, Any] = {}

    def peer() -> None:
        time.sleep(0.3)
        try:
            late["res"] = engine.simultaneous_open((fam.b, pb), (fam.a, pa), None, 5.0,
                                                   interval=0.02, listen=True)
        except BaseException as exc:
            late["err"] = exc

    t = threading.Thread(target=peer)
    t.start()
    try:
        res = engine.simultaneous_open((fam.a, pa), (fam.b, pb), None, 5.0, interval=0.02,
                                       listen=False)
    finally:
        t.join()
    assert "err" not in late, late
    with res.sock as ours, late["res"].sock as theirs:
        ours.sendall(b"ping")
        assert theirs.recv(4) == b"ping"
        assert ours.getpeername() == theirs.getsockname()
    assert res.stats.rsts_seen > 0 and res.stats.attempts > res.stats.rsts_seen


def test_refused_peer_times_out_with_stats(engine: Engine, fam: Family, no_fd_leak: None) -> None:
    pa, pb = free_port(fam.a), free_port(fam.b)
    t0 = time.time()
    with pytest.raises(PunchTimeout) as info:
        engine.simultaneous_open((fam.a, pa), (fam.b, pb), None, 0.3, interval=0.02)
    assert time.time() - t0 >= 0.29
    st = info.value.stats
    assert st is not None and st.attempts >= 3 and st.rsts_seen >= 2
    assert st.time_to_established_ns is None and st.local_port in (None, pa)
    assert isinstance(info.value, PunchError) and isinstance(info.value, TimeoutError)


def test_silent_peer_times_out_with_one_syn(engine: Engine, fam: Family, no_fd_leak: None) -> None:
    """A peer that drops SYNs: no RST, no re-arm (the kernel retransmits), PunchTimeout."""
    pa = free_port(fam.a)
    with silent_port(fam.b) as pb:
        with pytest.raises(PunchTimeout) as info:
            engine.simultaneous_open((fam.a, pa), (fam.b, pb), time.time() + 0.05, 0.4,
                                     listen=False)
    st = info.value.stats
    assert st is not None and st.attempts == 1 and st.rsts_seen == 0 and st.icmp_errors == 0
    assert st.first_syn_delay_ns is not None


def test_start_at_is_honoured(engine: Engine, fam: Family, no_fd_leak: None) -> None:
    pa, pb = free_port(fam.a), free_port(fam.b)
    start_at = time.time() + 0.2
    with pytest.raises(PunchTimeout) as info:
        engine.simultaneous_open((fam.a, pa), (fam.b, pb), start_at, 0.1, interval=0.05)
    st = info.value.stats
    assert st is not None and st.first_syn_at is not None and st.first_syn_at >= start_at - 1e-5
    assert st.first_syn_delay_ns is not None and st.first_syn_delay_ns >= 0


def test_port_zero_picks_one_port_for_every_attempt(engine: Engine, fam: Family, no_fd_leak: None) -> None:
    pb = free_port(fam.b)
    with fam.sock() as server:
        t = listen_later(server, (fam.b, pb), 0.1)
        try:
            res = engine.simultaneous_open((fam.a, 0), (fam.b, pb), None, 5.0, interval=0.01,
                                           listen=False)
        finally:
            t.join()
        with res.sock:
            assert res.stats.attempts > 1 and res.stats.local_port == res.sock.getsockname()[1]
            peer, addr = server.accept()
            peer.close()
            assert addr[:2] == (fam.a, res.stats.local_port)


def test_usable_from_asyncio_without_blocking_the_loop(engine: Engine, fam: Family) -> None:
    import asyncio

    async def punch() -> None:
        pa, pb = free_port(fam.a), free_port(fam.b)
        with pytest.raises(PunchTimeout):
            await asyncio.to_thread(engine.simultaneous_open, (fam.a, pa), (fam.b, pb), None, 0.4)

    assert asyncio.run(ticks_during(punch())) >= 10


@pytest.mark.root
def test_low_ttl_first_syn_on_the_wire(engine: Engine, fam: Family, no_fd_leak: None) -> None:
    """syn_ttl=2: the first SYN leaves with TTL 2, every later one with the default TTL."""
    with open("/proc/sys/net/ipv6/conf/lo/hop_limit" if fam.name == "v6"
              else "/proc/sys/net/ipv4/ip_default_ttl") as f:
        default_ttl = int(f.read())
    pa, pb = free_port(fam.a), free_port(fam.b)
    with LoCapture() as cap:
        with pytest.raises(PunchTimeout) as info:
            engine.simultaneous_open((fam.a, pa), (fam.b, pb), None, 0.25, interval=0.03,
                                     syn_ttl=2, listen=False)
        time.sleep(0.02)
        syns = cap.syns(lambda s: s.src == (fam.a, pa) and s.dst == (fam.b, pb))
    assert info.value.stats is not None
    assert len(syns) == info.value.stats.syns_sent >= 3
    assert syns[0].ttl == 2
    assert all(s.ttl == default_ttl for s in syns[1:]), [s.ttl for s in syns]
    # Kernel-built SYNs: lo offloads the TCP checksum (CHECKSUM_PARTIAL), the IP one is final.
    assert all(s.ip_ok for s in syns)


@pytest.mark.root
def test_low_ttl_for_the_first_n_attempts(engine: Engine, fam: Family, no_fd_leak: None) -> None:
    pa, pb = free_port(fam.a), free_port(fam.b)
    with LoCapture() as cap:
        with pytest.raises(PunchTimeout):
            engine.simultaneous_open((fam.a, pa), (fam.b, pb), None, 0.3, interval=0.03,
                                     syn_ttl=5, ttl_syns=3, listen=False)
        time.sleep(0.02)
        ttls = [s.ttl for s in cap.syns(lambda s: s.src == (fam.a, pa))]
    assert len(ttls) >= 5 and ttls[:3] == [5, 5, 5] and 5 not in ttls[3:]


def _abandon_half_open(engine_name: str, ip: str, pl: int, pr: int) -> dict[str, Any]:
    """In a private namespace: our SYNs to ``pr`` vanish, the peer's SYN from ``pr`` reaches
    our connecting socket (SYN_RECV: our SYN-ACK vanishes too) and the deadline passes."""
    import errno
    import subprocess

    from pyholepunch import engine as engine_mod

    rules = (f"table inet hpx {{\n chain out {{\n  type filter hook output priority 0;\n"
             f"  tcp sport {pl} tcp dport {pr} tcp flags & rst == rst counter drop\n"
             f"  tcp sport {pl} tcp dport {pr} drop\n }}\n}}\n")
    subprocess.run(["nft", "-f", "-"], input=rules, text=True, check=True)
    peer = socket.socket()
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    peer.bind((ip, pr))
    peer.setblocking(False)
    timer = threading.Timer(0.1, peer.connect_ex, ((ip, pl),))
    timer.start()
    t0 = time.monotonic()
    try:
        engine_mod.get(engine_name).simultaneous_open((ip, pl), (ip, pr), time.time() + 0.05, 0.25,
                                                      interval=0.02, listen=True)
        outcome = "connected"
    except PunchTimeout:
        outcome = "timeout"
    took = time.monotonic() - t0
    timer.join()
    listing = subprocess.run(["nft", "list", "table", "inet", "hpx"], capture_output=True,
                             text=True, check=True).stdout
    rsts = int(listing.split("counter packets ")[1].split()[0])
    # The next attempt's connect() on the same 4-tuple must send a SYN at once.
    again = socket.socket()
    again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    again.bind((ip, pl))
    again.setblocking(False)
    err = again.connect_ex((ip, pr))
    again.close()
    peer.close()
    return {"outcome": outcome, "took": took, "rsts": rsts, "connect": errno.errorcode.get(err, err)}


@pytest.mark.root
def test_abandoned_half_open_leaves_with_rst(engine: Engine) -> None:
    """#19, a lossy cone pair on the relay: the early side's SYN was dropped by the peer's NAT,
    the peer's SYN made it SYN_RECV and its SYN-ACK was lost. Closed with a FIN at the
    deadline, that socket lingered on the 4-tuple (FIN_WAIT1, retransmitting): every re-armed
    connect() failed with EADDRNOTAVAIL, no SYN left again, and its NAT, past SYN_RECV,
    dropped the peer's fresh SYNs until the relay. Abandoned with a RST, the port is free at
    once and its NAT's entry closes, so the next SYN opens a new one."""
    ip, pl, pr = "127.0.0.1", free_port("127.0.0.1"), free_port("127.0.0.1")
    with private_loopback(()) as ns:
        [r] = run_in_processes((in_netns, (ns, _abandon_half_open, engine.name, ip, pl, pr)))
    assert r["outcome"] == "timeout", r
    assert r["took"] > 0.4, r           # the SYN_RECV graces ran
    assert r["rsts"] == 1, r
    assert r["connect"] == "EINPROGRESS", r
