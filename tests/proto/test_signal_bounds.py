"""The bounds of issue #11 as plain functions: candidates, profiles, certificates, names,
tokens, start clamps, admission budgets, name bindings with a fake clock. No sockets."""
from __future__ import annotations

import asyncio

import pytest

from pyholepunch.errors import AuthenticationError, QuotaError, RemoteProtocolError
from pyholepunch.identity import Identity
from pyholepunch.security import certificate_for
from pyholepunch.signal.admission import SourceBudget, source_key
from pyholepunch.signal.auth import check_token, make_token
from pyholepunch.signal.fields import MAX_CERT, MAX_PROFILES_BYTES, check_profiles
from pyholepunch.signal.protocol import (
    MAX_CANDIDATES,
    MAX_CANDIDATES_PER_FAMILY,
    MAX_START_AHEAD,
    Connect,
    ErrorCode,
    Register,
    check_candidates,
    clamp_start,
    decode_body,
    encode_frame,
)
from pyholepunch.signal.store import MemoryStore, NameLimits
from pyholepunch.signal.tls import check_peer_cert


@pytest.mark.parametrize("host, why", [
    ("224.0.0.1", "multicast"), ("0.0.0.0", "unspecified"), ("::", "unspecified"),
    ("255.255.255.255", "reserved"), ("240.0.0.1", "reserved"), ("::ffff:10.0.0.1", "IPv4-mapped"),
    ("ff02::1", "multicast"), ("127.0.0.1", "loopback"), ("::1", "loopback")])
