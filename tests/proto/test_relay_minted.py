"""Minted relay tokens (pyholepunch/relay/minted.py), sans-IO: what a side mints, what the hub
accepts, and every way a token is refused — forged, expired, too long-lived, malformed."""
from __future__ import annotations

import pytest

from pyholepunch.relay.builtin_wire import TOKEN_LEN
from pyholepunch.relay.minted import (
    KID_LEN,
    MINT_MAGIC,
    MINTED_LEN,
    SESSION_LEN,
    key_id,
    mint,
    parse_minted,
    secret_bytes,
    session_key,
    verify,
)

SECRET = secret_bytes("operator-secret-0123456789")
SESSION = session_key((b"a" * 16, b"b" * 16))
NOW = 1_800_000_000.0


def _token(secret: bytes = SECRET, side: int = 0, now: float = NOW, ttl: float = 60):  # type: ignore[no-untyped-def]
    data = mint(secret, SESSION, side, now=now, ttl=ttl)
    assert data.startswith(MINT_MAGIC) and len(data) == MINTED_LEN
    token = parse_minted(data[len(MINT_MAGIC):])
    assert token is not None
    return token


def test_a_minted_token_verifies_until_it_expires() -> None:
    token = _token()
    assert (token.session, token.side, token.expires) == (SESSION, 0, int(NOW + 60))
    assert len(token.mac) == TOKEN_LEN
    assert verify(SECRET, token, now=NOW, max_ttl=300) is None
    assert verify(SECRET, token, now=NOW + 60, max_ttl=300) is None
    assert verify(SECRET, token, now=NOW + 61, max_ttl=300) == "expired"


def test_session_ids_are_symmetric_and_distinct() -> None:
    assert session_key((b"a" * 16, b"b" * 16)) == session_key((b"b" * 16, b"a" * 16))
    assert len(SESSION) == SESSION_LEN
    assert session_key((b"a" * 16, b"c" * 16)) != SESSION


def test_forgeries_are_refused() -> None:
    # Another secret; another side, session or expiry than the mac was made for.
    assert verify(SECRET, _token(secret_bytes("x" * 16)), now=NOW, max_ttl=300) == "forged"
    good = _token()
    for field, value in (("side", 1), ("session", bytes(SESSION_LEN)),
                         ("expires", good.expires + 3600)):
        forged = type(good)(**{"session": good.session, "side": good.side,
                               "expires": good.expires, "mac": good.mac, field: value})
        assert verify(SECRET, forged, now=NOW, max_ttl=300) == "forged"
    # A forged token is "forged" even when it is also expired: nothing about the secret is
    # learnt from which refusal comes.
    assert verify(secret_bytes("y" * 16), _token(now=NOW - 3600), now=NOW, max_ttl=300) == "forged"


def test_a_token_living_longer_than_the_hub_allows_is_refused() -> None:
    assert verify(SECRET, _token(ttl=3600), now=NOW, max_ttl=300) == "too long"


def test_malformed_preambles_parse_to_nothing() -> None:
    body = mint(SECRET, SESSION, 1, now=NOW)[len(MINT_MAGIC):]
    assert parse_minted(body[:-1]) is None and parse_minted(body + b"x") is None
    assert parse_minted(body[:SESSION_LEN] + b"\x02" + body[SESSION_LEN + 1:]) is None
    with pytest.raises(ValueError):
        mint(SECRET, b"short", 0, now=NOW)
    with pytest.raises(ValueError):
        mint(SECRET, SESSION, 2, now=NOW)


def test_secrets_and_key_ids() -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        secret_bytes("short")
    assert secret_bytes(b"\x00" * 16) == b"\x00" * 16
    assert len(key_id(SECRET)) == KID_LEN and key_id(SECRET) != key_id(secret_bytes("z" * 16))
