"""Background hosts behind a lab NAT (lab/background.py): a sequential NAT's next port really
moves at the configured rate, for TCP and for UDP, and the hosts go away with the lab."""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from pyholepunch.cli.demo import run_pair
from pyholepunch.lab import Lab
from pyholepunch.lab.background import host_ip

pytestmark = [pytest.mark.lab, pytest.mark.skipif(os.geteuid() != 0, reason="the NAT lab needs root")]

RATE = 20.0
GAP_S = 2.0


def _tcp_port(lab: Lab, srv: socket.socket) -> int:
    with lab.socket("a") as c:
        c.settimeout(3)
        c.connect((lab.server_ip, 7000))
        conn, (_, port) = srv.accept()
        conn.close()
    return int(port)


def _udp_port(lab: Lab, srv: socket.socket) -> int:
    with lab.socket("a", type=socket.SOCK_DGRAM) as c:
        c.sendto(b"x", (lab.server_ip, 7001))
        _, (_, port) = srv.recvfrom(16)
    return int(port)


def test_sequential_port_advances_at_the_background_rate() -> None:
    with Lab(a="symmetric-seq", b="none", background_rate=RATE) as lab:
        assert lab.describe()["background_rate"] == {"a": RATE}   # b is public: no NAT to load
        addrs = lab.run("a", ["ip", "-4", "-o", "addr", "show", "dev", "eth0"]).stdout
        assert host_ip(lab, "a") in addrs
        with lab.socket("server") as tsrv, lab.socket("server", type=socket.SOCK_DGRAM) as usrv:
            tsrv.bind((lab.server_ip, 7000))
            tsrv.listen(8)
            tsrv.settimeout(3)
            usrv.bind((lab.server_ip, 7001))
            usrv.settimeout(3)
            start = time.monotonic()               # the generator's python start-up
            p0 = _tcp_port(lab, tsrv)
            while _tcp_port(lab, tsrv) - p0 < 3 and time.monotonic() - start < 15:
                time.sleep(0.1)
            t1, p1, u1 = time.monotonic(), _tcp_port(lab, tsrv), _udp_port(lab, usrv)
            time.sleep(GAP_S)
            t2, p2, u2 = time.monotonic(), _tcp_port(lab, tsrv), _udp_port(lab, usrv)
        # Our own second flow takes one port; everything else in between is the background's.
        expected = RATE * (t2 - t1)
        for kind, moved in (("tcp", p2 - p1 - 1), ("udp", u2 - u1 - 1)):
            # Loose bounds: a loaded CI machine delays the generator (it catches up <= 1 s).
            assert 0.5 * expected <= moved <= 1.5 * expected + 2, (kind, moved, expected)
        gens = [p for p in lab._procs if "gen" in (getattr(p, "args", None) or [])]
        assert len(gens) == 1
    assert all(p.poll() is not None for p in gens), "background host outlived the lab"


def test_background_rate_is_validated() -> None:
    with pytest.raises(ValueError, match="background_rate"):
        Lab(a="symmetric-seq", background_rate=-1)
    with pytest.raises(ValueError, match="per peer"):
        Lab(a="symmetric-seq", background_rate={"c": 1.0})


@pytest.mark.parametrize(("a", "b", "rate"), [("symmetric-seq", "symmetric-seq", 10.0),
                                              ("port-restricted", "symmetric-seq", 50.0)])
def test_sequential_pairs_stay_direct_under_background(a: str, b: str, rate: float,
                                                       tmp_path: Path) -> None:
    """The CI slice of bench/bench_hard_pairs.py: 3 runs of the whole CLI flow in one lab whose
    NATs carry `rate` other connections/s (before #19: 0/4 direct for both)."""
    routes = []
    with Lab(a=a, b=b, rtt_ms=40, background_rate=rate) as lab:
        for i in range(3):
            res = run_pair(lab.spawn, lab.server_ip, lab.server_alt_ip, tmp_path / str(i), timeout=20)
            assert res["echo_ok"]
            routes.append((res["report"]["route"], res["report"]["winning_step"]))
    assert sum(r == ("direct", "predict-sweep") for r in routes) >= 2, routes
