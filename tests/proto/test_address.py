"""The one address parser: every form it takes, every mistake it names."""
from __future__ import annotations

import socket

import pytest

from pyholepunch.address import format_address, parse_address, route_source, unusable_peer_ip
from pyholepunch.errors import AddressError


@pytest.mark.parametrize("text, default, expected", [
    ("203.0.113.10:3478", None, ("203.0.113.10", 3478)),
    ("[2001:db8::10]:3478", None, ("2001:db8::10", 3478)),
    ("[fe80::1%eth0]:9", None, ("fe80::1%eth0", 9)),
    ("rendezvous.example:443", None, ("rendezvous.example", 443)),
    ("rendezvous.example", 3478, ("rendezvous.example", 3478)),
    ("[::1]", 3478, ("::1", 3478)),
    (" 127.0.0.1:1 ", None, ("127.0.0.1", 1)),
    (("198.51.100.7", 40001), None, ("198.51.100.7", 40001)),
])
def test_accepted_forms(text: str, default: int | None, expected: tuple[str, int]) -> None:
    assert parse_address(text, default_port=default) == expected
    assert parse_address(format_address(expected)) == expected


@pytest.mark.parametrize("text, words", [
    ("2001:db8::1:3478", "needs brackets, e.g. [2001:db8::1]:3478"),
    ("[fe80::1]:9", "needs a scope id"),
    ("127.0.0.1:99999", "bad port"),
    ("127.0.0.1:0", "bad port 0"),
    ("127.0.0.1:-1", "bad port"),
    ("127.0.0.1", "no port"),
    (":80", "no host"),
    ("[::1", "missing ']'"),
    ("[::1]80", "expected ':PORT'"),
    ("[127.0.0.1]:80", "brackets are for IPv6"),
    ("bad host:80", "neither an IP address nor a host name"),
    (("127.0.0.1", "80"), "(str host, int port)"),
    (("127.0.0.1", 80, 1), "(host, port)"),
])
def test_mistakes_are_named(text: object, words: str) -> None:
    with pytest.raises(AddressError, match=None) as info:
        parse_address(text)  # type: ignore[arg-type]
    assert words in str(info.value)
    assert isinstance(info.value, ValueError)


def test_port_zero_when_allowed() -> None:
    assert parse_address("0.0.0.0:0", allow_zero=True) == ("0.0.0.0", 0)


@pytest.mark.parametrize("ip, why", [
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("0.0.0.0", "unspecified"), ("::", "unspecified"),
    ("224.0.0.1", "multicast"), ("ff02::1", "multicast"), ("255.255.255.255", "reserved"),
    ("240.0.0.1", "reserved"), ("::ffff:198.51.100.1", "IPv4-mapped IPv6"), ("host", "not an IP address"),
    ("198.51.100.7", None), ("10.0.1.2", None), ("2001:db8::7", None), ("fd00::7", None),
])
def test_unusable_peer_ip(ip: str, why: str | None) -> None:
    assert unusable_peer_ip(ip) == why


@pytest.mark.parametrize("dest", ["127.0.0.1", "127.0.0.2", "::1"])
def test_route_source_is_of_the_destination_family(dest: str) -> None:
    """The one route-source helper (the engine's raw_syn and the NAT probe share it)."""
    if ":" in dest and not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    assert route_source(dest) == ("::1" if ":" in dest else "127.0.0.1")
