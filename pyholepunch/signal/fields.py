"""Wire field checks for the signaling protocol (one per kind of field), and the bounds
they hold. Each takes the decoded value and returns it checked, or raises ValueError naming
what is wrong; ``protocol`` maps field names to them. Sans-IO, no state."""
from __future__ import annotations

import ipaddress
import math
import re
import threading
from typing import Any

import msgpack  # type: ignore[import-untyped]

MAX_PROFILES = 4
MAX_PROFILE_KEYS = 32
MAX_PROFILES_BYTES = 4096        # all of a peer's profiles, msgpack-encoded
MAX_CERT = 4096                  # a peer's DER certificate (ours is ~300 bytes)
MAX_TEXT = 1024                  # any other string field (tokens, reasons)


_packers = threading.local()


def pack(obj: Any, *, strict: bool = False) -> bytes:
    """``msgpack.packb(obj, use_bin_type=True, strict_types=strict)`` with this thread's
    Packer: packb makes a Packer (and its buffer) per call, and the server packs five times a
    coordination (#18). A Packer empties its buffer after an exception, so it is reusable."""
    try:
        packer = _packers.strict if strict else _packers.plain
    except AttributeError:
        _packers.plain = msgpack.Packer(use_bin_type=True, buf_size=4096)
        _packers.strict = msgpack.Packer(use_bin_type=True, strict_types=True, buf_size=4096)
        packer = _packers.strict if strict else _packers.plain
    data: bytes = packer.pack(obj)
    return data


def check_profiles(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or len(value) > MAX_PROFILES:
        raise ValueError(f"at most {MAX_PROFILES} profile maps")
    for p in value:
        if not isinstance(p, dict) or not all(isinstance(k, str) for k in p):
            raise ValueError("a profile is a map with string keys")
        if len(p) > MAX_PROFILE_KEYS:
            raise ValueError(f"a profile has at most {MAX_PROFILE_KEYS} keys")
    try:
        size = len(pack(value))
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"profiles cannot be encoded: {exc}") from None
    if size > MAX_PROFILES_BYTES:
        raise ValueError(f"profiles of {size} bytes exceed {MAX_PROFILES_BYTES}")
    return value


def check_cert(value: Any) -> bytes:
    """Shape only (bytes, bounded); the server parses the DER and checks its key."""
    if not isinstance(value, bytes) or not 0 < len(value) <= MAX_CERT:
        raise ValueError(f"cert is 1..{MAX_CERT} bytes of DER")
    return value


def check_pattern(regex: re.Pattern[str], what: str) -> Any:
    def check(value: Any) -> str:
        if not isinstance(value, str) or not regex.fullmatch(value):
            raise ValueError(f"bad {what} {value!r:.70}")
        return value
    return check


def check_text(value: Any) -> str:
    if type(value) is not str or len(value) > MAX_TEXT:
        raise ValueError(f"expected a string of at most {MAX_TEXT} characters")
    return value


def check_reason(value: Any) -> str:
    """Free text explaining a failure: cut to MAX_TEXT rather than refused."""
    if type(value) is not str:
        raise ValueError("expected a string")
    return value[:MAX_TEXT]


def check_choice(choices: tuple[str, ...]) -> Any:
    def check(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"{value!r:.40} is not one of {', '.join(choices)}")
        return str(value)
    return check


def check_key32(value: Any) -> bytes:
    if not isinstance(value, bytes) or len(value) != 32:
        raise ValueError("expected 32 bytes")
    return value


def check_address(value: Any) -> tuple[str, int]:
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[0], str)
            and type(value[1]) is int and 0 < value[1] < 65536):
        raise ValueError(f"bad address {value!r:.60}")
    return (value[0], value[1])


def check_relayed(value: Any) -> tuple[str, int]:
    """A TURN relayed transport address: an IP literal a peer can dial, with a port."""
    host, port = check_address(value)
    ip = ipaddress.ip_address(host)       # ValueError names the value
    if ip.is_unspecified or ip.is_multicast or (ip.version == 4 and ip == ipaddress.IPv4Address(
            "255.255.255.255")):
        raise ValueError(f"relayed address {host} cannot be dialed")
    return (str(ip), port)


def check_float(value: Any) -> float:
    if type(value) not in (int, float) or not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {value!r:.40}")
    return float(value)


def check_type(tp: Any) -> Any:
    def check(value: Any) -> Any:
        if type(value) is not tp:       # exact: bool is not an int here
            raise ValueError(f"expected {tp.__name__}, got {type(value).__name__}")
        return value
    return check
