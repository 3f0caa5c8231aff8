"""Access tokens and registration checks, sans-IO (time is an argument).

A server started with ``--token SECRET`` accepts either the secret itself (no expiry) or a
time-limited token ``hp1.<expiry-unix>.<hmac>`` made by ``make_token`` from the same secret,
so an operator can hand out access that ends without restarting anything.
"""
from __future__ import annotations

import hashlib
import hmac
import re

from .protocol import ErrorCode

TOKEN_PREFIX = "hp1"
# ASCII digits only (str.isdigit also admits "²"), at most 12 of them (int() of thousands
# of digits raises), and the MAC's exact hex shape: anything else is TOKEN_INVALID.
TOKEN_RE = re.compile(r"hp1\.([0-9]{1,12})\.([0-9a-f]{32})")


def _mac(secret: str, expiry: int) -> str:
    msg = f"{TOKEN_PREFIX}.{expiry}".encode()
    return hmac.new(secret.encode(), msg, hashlib.sha256).hexdigest()[:32]


def make_token(secret: str, expires_at: float) -> str:
    """A token valid until ``expires_at`` (Unix seconds) for a server holding ``secret``."""
    expiry = int(expires_at)
    return f"{TOKEN_PREFIX}.{expiry}.{_mac(secret, expiry)}"


def check_token(secret: str | None, token: str | None, now: float) -> ErrorCode | None:
    """None if access is granted, else the specific refusal code."""
    if secret is None:
        return None
    if not token:
        return ErrorCode.TOKEN_REQUIRED
    if hmac.compare_digest(token.encode(), secret.encode()):
        return None
    match = TOKEN_RE.fullmatch(token)
    if match is None:
        return ErrorCode.TOKEN_INVALID
    expiry = int(match.group(1))
    if not hmac.compare_digest(match.group(2).encode(), _mac(secret, expiry).encode()):
        return ErrorCode.TOKEN_INVALID
    if now > expiry:
        return ErrorCode.TOKEN_EXPIRED
    return None


class TokenBucket:
    """Per-peer message rate limit: ``rate`` per second sustained, ``burst`` at once."""

    __slots__ = ("rate", "burst", "_level", "_at")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst = rate, burst
        self._level, self._at = burst, now

    def is_full(self, now: float) -> bool:
        """Refilled to its burst by ``now``: it remembers nothing a fresh bucket would not."""
        return self._level + (now - self._at) * self.rate >= self.burst

    def take(self, now: float, n: float = 1.0) -> bool:
        self._level = min(self.burst, self._level + (now - self._at) * self.rate)
        self._at = now
        if self._level < n:
            return False
        self._level -= n
        return True
