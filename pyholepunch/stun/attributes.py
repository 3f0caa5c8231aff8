"""STUN attributes: the one table mapping attribute type -> name, encoder, decoder.

Values are Python objects (addresses as ``(host, port)``, ``ChangeRequest``, ``ErrorValue``,
str, int); a decoder gets the value bytes and the transaction id (the XOR-ed address types
need it) and raises RemoteProtocolError naming the attribute. Protocols built on STUN add
their attributes with ``register_attribute`` (see relay/turn_proto.py).
"""
from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from ..errors import LocalProtocolError, RemoteProtocolError

Address = tuple[str, int]

MAGIC_COOKIE = 0x2112A442
_COOKIE_BYTES = struct.pack("!I", MAGIC_COOKIE)


class ErrorCode(IntEnum):
    TRY_ALTERNATE = 300
    BAD_REQUEST = 400
    UNAUTHORIZED = 401
    FORBIDDEN = 403
    UNKNOWN_ATTRIBUTE = 420
    ALLOCATION_MISMATCH = 437
    STALE_NONCE = 438
    ADDRESS_FAMILY_NOT_SUPPORTED = 440
    WRONG_CREDENTIALS = 441
    UNSUPPORTED_TRANSPORT_PROTOCOL = 442
    PEER_ADDRESS_FAMILY_MISMATCH = 443
    CONNECTION_ALREADY_EXISTS = 446
    CONNECTION_TIMEOUT_OR_FAILURE = 447
    ALLOCATION_QUOTA_REACHED = 486
    ROLE_CONFLICT = 487
    SERVER_ERROR = 500
    INSUFFICIENT_CAPACITY = 508


ERROR_REASONS = {
    300: "Try Alternate", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
    420: "Unknown Attribute", 437: "Allocation Mismatch", 438: "Stale Nonce",
    440: "Address Family not Supported", 441: "Wrong Credentials",
    442: "Unsupported Transport Protocol", 443: "Peer Address Family Mismatch",
    446: "Connection Already Exists", 447: "Connection Timeout or Failure",
    486: "Allocation Quota Reached", 487: "Role Conflict", 500: "Server Error",
    508: "Insufficient Capacity",
}


class AttrType(IntEnum):
    MAPPED_ADDRESS = 0x0001
    CHANGE_REQUEST = 0x0003          # RFC 5780
    USERNAME = 0x0006
    MESSAGE_INTEGRITY = 0x0008
    ERROR_CODE = 0x0009
    UNKNOWN_ATTRIBUTES = 0x000A
    CHANNEL_NUMBER = 0x000C
    LIFETIME = 0x000D
    XOR_PEER_ADDRESS = 0x0012
    DATA = 0x0013
    REALM = 0x0014
    NONCE = 0x0015
    XOR_RELAYED_ADDRESS = 0x0016
    REQUESTED_ADDRESS_FAMILY = 0x0017
    EVEN_PORT = 0x0018
    REQUESTED_TRANSPORT = 0x0019
    DONT_FRAGMENT = 0x001A
    MESSAGE_INTEGRITY_SHA256 = 0x001C
    PASSWORD_ALGORITHM = 0x001D
    USERHASH = 0x001E
    XOR_MAPPED_ADDRESS = 0x0020
    RESERVATION_TOKEN = 0x0022
    PRIORITY = 0x0024
    USE_CANDIDATE = 0x0025
    PADDING = 0x0026                 # RFC 5780
    RESPONSE_PORT = 0x0027           # RFC 5780
    CONNECTION_ID = 0x002A           # RFC 6062
    PASSWORD_ALGORITHMS = 0x8002
    ALTERNATE_DOMAIN = 0x8003
    SOFTWARE = 0x8022
    ALTERNATE_SERVER = 0x8023
    CACHE_TIMEOUT = 0x8027
    FINGERPRINT = 0x8028
    ICE_CONTROLLED = 0x8029
    ICE_CONTROLLING = 0x802A
    RESPONSE_ORIGIN = 0x802B         # RFC 5780
    OTHER_ADDRESS = 0x802C           # RFC 5780
    # Private (comprehension-optional) range: how the server's TCP connect-back ended,
    # sent on the original connection when it did not succeed. See stun/server.py.
    CONNECT_BACK_RESULT = 0xC0CB
    # Private: the server's primary address in the *other* IP family (a dual-stack server
    # answering over IPv4 names its IPv6 address and vice versa), so a peer given one address
    # learns the other from the server itself. Comprehension-optional: other clients skip it.
    OTHER_FAMILY_ADDRESS = 0xC0AF


