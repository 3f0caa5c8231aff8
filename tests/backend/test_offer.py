"""The punch offer codec (pyholepunch/offer.py): what a good offer carries, and every kind of
bad one refused with a clear error. Plain functions on bytes: time is an argument."""
from __future__ import annotations

from typing import Any

import msgpack  # type: ignore[import-untyped]
import pytest

from pyholepunch import AuthenticationError, Identity, OfferError, StaleOffer
from pyholepunch.nat.profile import Allocation, Filtering, Mapping, NatProfile
from pyholepunch.offer import MAX_AGE, SIGN_CONTEXT, SIGN_CONTEXTS, encode_offer, parse_offer
from pyholepunch.security import certificate_for
from pyholepunch.strategy import Candidate

NOW = 1_800_000_000.0
ME = Identity.generate()
PROFILE = NatProfile(mapping=Mapping.ENDPOINT_INDEPENDENT,
                     filtering=Filtering.ADDRESS_AND_PORT_DEPENDENT,
                     allocation=Allocation.PRESERVING, public_ips=("203.0.113.7",))
CANDIDATES = [Candidate("203.0.113.7", 40000, "stun"), Candidate("10.0.1.2", 40000, "host")]


def _offer(identity: Identity = ME, *, created: float = NOW, **kw: Any) -> bytes:
    fields: dict[str, Any] = dict(name="alice", created=created, start=created + 1.0, rtt=0.04,
                                  profiles=[PROFILE], candidates=CANDIDATES)
    fields.update(kw)
    return encode_offer(identity, certificate_for(identity), **fields)


def _resign(data: bytes, change: Any, identity: Identity | None = ME) -> bytes:
    """``data`` with its body changed by ``change(body)``; signed again by ``identity``, or
    keeping the old signature (None)."""
    outer = msgpack.unpackb(data, raw=False)
    body = msgpack.unpackb(outer["o"], raw=False)
    change(body)
    outer["o"] = msgpack.packb(body, use_bin_type=True)
    if identity is not None:
        outer["s"] = identity.sign(SIGN_CONTEXTS[outer["v"]] + outer["o"])
    return bytes(msgpack.packb(outer, use_bin_type=True))


def test_an_offer_round_trips_with_everything_the_session_needs() -> None:
    data = _offer(strategies=["birthday", "relay"], relayed=("198.51.100.9", 50000))
    offer = parse_offer(data, now=NOW + 2)
    assert offer.peer_id == ME.peer_id and offer.public_key == ME.public_key
    assert offer.cert == certificate_for(ME) and offer.name == "alice"
    assert (offer.created, offer.start, offer.rtt) == (NOW, NOW + 1.0, 0.04)
    assert offer.nat_profiles[0].nat_type == "port-restricted"
    assert list(offer.candidates) == CANDIDATES
    assert offer.strategies == ("birthday", "relay") and offer.relayed == ("198.51.100.9", 50000)
    info = offer.peer_info()
    assert info.peer_id == ME.peer_id and info.cert == offer.cert and info.tcp_profile == PROFILE
    assert len(data) < 2048


def test_another_version_is_refused_by_name() -> None:
    outer = msgpack.unpackb(_offer(), raw=False)
    outer["v"] = 3
    with pytest.raises(OfferError, match="offer version 3: this pyholepunch reads versions 1 "
                                         "and 2") as e:
        parse_offer(msgpack.packb(outer, use_bin_type=True), now=NOW)
    assert e.value.field == "version"
    # Each version signs under its own context: a body cannot be passed off as the other's.
    outer["v"] = 2
    with pytest.raises(AuthenticationError, match="signature does not verify"):
        parse_offer(msgpack.packb(outer, use_bin_type=True), now=NOW)
    with pytest.raises(OfferError, match="no version"):
        parse_offer(msgpack.packb({"o": b"", "s": b""}), now=NOW)


@pytest.mark.parametrize("cut", [1, 10, 100, 600])
def test_a_truncated_offer_is_refused(cut: int) -> None:
    data = _offer()
    with pytest.raises(OfferError, match="truncated or not msgpack"):
        parse_offer(data[:-cut], now=NOW)


def test_garbage_and_wrong_types_are_refused() -> None:
    for bad in (b"", b"hello", b"\x00" * 64):
        with pytest.raises(OfferError):
            parse_offer(bad, now=NOW)
    with pytest.raises(OfferError, match="an offer is bytes"):
        parse_offer("text", now=NOW)  # type: ignore[arg-type]
    with pytest.raises(OfferError, match="offer rtt"):
        parse_offer(_resign(_offer(), lambda b: b.update(rtt="fast")), now=NOW)
    with pytest.raises(OfferError, match="unknown extra") as e:
        parse_offer(_resign(_offer(), lambda b: b.update(extra=1)), now=NOW)
    assert e.value.field == "extra"


