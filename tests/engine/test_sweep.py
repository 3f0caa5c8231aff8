"""sweep: >= 1000 concurrent connects, first established wins, nothing else left open."""
from __future__ import annotations

import contextlib
import os
import resource
import socket
import time
from collections.abc import Iterator

import pytest

from pyholepunch.address import family_of
from pyholepunch.engine import Engine, sweep_pairs
from pyholepunch.errors import PunchError, PunchTimeout

from .helpers import (
    Family,
    LoCapture,
    closed_ports,
    free_port,
    listen_later,
    open_fds,
    silent_port,
)


@contextlib.contextmanager
def listener(ip: str) -> Iterator[tuple[socket.socket, int]]:
    s = socket.socket(family_of(ip))
    try:
        s.bind((ip, 0))
        s.listen(64)
        yield s, s.getsockname()[1]
    finally:
        s.close()


@contextlib.contextmanager
def nofile_soft_limit(soft: int) -> Iterator[None]:
    old = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, old)


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_sweep_1024_pairs_one_listens(engine: Engine, fam: Family, where: str) -> None:
    with listener(fam.c) as (lst, port):
        ports = closed_ports(1023)
        at = {"first": 0, "middle": 511, "last": 1023}[where]
        ports.insert(at, port)
        pairs = [(0, (fam.c, p)) for p in ports]
        before = open_fds()
        res = engine.sweep(pairs, time.time() + 0.05, 5.0, local_ip=fam.a)
        with res.sock:
            assert open_fds() - before == {str(res.sock.fileno())}
            assert res.sock.getpeername()[:2] == (fam.c, port)
            assert res.sock.getblocking()
            peer, addr = lst.accept()
            with peer:
                res.sock.sendall(b"won")
                assert peer.recv(3) == b"won"
            st = res.stats
            assert st.remote == (fam.c, port) and st.local_port == addr[1] == res.sock.getsockname()[1]
            assert st.attempts >= at + 1 and st.syns_sent >= st.attempts
            assert st.rsts_seen >= at and st.sockets_opened >= at + 1
            assert not st.accepted
            assert st.first_syn_delay_ns is not None and st.time_to_established_ns is not None
        assert open_fds() == before


def test_sweep_local_ports_times_remote_ports(engine: Engine, fam: Family) -> None:
    """The (local ports x remote ports) form, with fixed local ports shared via SO_REUSEPORT."""
    with listener(fam.c) as (_lst, port):
        local = [free_port(fam.a) for _ in range(4)]
        remote = closed_ports(255) + [port]
        pairs = sweep_pairs(local, fam.c, remote)
        assert len(pairs) == 1024
        before = open_fds()
        res = engine.sweep(pairs, None, 5.0, local_ip=fam.a)
        with res.sock:
            assert res.sock.getpeername()[:2] == (fam.c, port)
            assert res.stats.local_port in local
        assert open_fds() == before


def test_sweep_all_refused_ends_early_with_stats(engine: Engine, fam: Family, no_fd_leak: None) -> None:
    """Every pair refused and no re-arm: a PunchError with stats, well before the deadline."""
    pairs = [(0, (fam.c, p)) for p in closed_ports(200)]
    t0 = time.monotonic()
    with pytest.raises(PunchError) as info:
        engine.sweep(pairs, None, 5.0, local_ip=fam.a)
    assert time.monotonic() - t0 < 4
    st = info.value.stats
    assert st is not None and st.attempts == 200 and st.rsts_seen == 200
    assert st.remote is None and st.time_to_established_ns is None


def test_sweep_rearms_until_the_port_opens(engine: Engine, fam: Family, no_fd_leak: None) -> None:
    ports = closed_ports(20)
    target = ports[7]
    srv = fam.sock()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    t = listen_later(srv, (fam.c, target), 0.2, backlog=4)
    try:
        res = engine.sweep([(0, (fam.c, p)) for p in ports], None, 5.0, local_ip=fam.a,
                           interval=0.02)
        with res.sock:
            assert res.stats.remote == (fam.c, target)
            assert res.stats.rsts_seen > 20              # re-armed pairs were refused again
    finally:
        t.join()
        srv.close()


