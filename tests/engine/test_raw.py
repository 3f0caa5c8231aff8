"""raw_syn: hand-built SYNs seen on the wire with the requested TTL and valid checksums."""
from __future__ import annotations

import os
import time

import pytest

from pyholepunch import engine as engine_mod
from pyholepunch.engine import Engine

from .helpers import A_IP, B_IP, Family, LoCapture, closed_ports, run_in_processes


@pytest.mark.root
@pytest.mark.parametrize("ttl", [1, 7, 64, 255])
def test_raw_syn_on_the_wire(engine: Engine, fam: Family, ttl: int, no_fd_leak: None) -> None:
    sport, dport = closed_ports(2, low=23000)
    with LoCapture() as cap:
        stats = engine.raw_syn((fam.a, sport), (fam.b, dport), ttl=ttl, count=3, spacing=0.01)
        time.sleep(0.02)
        syns = cap.syns(lambda s: s.src == (fam.a, sport) and s.dst == (fam.b, dport))
    assert stats.sent == 3 and len(stats.send_times) == 3
    assert len(syns) == 3
    for s in syns:
        assert s.ttl == ttl
        assert s.flags == 0x02                      # SYN only
        assert s.ip_ok, s.raw.hex()
        assert s.tcp_ok, s.raw.hex()
    tcp = 40 if fam.name == "v6" else 20
    seqs = {s.raw[tcp + 4:tcp + 8] for s in syns}
    assert len(seqs) == 1                           # one ISN: later SYNs are retransmissions
    if fam.name == "v4":
        assert len({s.raw[4:6] for s in syns}) == 3     # distinct IP ids
    assert stats.send_times == sorted(stats.send_times)
    # The schedule is honoured (0.5 ms slack for where exactly an engine reads the clock).
    assert stats.send_times[2] - stats.send_times[0] >= 0.0195
    assert stats.first_send_delay_ns is not None and stats.first_send_delay_ns >= 0


@pytest.mark.root
def test_raw_syn_waits_for_start_at(engine: Engine, fam: Family) -> None:
    sport, dport = closed_ports(2, low=23100)
    start = time.time() + 0.1
    stats = engine.raw_syn((fam.a, sport), (fam.b, dport), start_at=start)
    # 10 us slack: start_at travels as float seconds <-> int ns.
    assert stats.sent == 1 and stats.send_times[0] >= start - 1e-5


def _raw_syn_unprivileged(name: str) -> tuple[str, str]:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)                 # drops every capability, CAP_NET_RAW included
    try:
        engine_mod.get(name).raw_syn((A_IP, 40000), (B_IP, 40001))
    except Exception as exc:
        return type(exc).__name__, str(exc)
    return "no error", ""


@pytest.mark.root
def test_raw_syn_without_cap_net_raw(engine: Engine) -> None:
    [(kind, msg)] = run_in_processes((_raw_syn_unprivileged, (engine.name,)))
    assert kind == "PermissionError"
    assert "CAP_NET_RAW" in msg


@pytest.mark.root
def test_raw_syn_unspecified_source_uses_the_route(engine: Engine, fam: Family, no_fd_leak: None) -> None:
    """src 0.0.0.0: the route's source address goes into the header and the checksum."""
    sport, dport = closed_ports(2, low=23200)
    with LoCapture() as cap:
        engine.raw_syn((fam.any, sport), (fam.b, dport), ttl=33)
        time.sleep(0.02)
        syns = cap.syns(lambda s: s.src[1] == sport and s.dst == (fam.b, dport))
    assert len(syns) == 1
    assert syns[0].src[0] != fam.any and syns[0].ttl == 33
    assert syns[0].ip_ok and syns[0].tcp_ok