def test_a_substituted_certificate_is_refused() -> None:
    mallory = Identity.generate()
    # The certificate swapped, the signature kept: the signature no longer verifies.
    swapped = _resign(_offer(), lambda b: b.update(cert=certificate_for(mallory)), identity=None)
    with pytest.raises(AuthenticationError, match="signature does not verify"):
        parse_offer(swapped, now=NOW)
    # Signed again by the sender itself, but with another key's certificate inside.
    resigned = _resign(_offer(), lambda b: b.update(cert=certificate_for(mallory)))
    with pytest.raises(AuthenticationError, match="substituted certificate"):
        parse_offer(resigned, now=NOW)
    # Another key and certificate claiming our peer id.
    claimed = _resign(_offer(mallory), lambda b: b.update(peer_id=ME.peer_id), identity=mallory)
    with pytest.raises(AuthenticationError, match="another peer's key"):
        parse_offer(claimed, now=NOW)


@pytest.mark.parametrize("ip,why", [("127.0.0.1", "loopback"), ("0.0.0.0", "unspecified"),
                                    ("224.0.0.1", "multicast"), ("255.255.255.255", "reserved"),
                                    ("::1", "loopback"), ("::ffff:a00:1", "IPv4-mapped")])
def test_candidates_in_forbidden_ranges_are_refused(ip: str, why: str) -> None:
    data = _offer(candidates=[Candidate(ip, 40000, "stun")])
    with pytest.raises(OfferError, match=f"candidate {ip} is {why}") as e:
        parse_offer(data, now=NOW)
    assert e.value.field == "candidates"


def test_loopback_candidates_only_when_everything_is_on_this_host() -> None:
    data = _offer(candidates=[Candidate("127.0.0.1", 40000, "stun")])
    assert parse_offer(data, now=NOW, allow_loopback=True).candidates[0].ip == "127.0.0.1"


def test_an_offer_replayed_an_hour_later_is_stale() -> None:
    data = _offer()
    parse_offer(data, now=NOW + MAX_AGE - 1)
    with pytest.raises(StaleOffer, match="created 3600 s ago .*stale or replayed") as e:
        parse_offer(data, now=NOW + 3600)
    assert e.value.field == "created"
    with pytest.raises(StaleOffer, match="ahead of our clock"):
        parse_offer(data, now=NOW - 3600)


def test_a_start_far_from_the_creation_is_refused() -> None:
    with pytest.raises(OfferError, match="proposes to start"):
        parse_offer(_offer(start=NOW + 3600), now=NOW)


# -- version 2: the answer (offer_clock.py) and the built-in relay (relay/minted.py) ----------

THEIRS = bytes(range(16))


def _answer(**kw: Any) -> bytes:
    return _offer(created=NOW + 0.2, reply_to=(THEIRS, NOW + 0.1), **kw)


def test_a_plain_offer_stays_version_1_and_an_answer_is_version_2() -> None:
    assert msgpack.unpackb(_offer(), raw=False)["v"] == 1      # old readers still read it
    data = _answer(hub=("198.51.100.1:3478", b"k" * 8))
    assert msgpack.unpackb(data, raw=False)["v"] == 2
    offer = parse_offer(data, now=NOW + 1)
    assert (offer.reply_to, offer.received) == (THEIRS, NOW + 0.1)
    assert offer.hub == ("198.51.100.1:3478", b"k" * 8)
    plain = parse_offer(_offer(), now=NOW)
    assert plain.reply_to is None and plain.received is None and plain.hub is None


def test_the_echo_is_signed() -> None:
    forged = _resign(_answer(), lambda b: b.update(reply_to=bytes(16)), identity=None)
    with pytest.raises(AuthenticationError, match="signature does not verify"):
        parse_offer(forged, now=NOW + 1)
    moved = _resign(_answer(), lambda b: b.update(received=NOW - 5), identity=None)
    with pytest.raises(AuthenticationError, match="signature does not verify"):
        parse_offer(moved, now=NOW + 1)


def test_version_2_fields_under_version_1_are_refused() -> None:
    def relabel(data: bytes) -> bytes:
        outer = msgpack.unpackb(data, raw=False)
        outer["v"] = 1
        outer["s"] = ME.sign(SIGN_CONTEXT + outer["o"])
        return bytes(msgpack.packb(outer, use_bin_type=True))
    with pytest.raises(OfferError, match="unknown received, reply_to"):
        parse_offer(relabel(_answer()), now=NOW + 1)


@pytest.mark.parametrize("change,field,match", [
    (lambda b: b.pop("received"), "reply_to", "reply_to and received together"),
    (lambda b: b.update(reply_to=b"short"), "reply_to", "expected 16 bytes"),
    (lambda b: b.update(received="soon"), "received", "finite number"),
    (lambda b: b.update(received=NOW + 0.5), "received", "after it received"),   # > created
    (lambda b: b.update(received=NOW - 120), "received", "after it received"),
    (lambda b: b.update(hub={"at": "h:1"}), "hub", "at: HOST:PORT, kid"),
    (lambda b: b.update(hub={"at": "x" * 301, "kid": b"k" * 8}), "hub", "at most 300"),
    (lambda b: b.update(hub={"at": "h:1", "kid": b"k"}), "hub", "kid is 8 bytes"),
])
def test_bad_answer_and_relay_fields_are_refused(change: Any, field: str, match: str) -> None:
    data = _resign(_answer(hub=("198.51.100.1:3478", b"k" * 8)), change)
    with pytest.raises(OfferError, match=match) as e:
        parse_offer(data, now=NOW + 1)
    assert e.value.field == field