class ConnectBack(IntEnum):
    """Outcome of a TCP connect-back (the value of CONNECT-BACK-RESULT)."""

    CONNECTED = 0
    REFUSED = 1        # answered with RST
    TIMEOUT = 2        # SYN dropped
    UNREACHABLE = 3    # ICMP error
    FAILED = 4         # anything else (local error on the server)


def attr_name(code: int) -> str:
    codec = ATTRIBUTES.get(code)
    if codec is not None:
        return codec.name
    try:
        return AttrType(code).name.replace("_", "-")
    except ValueError:
        return f"0x{code:04X}"


def is_comprehension_required(code: int) -> bool:
    return code < 0x8000


@dataclass(frozen=True, slots=True)
class ChangeRequest:
    change_ip: bool = False
    change_port: bool = False


@dataclass(frozen=True, slots=True)
class ErrorValue:
    code: int
    reason: str = ""


# --- the attribute table ----------------------------------------------------------------

Encoder = Callable[[Any, bytes], bytes]      # (value, transaction_id) -> bytes
Decoder = Callable[[bytes, bytes], Any]      # (bytes, transaction_id) -> value


@dataclass(frozen=True, slots=True)
class AttributeCodec:
    code: int
    name: str
    encode: Encoder
    decode: Decoder


ATTRIBUTES: dict[int, AttributeCodec] = {}


def register_attribute(code: int, name: str, encode: Encoder, decode: Decoder, *,
                       replace: bool = False) -> AttributeCodec:
    """Add an attribute to the table; ``replace`` must be given to override an entry."""
    if not 0 <= code <= 0xFFFF:
        raise ValueError(f"attribute type {code!r} is not a 16-bit value")
    if code in ATTRIBUTES and not replace:
        raise ValueError(f"attribute 0x{code:04X} is already registered as {ATTRIBUTES[code].name}")
    codec = AttributeCodec(code, name, encode, decode)
    ATTRIBUTES[code] = codec
    return codec


def _bad(field_name: str, why: str, code: int = 400) -> RemoteProtocolError:
    return RemoteProtocolError(f"bad {field_name}: {why}", code=code, field=field_name)


def _encode_address(addr: Address, xor_key: bytes | None) -> bytes:
    host, port = addr
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise LocalProtocolError(f"address {host!r} is not an IP address", field="address") from None
    if not isinstance(port, int) or not 0 <= port <= 0xFFFF:
        raise LocalProtocolError(f"port {port!r} is out of range", field="address")
    raw = ip.packed
    family = 1 if ip.version == 4 else 2
    if xor_key is not None:
        port ^= MAGIC_COOKIE >> 16
        raw = bytes(a ^ b for a, b in zip(raw, xor_key, strict=False))
    return struct.pack("!BBH", 0, family, port) + raw


def _decode_address(value: bytes, xor_key: bytes | None, name: str) -> Address:
    if len(value) < 4:
        raise _bad(name, f"{len(value)} bytes, need at least 8")
    _, family, port = struct.unpack_from("!BBH", value)
    raw = value[4:]
    if family == 1:
        if len(raw) != 4:
            raise _bad(name, f"IPv4 address of {len(raw)} bytes")
    elif family == 2:
        if len(raw) != 16:
            raise _bad(name, f"IPv6 address of {len(raw)} bytes")
    else:
        raise _bad(name, f"unknown address family {family}", code=440)
    if xor_key is not None:
        port ^= MAGIC_COOKIE >> 16
        raw = bytes(a ^ b for a, b in zip(raw, xor_key, strict=False))
    return (str(ipaddress.ip_address(raw)), port)