def test_unusable_candidates_are_refused(host: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        check_candidates([(host, 4000)], allow_loopback=False)


def test_candidate_counts_families_and_duplicates() -> None:
    assert check_candidates([["127.0.0.1", 1]]) == [["127.0.0.1", 1, "ipv4", "", "stun"]]
    assert check_candidates([["10.0.0.1", 1], ("10.0.0.1", 1)]) == [   # v1 pairs, extended:
        ["10.0.0.1", 1, "ipv4", "", "stun"], ["10.0.0.1", 1, "ipv4", "", "host"]]  # 2 origins
    dup = ["10.0.0.1", 1, "ipv4", "", "host"]
    assert check_candidates([dup, dup, list(dup)]) == [dup]          # exact duplicates dropped
    full = ["2001:db8::1", 7, "ipv6", "eth0", "host"]
    assert check_candidates([full]) == [full]
    v4 = [(f"198.51.100.{i}", 1000) for i in range(MAX_CANDIDATES_PER_FAMILY + 1)]
    with pytest.raises(ValueError, match=f"more than {MAX_CANDIDATES_PER_FAMILY} ipv4"):
        check_candidates(v4)
    mixed = v4[:-1] + [(f"2001:db8::{i}", 1000) for i in range(MAX_CANDIDATES_PER_FAMILY)]
    assert len(check_candidates(mixed)) == MAX_CANDIDATES
    with pytest.raises(ValueError, match=f"at most {MAX_CANDIDATES}"):
        check_candidates(mixed + [("203.0.113.1", 1)])
    for bad in (["10.0.0.1", 0], ["10.0.0.1", 65536], ["10.0.0.1", True], ["host.example", 1],
                ["1" * 100, 1], "10.0.0.1:1", ["10.0.0.1", 1, "ipv6", "", "host"],
                ["10.0.0.1", 1, "ipv4", "x" * 40, "host"], ["10.0.0.1", 1, "ipv4", "", "guess"]):
        with pytest.raises(ValueError):
            check_candidates([bad])


def test_profiles_and_certificates_are_bounded_on_the_wire() -> None:
    with pytest.raises(ValueError, match="exceed"):
        check_profiles([{"transport": "tcp", "pad": "x" * MAX_PROFILES_BYTES}])
    with pytest.raises(ValueError, match="at most 32 keys"):
        check_profiles([{str(i): i for i in range(33)}])
    ident = Identity.generate()
    reg = Register(name="alice", public_key=ident.public_key, challenge=b"c" * 32,
                   signature=b"s" * 64, cert=b"x" * (MAX_CERT + 1))
    with pytest.raises(RemoteProtocolError, match="register.cert") as info:
        decode_body(encode_frame(reg, 1 << 20)[4:])
    assert info.value.code == ErrorCode.MALFORMED


def test_a_certificate_must_hold_the_registering_key() -> None:
    ident = Identity.generate()
    check_peer_cert(certificate_for(ident), ident.public_key)
    with pytest.raises(AuthenticationError, match="not the registering key"):
        check_peer_cert(certificate_for(Identity.generate()), ident.public_key)
    with pytest.raises(AuthenticationError, match="not DER"):
        check_peer_cert(b"bob-cert-der", ident.public_key)


@pytest.mark.parametrize("name", ["bob\n", "bob\n\n", " bob", "bob ", "b" * 65, "-bob", ""])
def test_names_match_whole(name: str) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_body(encode_frame(Connect(session="sess-0001", target=name))[4:])


def test_tokens_are_parsed_strictly() -> None:
    good = make_token("s3cret", 2e9)
    assert check_token("s3cret", good, 1e9) is None
    assert check_token("s3cret", good, 3e9) == ErrorCode.TOKEN_EXPIRED
    for token in ("hp1.\u00b2.x", "hp1." + "9" * 5000 + "." + "0" * 32, "hp1.\u0661.ab",
                  good + "\n", good.upper(), "hp1..", "hp1.1.2.3"):
        assert check_token("s3cret", token, 1e9) == ErrorCode.TOKEN_INVALID


def test_start_is_clamped() -> None:
    assert clamp_start(1e12, 100.0) == 100.0 + MAX_START_AHEAD
    assert clamp_start(100.5, 100.0) == 100.5
    assert clamp_start(90.0, 100.0) == 90.0


def test_source_budgets() -> None:
    budget = SourceBudget(total=5, per_source=2)
    assert budget.acquire("a") and budget.acquire("a") and not budget.acquire("a")
    assert budget.acquire("b") and budget.acquire("b") and budget.acquire("c")
    assert not budget.acquire("d")                       # the total is spent
    budget.release("a")
    assert budget.acquire("d") and budget.held() == 5 and budget.held("a") == 1
    budget.release("zzz")                                # unknown: ignored
    assert source_key("2001:db8:1:2:3:4:5:6") == source_key("2001:db8:1:2::9") == "2001:db8:1:2::/64"
    assert source_key("::ffff:192.0.2.1") == "192.0.2.1"


def test_name_bindings_expire_and_are_capped_per_key_and_source() -> None:
    now = [1000.0]
    store = MemoryStore(names=NameLimits(ttl=100, per_key=2, per_source=3, exempt_loopback=False),
                        clock=lambda: now[0])
    a, b, c = (Identity.generate().public_key for _ in range(3))

    async def run() -> None:
        assert await store.bind_name("n1", a, "198.51.100.1") is None
        assert await store.bind_name("n2", a, "198.51.100.1") is None
        with pytest.raises(QuotaError, match="this key"):
            await store.bind_name("n3", a, "198.51.100.2")
        assert await store.bind_name("n3", b, "198.51.100.1") is None
        with pytest.raises(QuotaError, match="198.51.100.1"):
            await store.bind_name("n4", c, "198.51.100.1")
        assert await store.bind_name("n1", b, "198.51.100.9") == a      # taken
        now[0] += 60
        assert await store.bind_name("n1", a, "198.51.100.1") is None   # refreshed by its key
        now[0] += 60                                                      # n2, n3 expired
        assert await store.key_of("n2") is None and await store.key_of("n1") == a
        assert await store.bind_name("n2", c, "198.51.100.1") is None    # free again, counts freed
        assert await store.bind_name("n5", c, "198.51.100.1") is None

    asyncio.run(run())
