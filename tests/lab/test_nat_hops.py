"""nat/hops.py in the lab: the NAT routers in front of a peer, counted by their ICMP answers
(the low-TTL step sends TTL hops + 1: 2 behind one NAT, 3 behind a home NAT in a CGNAT)."""
from __future__ import annotations

import os

import pytest

from pyholepunch.lab import Lab
from pyholepunch.nat.hops import inside, nat_hops

pytestmark = [pytest.mark.lab, pytest.mark.skipif(os.geteuid() != 0, reason="the NAT lab needs root")]


@pytest.mark.parametrize(("kind", "hops"), [("port-restricted", 1), ("cgnat", 2), ("none", None)])
def test_hops_to_the_outside(kind: str, hops: int | None) -> None:
    with Lab(a=kind, b="none") as lab:
        assert lab.call("a", nat_hops, lab.server_ip) == hops


def test_inside_addresses() -> None:
    assert inside("10.0.1.1") and inside("100.64.1.1") and inside("192.168.1.1")
    assert not inside("198.51.100.1") and not inside("203.0.113.10")