def _plain_address(name: str) -> tuple[Encoder, Decoder]:
    return (lambda v, tid: _encode_address(v, None),
            lambda b, tid: _decode_address(b, None, name))


def _xor_address(name: str) -> tuple[Encoder, Decoder]:
    return (lambda v, tid: _encode_address(v, _COOKIE_BYTES + tid),
            lambda b, tid: _decode_address(b, _COOKIE_BYTES + tid, name))


def _text(name: str, limit: int) -> tuple[Encoder, Decoder]:
    def enc(v: str, tid: bytes) -> bytes:
        raw = v.encode("utf-8")
        if len(raw) > limit:
            raise LocalProtocolError(f"{name} longer than {limit} bytes", field=name)
        return raw

    def dec(b: bytes, tid: bytes) -> str:
        if len(b) > limit:
            raise _bad(name, f"{len(b)} bytes, limit {limit}")
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            raise _bad(name, "not UTF-8") from None
    return enc, dec


def _u32(name: str) -> tuple[Encoder, Decoder]:
    def dec(b: bytes, tid: bytes) -> int:
        if len(b) != 4:
            raise _bad(name, f"{len(b)} bytes, need 4")
        return int(struct.unpack("!I", b)[0])
    return (lambda v, tid: struct.pack("!I", v)), dec


def _fixed(name: str, size: int) -> tuple[Encoder, Decoder]:
    def enc(v: bytes, tid: bytes) -> bytes:
        if len(v) != size:
            raise LocalProtocolError(f"{name} must be {size} bytes", field=name)
        return bytes(v)

    def dec(b: bytes, tid: bytes) -> bytes:
        if len(b) != size:
            raise _bad(name, f"{len(b)} bytes, need {size}")
        return bytes(b)
    return enc, dec


def _enc_change(v: ChangeRequest, tid: bytes) -> bytes:
    return struct.pack("!I", (4 if v.change_ip else 0) | (2 if v.change_port else 0))


def _dec_change(b: bytes, tid: bytes) -> ChangeRequest:
    if len(b) != 4:
        raise _bad("CHANGE-REQUEST", f"{len(b)} bytes, need 4")
    flags = struct.unpack("!I", b)[0]
    return ChangeRequest(bool(flags & 4), bool(flags & 2))


