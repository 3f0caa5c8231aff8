"""The punch offer: one side's half of a ``pyholepunch.Punch`` session, as bytes the app
carries over its own channel (docs/backend.md).

Wire form: a msgpack map ``{"v": OFFER_VERSION, "o": body, "s": signature}`` where ``body``
is itself msgpack bytes and ``signature`` the sender's Ed25519 signature over
``SIGN_CONTEXT + body``. The body holds the sender's peer id, public key and TLS certificate
(the key the other side pins), its name, creation time and proposed start (the sender's wall
clock), a nonce, its round trip to the STUN server, its NAT profiles per family, its
candidates, the step kinds it allows (or none = all) and a TURN relayed address when it
brought one.

Version 2 (written only when one of its fields is used, so a plain offer stays readable by
version-1 readers, which refuse a version-2 one by its version) adds, all signed:
``reply_to`` + ``received`` — the offer is an *answer*: the nonce of the offer it answers and
when (the answerer's clock) the app handed that offer over, the NTP timestamps t1..t4 of
offer_clock.py; ``hub`` — the sender can mint tokens for a built-in relay: where it joins it
("HOST:PORT") and the id of its secret (relay/minted.py ``key_id``). Each version signs under
its own context, so a body cannot be passed off as the other version's.

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
from .relay.minted import KID_LEN
from .security import check_certificate
from .signal import fields
from .signal.client import PeerInfo
from .signal.protocol import NAME_RE, PEER_ID_RE, check_candidates
from .strategy import Candidate, StepKind, parse_candidates

OFFER_VERSION = 2
VERSIONS = (1, 2)
SIGN_CONTEXTS = {1: b"pyholepunch/offer/v1\x00", 2: b"pyholepunch/offer/v2\x00"}
SIGN_CONTEXT = SIGN_CONTEXTS[1]
MAX_OFFER = 16 * 1024          # bytes: profiles + candidates + a certificate fit in far less
MAX_AGE = 300.0                # s: an older offer is refused as stale (a replay)
MAX_AHEAD = 30.0               # s: an offer dated further ahead of our clock is refused
MAX_START_AFTER_CREATED = 60.0  # s: how far after its creation an offer may propose to start
NONCE_LEN = 16

_REQUIRED = {"peer_id", "name", "public_key", "cert", "created", "start", "nonce", "rtt",
             "profiles", "candidates"}
_OPTIONAL = {1: {"strategies", "relayed"},
             2: {"strategies", "relayed", "reply_to", "received", "hub"}}
MAX_HUB = 300           # characters of a relay's "HOST:PORT"


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
    reply_to: bytes | None = None       # an answer: the nonce of the offer it answers ...
    received: float | None = None       # ... and when the answerer got it (its clock)
    hub: tuple[str, bytes] | None = None   # a built-in relay it can mint for: (at, key id)

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
                 nonce: bytes | None = None, reply_to: tuple[bytes, float] | None = None,
                 hub: tuple[str, bytes] | None = None) -> bytes:
    """The signed offer bytes (``cert`` is ``identity``'s certificate). ``reply_to``: (nonce
    of the offer answered, when it was received); ``hub``: (relay "HOST:PORT", key id)."""
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
    if reply_to is not None:
        body["reply_to"], body["received"] = reply_to[0], float(reply_to[1])
    if hub is not None:
        body["hub"] = {"at": hub[0], "kid": hub[1]}
    version = 2 if reply_to is not None or hub is not None else 1
    raw = msgpack.packb(body, use_bin_type=True)
    data: bytes = msgpack.packb({"v": version, "o": raw,
                                 "s": identity.sign(SIGN_CONTEXTS[version] + raw)},
                                use_bin_type=True)
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
    version = outer["v"]
    if not isinstance(version, int) or isinstance(version, bool) or version not in VERSIONS:
        raise OfferError(f"offer version {version!r:.20}: this pyholepunch reads versions "
                         f"{' and '.join(map(str, VERSIONS))}", field="version")
    raw, signature = outer.get("o"), outer.get("s")
    if not isinstance(raw, bytes) or not isinstance(signature, bytes) or set(outer) != {"v", "o", "s"}:
        raise OfferError("an offer is {v, o: body, s: signature}", field="offer")
    body = _unpack(raw, "body")
    if not isinstance(body, dict):
        raise OfferError("the offer body is not a map", field="body")
    missing, unknown = _REQUIRED - set(body), set(body) - _REQUIRED - _OPTIONAL[version]
    if missing or unknown:
        what = f"missing {', '.join(sorted(missing))}" if missing else \
            f"unknown {', '.join(sorted(map(str, unknown)))}"
        raise OfferError(f"offer body: {what}", field=sorted(missing or unknown)[0])
    offer = _fields(body, allow_loopback)
    # Who signed it, and is the certificate theirs: the key the TLS handshake will pin.
    if peer_id_of(offer.public_key) != offer.peer_id:
        raise AuthenticationError(f"offer of peer {offer.peer_id} carries another peer's key")
    try:
        verify_signature(offer.public_key, signature, SIGN_CONTEXTS[version] + raw)
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
    if offer.received is not None and \
            not 0 <= offer.created - offer.received <= MAX_START_AFTER_CREATED:
        raise OfferError(f"answer made {offer.created - offer.received:.1f} s after it received "
                         f"the offer it answers (0..{MAX_START_AFTER_CREATED:.0f})",
                         field="received")
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
        field = "reply_to"
        reply_to, received = body.get("reply_to"), body.get("received")
        if (reply_to is None) != (received is None):
            raise ValueError("an answer carries reply_to and received together")
        if reply_to is not None:
            if not isinstance(reply_to, bytes) or len(reply_to) != NONCE_LEN:
                raise ValueError(f"expected {NONCE_LEN} bytes")
            field = "received"
            received = fields.check_float(received)
        field = "hub"
        hub = body.get("hub")
        if hub is not None:
            hub = _hub(hub)
    except ValueError as exc:
        raise OfferError(f"offer {field}: {exc}", field=field) from None
    return Offer(peer_id, name, public_key, cert, created, start, nonce, rtt, profiles,
                 candidates, strategies, relayed, reply_to, received, hub)


def _hub(hub: Any) -> tuple[str, bytes]:
    if not isinstance(hub, dict) or set(hub) != {"at", "kid"}:
        raise ValueError("a relay is {at: HOST:PORT, kid: key id}")
    at, kid = hub["at"], hub["kid"]
    if not isinstance(at, str) or not 0 < len(at) <= MAX_HUB:
        raise ValueError(f"at is a HOST:PORT of at most {MAX_HUB} characters")
    if not isinstance(kid, bytes) or len(kid) != KID_LEN:
        raise ValueError(f"kid is {KID_LEN} bytes")
    return at, kid
