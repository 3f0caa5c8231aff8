"""The punch offer: one side's half of a ``pyholepunch.Punch`` session, as bytes the app
carries over its own channel (docs/backend.md).

Wire form: a msgpack map ``{"v": OFFER_VERSION, "o": body, "s": signature}`` where ``body``
is itself msgpack bytes and ``signature`` the sender's Ed25519 signature over
``SIGN_CONTEXT + body``. The body holds the sender's peer id, public key and TLS certificate
(the key the other side pins), its name, creation time and proposed start (the sender's wall
clock), a nonce, its round trip to the STUN server, its NAT profiles per family, its
candidates, the step kinds it allows (or none = all) and a TURN relayed address when it
brought one.

``parse_offer`` refuses, each with an ``OfferError`` (a ValueError) naming the field, or
``AuthenticationError``: another version, truncated or garbled bytes, missing or
out-of-bounds fields, a candidate a remote peer cannot have (signal.protocol's one candidate
check: loopback, unspecified, multicast, reserved), a signature that does not verify, a
public key that is not the peer id's, a certificate whose key is not the peer id's (a
substituted certificate), and — ``StaleOffer`` — an offer created more than ``max_age``
seconds ago or dated ahead of our clock by more than ``max_ahead``. Sans-IO: time is an
argument.
"""
from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack  # type: ignore[import-untyped]

from .address import Address
from .errors import AuthenticationError, OfferError, StaleOffer
from .identity import Identity, peer_id_of, verify_signature
from .nat.profile import NatProfile
from .security import check_certificate
from .signal import fields
from .signal.client import PeerInfo
from .signal.protocol import NAME_RE, PEER_ID_RE, check_candidates
from .strategy import Candidate, StepKind, parse_candidates

OFFER_VERSION = 1
SIGN_CONTEXT = b"pyholepunch/offer/v1\x00"
MAX_OFFER = 16 * 1024          # bytes: profiles + candidates + a certificate fit in far less
MAX_AGE = 300.0                # s: an older offer is refused as stale (a replay)
MAX_AHEAD = 30.0               # s: an offer dated further ahead of our clock is refused
MAX_START_AFTER_CREATED = 60.0  # s: how far after its creation an offer may propose to start
NONCE_LEN = 16

_REQUIRED = {"peer_id", "name", "public_key", "cert", "created", "start", "nonce", "rtt",
             "profiles", "candidates"}
_OPTIONAL = {"strategies", "relayed"}


@dataclass(frozen=True)
class Offer:
    """A parsed, verified offer (see the module docstring)."""

    peer_id: str
    name: str
    public_key: bytes
    cert: bytes
    created: float
    start: float
    nonce: bytes
    rtt: float
    profiles: tuple[dict[str, Any], ...]
    candidates: tuple[Candidate, ...]
    strategies: tuple[str, ...] | None = None
    relayed: Address | None = None

    def peer_info(self) -> PeerInfo:
        """The sender as the punch path knows a peer (what a PUNCH says about it)."""
        return PeerInfo(self.peer_id, self.name, self.public_key, self.cert, self.candidates,
                        self.profiles)

    @property
    def nat_profiles(self) -> list[NatProfile]:
        return [NatProfile.from_dict(p) for p in self.profiles]


def encode_offer(identity: Identity, cert: bytes, *, name: str, created: float, start: float,
                 rtt: float, profiles: Sequence[NatProfile], candidates: Sequence[Candidate],
                 strategies: Sequence[str] | None = None, relayed: Address | None = None,
                 nonce: bytes | None = None) -> bytes:
    """The signed offer bytes (``cert`` is ``identity``'s certificate)."""
    body: dict[str, Any] = {
        "peer_id": identity.peer_id, "name": name, "public_key": identity.public_key,
        "cert": cert, "created": float(created), "start": float(start),
        "nonce": nonce or secrets.token_bytes(NONCE_LEN), "rtt": float(rtt),
        "profiles": [p.to_dict() for p in profiles],
        "candidates": [c.to_wire() for c in candidates]}
    if strategies is not None:
        body["strategies"] = list(strategies)
    if relayed is not None:
        body["relayed"] = [relayed[0], relayed[1]]
    raw = msgpack.packb(body, use_bin_type=True)
    data: bytes = msgpack.packb({"v": OFFER_VERSION, "o": raw,
                                 "s": identity.sign(SIGN_CONTEXT + raw)}, use_bin_type=True)
    if len(data) > MAX_OFFER:
        raise OfferError(f"our offer is {len(data)} bytes, more than {MAX_OFFER}", field="size")
    return data


