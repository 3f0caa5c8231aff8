"""Minted relay tokens: the built-in relay without a rendezvous server (sans-IO).

The rendezvous server issues random token pairs (``RelayHub.issue``). Two ``Punch`` sides that
never meet a server of ours instead mint their tokens themselves from a secret they share with
the relay's operator — as TURN's REST-API shared secret does for coturn::

    mac = HMAC-SHA256(secret, CONTEXT + session (16) + side (1) + expires (8, big-endian s))[:16]

and join with a preamble of their own on the relay's port::

    b"HPM1" + session (16 bytes) + side (1 byte: 0 initiator, 1 responder)
            + expires (8 bytes, unsigned big-endian, Unix seconds) + mac (TOKEN_LEN bytes)

The hub (``builtin``) checks the mac (constant time), the expiry (against its own wall clock,
and not further ahead than its ``minted_max_ttl``: a leaked token dies soon), uses each
(session, side) once, pairs side 0 only with side 1 of the same session, and counts the
session against per-source quotas. The session id both sides derive from the two offers
(``session_key``), so nobody without the secret can join or hijack a session, and a token
minted for one session or side is worth nothing for another.

Expiry is wall-clock time, as in TURN's REST API: a minting side whose clock is off by more
than the token's life (``MINT_TTL``) is refused as expired (or too far ahead), by name.
"""
from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass

from .builtin_wire import TOKEN_LEN

MINT_MAGIC = b"HPM1"
SESSION_LEN = 16
CONTEXT = b"pyholepunch/relay-token/v1\x00"
KID_CONTEXT = b"pyholepunch/relay-kid/v1\x00"
KID_LEN = 8
MINT_TTL = 60.0          # s: the life of a token a side mints when it joins
MIN_SECRET = 16          # bytes: a shorter shared secret is refused (guessable offline)
_BODY = struct.Struct(f"!{SESSION_LEN}sBQ{TOKEN_LEN}s")
MINTED_LEN = len(MINT_MAGIC) + _BODY.size      # the whole preamble


@dataclass(frozen=True, slots=True)
class MintedToken:
    session: bytes       # SESSION_LEN bytes
    side: int            # 0 or 1
    expires: int         # Unix seconds (wall clock)
    mac: bytes


def secret_bytes(secret: str | bytes) -> bytes:
    """The shared secret as bytes; ValueError when it is too short to resist guessing."""
    raw = secret.encode() if isinstance(secret, str) else bytes(secret)
    if len(raw) < MIN_SECRET:
        raise ValueError(f"a relay secret is at least {MIN_SECRET} bytes (e.g. `openssl rand "
                         f"-hex 32`), got {len(raw)}")
    return raw


def key_id(secret: bytes) -> bytes:
    """A short public fingerprint of the secret, so two offers can tell whether they hold the
    same one without revealing it (an HMAC of a constant)."""
    return hmac.new(secret, KID_CONTEXT, hashlib.sha256).digest()[:KID_LEN]


def session_key(nonces: tuple[bytes, bytes]) -> bytes:
    """The relay session id of two offers: the same on both sides, whichever order."""
    return hashlib.sha256(b"pyholepunch/relay-session\x00" + b"".join(sorted(nonces))
                          ).digest()[:SESSION_LEN]


def _mac(secret: bytes, session: bytes, side: int, expires: int) -> bytes:
    msg = CONTEXT + session + bytes([side]) + expires.to_bytes(8, "big")
    return hmac.new(secret, msg, hashlib.sha256).digest()[:TOKEN_LEN]


def mint(secret: bytes, session: bytes, side: int, *, now: float, ttl: float = MINT_TTL) -> bytes:
    """The preamble joining ``session`` as ``side`` (0 initiator, 1 responder) until
    ``now + ttl`` (wall-clock seconds)."""
    if len(session) != SESSION_LEN or side not in (0, 1) or ttl <= 0:
        raise ValueError(f"session is {SESSION_LEN} bytes, side 0 or 1, ttl > 0")
    expires = int(now + ttl)
    return MINT_MAGIC + _BODY.pack(session, side, expires, _mac(secret, session, side, expires))


def parse_minted(body: bytes) -> MintedToken | None:
    """The fields after the magic (``MINTED_LEN - 4`` bytes); None if malformed."""
    if len(body) != _BODY.size:
        return None
    session, side, expires, mac = _BODY.unpack(body)
    if side not in (0, 1):
        return None
    return MintedToken(session, side, expires, mac)


def verify(secret: bytes, token: MintedToken, *, now: float, max_ttl: float) -> str | None:
    """None if ``token`` is good at ``now`` (the hub's wall clock), else why not: "forged"
    (not minted with this secret), "expired", or "too long" (expires further ahead than
    ``max_ttl``). The mac is checked first and in constant time: nothing is learnt about the
    secret from which answer comes."""
    if not hmac.compare_digest(token.mac, _mac(secret, token.session, token.side,
                                               token.expires)):
        return "forged"
    if token.expires < now:
        return "expired"
    if token.expires > now + max_ttl:
        return "too long"
    return None