def _enc_error(v: ErrorValue, tid: bytes) -> bytes:
    if not 300 <= v.code <= 699:
        raise LocalProtocolError(f"error code {v.code} outside 300..699", field="ERROR-CODE")
    reason = (v.reason or ERROR_REASONS.get(v.code, "")).encode("utf-8")[:763]
    return struct.pack("!HBB", 0, v.code // 100, v.code % 100) + reason


def _dec_error(b: bytes, tid: bytes) -> ErrorValue:
    if len(b) < 4:
        raise _bad("ERROR-CODE", f"{len(b)} bytes, need at least 4")
    cls, number = b[2] & 0x07, b[3]
    if not 3 <= cls <= 6 or number > 99:
        raise _bad("ERROR-CODE", f"class {cls} number {number}")
    try:
        reason = b[4:].decode("utf-8")
    except UnicodeDecodeError:
        raise _bad("ERROR-CODE", "reason phrase is not UTF-8") from None
    return ErrorValue(cls * 100 + number, reason)


def _enc_unknown(v: Iterable[int], tid: bytes) -> bytes:
    codes = list(v)
    return struct.pack(f"!{len(codes)}H", *codes)


def _dec_unknown(b: bytes, tid: bytes) -> tuple[int, ...]:
    if len(b) % 2:
        raise _bad("UNKNOWN-ATTRIBUTES", f"odd length {len(b)}")
    return tuple(struct.unpack(f"!{len(b) // 2}H", b))


def _raw(b: bytes, tid: bytes) -> bytes:
    return bytes(b)


_TABLE: list[tuple[int, str, tuple[Encoder, Decoder]]] = [
    (AttrType.MAPPED_ADDRESS, "MAPPED-ADDRESS", _plain_address("MAPPED-ADDRESS")),
    (AttrType.XOR_MAPPED_ADDRESS, "XOR-MAPPED-ADDRESS", _xor_address("XOR-MAPPED-ADDRESS")),
    (AttrType.RESPONSE_ORIGIN, "RESPONSE-ORIGIN", _plain_address("RESPONSE-ORIGIN")),
    (AttrType.OTHER_ADDRESS, "OTHER-ADDRESS", _plain_address("OTHER-ADDRESS")),
    (AttrType.ALTERNATE_SERVER, "ALTERNATE-SERVER", _plain_address("ALTERNATE-SERVER")),
    (AttrType.OTHER_FAMILY_ADDRESS, "OTHER-FAMILY-ADDRESS", _plain_address("OTHER-FAMILY-ADDRESS")),
    (AttrType.CHANGE_REQUEST, "CHANGE-REQUEST", (_enc_change, _dec_change)),
    (AttrType.ERROR_CODE, "ERROR-CODE", (_enc_error, _dec_error)),
    (AttrType.UNKNOWN_ATTRIBUTES, "UNKNOWN-ATTRIBUTES", (_enc_unknown, _dec_unknown)),
    (AttrType.SOFTWARE, "SOFTWARE", _text("SOFTWARE", 763)),
    (AttrType.USERNAME, "USERNAME", _text("USERNAME", 513)),
    (AttrType.REALM, "REALM", _text("REALM", 763)),
    (AttrType.NONCE, "NONCE", _text("NONCE", 763)),
    (AttrType.MESSAGE_INTEGRITY, "MESSAGE-INTEGRITY", _fixed("MESSAGE-INTEGRITY", 20)),
    (AttrType.FINGERPRINT, "FINGERPRINT", _u32("FINGERPRINT")),
    (AttrType.RESPONSE_PORT, "RESPONSE-PORT",
     (lambda v, tid: struct.pack("!HH", v, 0), lambda b, tid: _dec_response_port(b))),
    (AttrType.PADDING, "PADDING", (lambda v, tid: bytes(v), _raw)),
    (AttrType.PRIORITY, "PRIORITY", _u32("PRIORITY")),
    (AttrType.CONNECT_BACK_RESULT, "CONNECT-BACK-RESULT",
     (lambda v, tid: struct.pack("!I", int(v)), lambda b, tid: _dec_connect_back(b))),
    (AttrType.USE_CANDIDATE, "USE-CANDIDATE", _fixed("USE-CANDIDATE", 0)),
    (AttrType.ICE_CONTROLLED, "ICE-CONTROLLED", _fixed("ICE-CONTROLLED", 8)),
    (AttrType.ICE_CONTROLLING, "ICE-CONTROLLING", _fixed("ICE-CONTROLLING", 8)),
]
for _code, _name, (_enc, _dec) in _TABLE:
    register_attribute(_code, _name, _enc, _dec)


def _dec_connect_back(b: bytes) -> ConnectBack | int:
    if len(b) != 4:
        raise _bad("CONNECT-BACK-RESULT", f"{len(b)} bytes, need 4")
    return _enum_or_int(ConnectBack, struct.unpack("!I", b)[0])


def _dec_response_port(b: bytes) -> int:
    if len(b) != 4:
        raise _bad("RESPONSE-PORT", f"{len(b)} bytes, need 4")
    return int(struct.unpack("!H", b[:2])[0])


def _enum_or_int(enum: type[IntEnum], value: int) -> int:
    try:
        return enum(value)
    except ValueError:
        return value


xor_address_codec = _xor_address
plain_address_codec = _plain_address
