"""classify_nat end to end on loopback (no NAT), and the degraded cases: no alternate
address, unreachable server, UDP blocked, a second plain server."""
from __future__ import annotations

import json
import socket
import time

import pytest

from pyholepunch.nat.classify import classify_both, classify_nat
from pyholepunch.nat.profile import Allocation, Filtering, Mapping, NatProfile, SynResponse
from pyholepunch.stun.server import StunServer

ALT = "127.0.0.2"


@pytest.mark.asyncio
@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_no_nat_is_open(transport: str) -> None:
    async with StunServer(("127.0.0.1", 0), ALT) as srv:
        start = time.monotonic()
        p = await classify_nat(srv.primary, transport=transport, local_ip="127.0.0.1")
        assert time.monotonic() - start < 2.0
    assert p.nat_type == "open" and p.mapping is Mapping.NONE
    assert p.filtering is Filtering.NONE and p.allocation is Allocation.PRESERVING
    assert p.public_ips == ("127.0.0.1",) and p.local_ips == ("127.0.0.1",)
    assert p.not_learned == ()
    assert p.confidence["mapping"] == 1.0 and p.confidence["filtering"] == 1.0
    assert p.server == f"{transport}://127.0.0.1:{srv.primary[1]}"
    if transport == "tcp":
        assert p.unsolicited_syn is SynResponse.ACCEPT
    assert NatProfile.from_dict(json.loads(json.dumps(p.to_dict()))) == p


@pytest.mark.asyncio
async def test_both_transports_helper() -> None:
    async with StunServer(("127.0.0.1", 0), ALT) as srv:
        both = await classify_both(srv.primary, local_ip="127.0.0.1")
    assert set(both) == {"udp", "tcp"} and all(p.nat_type == "open" for p in both.values())


@pytest.mark.asyncio
@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_server_without_alternate_address_says_what_it_could_not_learn(transport: str) -> None:
    async with StunServer(("127.0.0.1", 0)) as srv:
        p = await classify_nat(srv.primary, transport=transport, local_ip="127.0.0.1")
    # no NAT is still recognisable (mapped == local), filtering is not
    assert p.mapping is Mapping.NONE and p.filtering is Filtering.UNKNOWN
    assert any(n.startswith("filtering: the server cannot answer from another address")
               for n in p.not_learned)


@pytest.mark.asyncio
async def test_unreachable_udp_server() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as hole:
        hole.bind(("127.0.0.1", 0))          # nothing answers here: like UDP being blocked
        start = time.monotonic()
        p = await classify_nat(hole.getsockname(), transport="udp", timeout=0.5)
        assert time.monotonic() - start < 1.5
    assert p.nat_type == "unknown" and p.mapping is Mapping.UNKNOWN
    assert len(p.not_learned) == 1
    assert "no UDP answer from 127.0.0.1" in p.not_learned[0] and "UDP blocked" in p.not_learned[0]


@pytest.mark.asyncio
async def test_unreachable_tcp_server() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        addr = closed.getsockname()
    p = await classify_nat(addr, transport="tcp", timeout=0.5)
    assert p.nat_type == "unknown"
    assert p.not_learned == (f"everything: cannot reach 127.0.0.1:{addr[1]} over TCP: connection refused",)


@pytest.mark.asyncio
async def test_udp_blocked_but_tcp_works() -> None:
    """A TCP-only server: UDP says exactly why it failed, TCP still classifies."""
    srv = StunServer(("127.0.0.1", 0), ALT)
    await srv.start_tcp()
    try:
        udp = await classify_nat(srv.primary, transport="udp", timeout=0.4, local_ip="127.0.0.1")
        tcp = await classify_nat(srv.primary, transport="tcp", local_ip="127.0.0.1")
    finally:
        await srv.close()
    assert udp.nat_type == "unknown" and "no UDP answer" in udp.not_learned[0]
    assert tcp.nat_type == "open"


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.asyncio
@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback here")
@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_ipv6(transport: str) -> None:
    async with StunServer(("::1", 0)) as srv:
        p = await classify_nat(srv.primary, transport=transport)
    assert p.nat_type == "open" and p.public_ips == ("::1",)
    assert p.server == f"{transport}://[::1]:{srv.primary[1]}"