def test_max_inflight_caps_open_sockets(engine: Engine, fam: Family, no_fd_leak: None) -> None:
    """Silent remotes never finish, so exactly max_inflight SYNs can ever leave."""
    with silent_port(fam.c) as port:
        pairs = [(0, (fam.c, port))] * 40
        with pytest.raises(PunchTimeout) as info:
            engine.sweep(pairs, None, 0.3, local_ip=fam.a, max_inflight=7)
    st = info.value.stats
    assert st is not None and st.attempts == 7 and st.sockets_opened == 7


def test_rate_paces_syns_on_absolute_deadlines(engine: Engine, fam: Family, no_fd_leak: None) -> None:
    """At 400 SYN/s the 50th SYN cannot leave before start + 49/400 s."""
    with listener(fam.c) as (_lst, port):
        ports = closed_ports(49) + [port]
        start = time.time() + 0.05
        res = engine.sweep([(0, (fam.c, p)) for p in ports], start, 5.0, local_ip=fam.a, rate=400)
        with res.sock:
            assert res.stats.attempts == 50
            assert res.stats.time_to_established_ns is not None
            assert res.stats.time_to_established_ns >= 49 / 400 * 1e9


def test_low_fd_limit_is_refused_up_front(engine: Engine, fam: Family, no_fd_leak: None) -> None:
    pairs = [(0, (fam.c, p)) for p in closed_ports(300)]
    soft = len(open_fds()) + 64
    with nofile_soft_limit(soft):
        with pytest.raises(OSError) as info:
            engine.sweep(pairs, None, 1.0, local_ip=fam.a, max_inflight=1024)
    assert info.value.errno == 24
    assert "RLIMIT_NOFILE" in str(info.value)


def test_descriptors_running_out_mid_sweep(engine: Engine, fam: Family, no_fd_leak: None) -> None:
    """The up-front check passes, then socket() hits EMFILE: a clean OSError, nothing leaked."""
    with silent_port(fam.c) as port, open(os.devnull) as null:
        pairs = [(0, (fam.c, port))] * 40          # silent: every socket stays in flight
        soft = len(open_fds()) + 64
        hogs: list[int] = []
        with nofile_soft_limit(soft):
            try:
                while True:                       # eat the budget the check counted on
                    hogs.append(os.dup(null.fileno()))
            except OSError:
                pass
            for _ in range(20):                   # leave 20 free: fewer than the 40 needed
                os.close(hogs.pop())
            try:
                with pytest.raises(OSError) as info:
                    engine.sweep(pairs, None, 2.0, local_ip=fam.a, max_inflight=40)
            finally:
                for fd in hogs:
                    os.close(fd)
    assert info.value.errno in (24, 23)          # EMFILE / ENFILE


def test_low_fd_limit_works_with_a_small_inflight_cap(engine: Engine, fam: Family, no_fd_leak: None) -> None:
    with listener(fam.c) as (_lst, port):
        ports = closed_ports(299) + [port]
        soft = len(open_fds()) + 64
        with nofile_soft_limit(soft):
            res = engine.sweep([(0, (fam.c, p)) for p in ports], None, 5.0, local_ip=fam.a,
                               max_inflight=16)
        with res.sock:
            assert res.stats.remote == (fam.c, port) and res.stats.attempts == 300


@pytest.mark.root
def test_sweep_syn_ttl_on_the_wire(engine: Engine, fam: Family, no_fd_leak: None) -> None:
    """Each pair's first SYN carries syn_ttl; re-armed SYNs carry the default TTL."""
    pa = free_port(fam.a)
    ports = closed_ports(5)
    with LoCapture() as cap:
        with pytest.raises(PunchTimeout):
            engine.sweep([(pa, (fam.b, p)) for p in ports], None, 0.2, local_ip=fam.a,
                         interval=0.05, syn_ttl=3)
        time.sleep(0.02)
        syns = cap.syns(lambda s: s.src == (fam.a, pa))
    for p in ports:
        ttls = [s.ttl for s in syns if s.dst[1] == p]
        assert len(ttls) >= 2 and ttls[0] == 3 and 3 not in ttls[1:], (p, ttls)