def parse_offer(data: bytes, *, now: float, max_age: float = MAX_AGE,
                max_ahead: float = MAX_AHEAD, allow_loopback: bool = False) -> Offer:
    """The verified offer in ``data`` (see the module docstring for what is refused).

    ``now``: our wall clock; ``allow_loopback``: accept loopback candidates (both peers on
    one host: a STUN server on loopback)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise OfferError(f"an offer is bytes, got {type(data).__name__}", field="offer")
    if len(data) > MAX_OFFER:
        raise OfferError(f"offer of {len(data)} bytes: at most {MAX_OFFER}", field="size")
    outer = _unpack(bytes(data), "offer")
    if not isinstance(outer, dict) or "v" not in outer:
        raise OfferError("not a pyholepunch offer (no version)", field="version")
    if outer["v"] != OFFER_VERSION:
        raise OfferError(f"offer version {outer['v']!r:.20}: this pyholepunch reads version "
                         f"{OFFER_VERSION}", field="version")
    raw, signature = outer.get("o"), outer.get("s")
    if not isinstance(raw, bytes) or not isinstance(signature, bytes) or set(outer) != {"v", "o", "s"}:
        raise OfferError("an offer is {v, o: body, s: signature}", field="offer")
    body = _unpack(raw, "body")
    if not isinstance(body, dict):
        raise OfferError("the offer body is not a map", field="body")
    missing, unknown = _REQUIRED - set(body), set(body) - _REQUIRED - _OPTIONAL
    if missing or unknown:
        what = f"missing {', '.join(sorted(missing))}" if missing else \
            f"unknown {', '.join(sorted(map(str, unknown)))}"
        raise OfferError(f"offer body: {what}", field=sorted(missing or unknown)[0])
    offer = _fields(body, allow_loopback)
    # Who signed it, and is the certificate theirs: the key the TLS handshake will pin.
    if peer_id_of(offer.public_key) != offer.peer_id:
        raise AuthenticationError(f"offer of peer {offer.peer_id} carries another peer's key")
    try:
        verify_signature(offer.public_key, signature, SIGN_CONTEXT + raw)
    except AuthenticationError:
        raise AuthenticationError(f"offer of peer {offer.peer_id}: signature does not verify "
                                  "(altered or substituted)") from None
    check_certificate(offer.cert, offer.peer_id)     # a substituted certificate
    age = now - offer.created
    if age > max_age:
        raise StaleOffer(f"offer of peer {offer.peer_id} was created {age:.0f} s ago (at most "
                         f"{max_age:.0f} s): stale or replayed", field="created")
    if -age > max_ahead:
        raise StaleOffer(f"offer of peer {offer.peer_id} is dated {-age:.0f} s ahead of our "
                         f"clock (at most {max_ahead:.0f} s): are both clocks set?",
                         field="created")
    if not 0 <= offer.start - offer.created <= MAX_START_AFTER_CREATED:
        raise OfferError(f"offer proposes to start {offer.start - offer.created:.1f} s after "
                         f"its creation (0..{MAX_START_AFTER_CREATED:.0f})", field="start")
    return offer


def _unpack(raw: bytes, what: str) -> Any:
    try:
        return msgpack.unpackb(raw, raw=False, strict_map_key=True, max_bin_len=MAX_OFFER,
                               max_str_len=MAX_OFFER, max_array_len=256, max_map_len=64)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise OfferError(f"{what}: truncated or not msgpack ({type(exc).__name__})",
                         field=what) from None


def _fields(body: dict[str, Any], allow_loopback: bool) -> Offer:
    field = "body"
    try:
        field = "peer_id"
        peer_id = fields.check_pattern(PEER_ID_RE, "peer_id")(body["peer_id"])
        field = "name"
        name = fields.check_pattern(NAME_RE, "name")(body["name"])
        field = "public_key"
        public_key = fields.check_key32(body["public_key"])
        field = "cert"
        cert = fields.check_cert(body["cert"])
        field = "created"
        created = fields.check_float(body["created"])
        field = "start"
        start = fields.check_float(body["start"])
        field = "nonce"
        nonce = body["nonce"]
        if not isinstance(nonce, bytes) or len(nonce) != NONCE_LEN:
            raise ValueError(f"expected {NONCE_LEN} bytes")
        field = "rtt"
        rtt = fields.check_float(body["rtt"])
        if not 0 <= rtt <= 10:
            raise ValueError(f"{rtt} s is not a round trip")
        field = "profiles"
        profiles = tuple(fields.check_profiles(body["profiles"]))
        for p in profiles:
            NatProfile.from_dict(p)
        field = "candidates"
        candidates = tuple(parse_candidates(
            check_candidates(body["candidates"], allow_loopback=allow_loopback)))
        if not candidates:
            raise ValueError("no candidate")
        field = "strategies"
        strategies = body.get("strategies")
        if strategies is not None:
            if not isinstance(strategies, list) or not all(s in StepKind._value2member_map_
                                                           for s in strategies):
                raise ValueError(f"unknown step kinds in {strategies!r:.80}")
            strategies = tuple(strategies)
        field = "relayed"
        relayed = body.get("relayed")
        if relayed is not None:
            relayed = fields.check_relayed(relayed)
    except ValueError as exc:
        raise OfferError(f"offer {field}: {exc}", field=field) from None
    return Offer(peer_id, name, public_key, cert, created, start, nonce, rtt, profiles,
                 candidates, strategies, relayed)
