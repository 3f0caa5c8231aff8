"""Sans-IO STUN messages (RFC 8489) with the RFC 5780 NAT-behaviour attributes.

No sockets, no clock. ``StunMessage.parse(data)`` turns bytes into a message (or raises
``RemoteProtocolError`` naming the bad field); ``bytes(msg)`` / ``msg.encode(key=...,
fingerprint=...)`` turns it back. Attribute values are decoded through one table,
``ATTRIBUTES``, which other protocols built on STUN (TURN) extend with
``register_attribute``; attributes without an entry keep their raw bytes.
"""
from __future__ import annotations

import binascii
import hashlib
import hmac
import ipaddress
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from ..errors import LocalProtocolError, RemoteProtocolError

Address = tuple[str, int]

MAGIC_COOKIE = 0x2112A442
HEADER_SIZE = 20
FINGERPRINT_XOR = 0x5354554E
MAX_MESSAGE_SIZE = 65535 + HEADER_SIZE   # the length field is 16 bits
_COOKIE_BYTES = struct.pack("!I", MAGIC_COOKIE)


class Method(IntEnum):
    BINDING = 0x001
    # TURN (RFC 8656, RFC 6062): listed so logs and errors can name them.
    ALLOCATE = 0x003
    REFRESH = 0x004
    SEND = 0x006
    DATA = 0x007
    CREATE_PERMISSION = 0x008
    CHANNEL_BIND = 0x009
    CONNECT = 0x00A
    CONNECTION_BIND = 0x00B
    CONNECTION_ATTEMPT = 0x00C


class MessageClass(IntEnum):
    REQUEST = 0b00
    INDICATION = 0b01
    SUCCESS = 0b10
    ERROR = 0b11


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


# --- credentials ---------------------------------------------------------------------------

def short_term_key(password: str) -> bytes:
    """RFC 8489 §9.1.1 (OpaqueString processing is the caller's; ASCII passwords need none)."""
    return password.encode("utf-8")


def long_term_key(username: str, realm: str, password: str) -> bytes:
    """RFC 8489 §9.2.2: MD5(username ":" realm ":" password)."""
    return hashlib.md5(f"{username}:{realm}:{password}".encode(), usedforsecurity=False).digest()


def _fingerprint(data: bytes) -> int:
    return (binascii.crc32(data) ^ FINGERPRINT_XOR) & 0xFFFFFFFF


def _with_length(data: bytes, length: int) -> bytes:
    return data[:2] + struct.pack("!H", length) + data[4:]


# --- the message -----------------------------------------------------------------------------

def message_type(method: int, cls: int) -> int:
    """Interleave the 12 method bits and 2 class bits (RFC 8489 §5)."""
    if not 0 <= method <= 0xFFF:
        raise LocalProtocolError(f"method 0x{method:X} is not 12 bits", field="method")
    return ((method & 0xF80) << 2) | ((method & 0x070) << 1) | (method & 0x00F) \
        | ((cls & 2) << 7) | ((cls & 1) << 4)


def split_message_type(mtype: int) -> tuple[int, int]:
    method = ((mtype & 0x3E00) >> 2) | ((mtype & 0x00E0) >> 1) | (mtype & 0x000F)
    cls = ((mtype & 0x0100) >> 7) | ((mtype & 0x0010) >> 4)
    return method, cls


def _enum_or_int(enum: type[IntEnum], value: int) -> int:
    try:
        return enum(value)
    except ValueError:
        return value


@dataclass(eq=False)
class StunMessage:
    """One STUN message: ``attributes`` is an ordered list of ``(type, value)``."""

    method: int
    cls: MessageClass
    transaction_id: bytes
    attributes: list[tuple[int, Any]] = field(default_factory=list)
    unknown_required: tuple[int, ...] = ()   # comprehension-required types nobody decoded
    raw: bytes = b""                         # the bytes it was parsed from
    _integrity_offset: int | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if len(self.transaction_id) != 12:
            raise LocalProtocolError(
                f"transaction id is {len(self.transaction_id)} bytes, need 12",
                field="transaction id")

    # -- accessors
    def get(self, code: int, default: Any = None) -> Any:
        for t, v in self.attributes:
            if t == code:
                return v
        return default

    def __contains__(self, code: int) -> bool:
        return any(t == code for t, _ in self.attributes)

    def add(self, code: int, value: Any) -> StunMessage:
        self.attributes.append((code, value))
        return self

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        return iter(self.attributes)

    @property
    def error(self) -> ErrorValue | None:
        value = self.get(AttrType.ERROR_CODE)
        return value if isinstance(value, ErrorValue) else None

    @property
    def mapped_address(self) -> Address | None:
        """XOR-MAPPED-ADDRESS, or the legacy MAPPED-ADDRESS from pre-5389 servers."""
        value = self.get(AttrType.XOR_MAPPED_ADDRESS) or self.get(AttrType.MAPPED_ADDRESS)
        return value if isinstance(value, tuple) else None

    # -- wire format
    @classmethod
    def parse(cls, data: bytes) -> StunMessage:
        """Decode exactly one message; raise RemoteProtocolError naming the bad field."""
        data = bytes(data)
        if len(data) < HEADER_SIZE:
            raise _bad("header", f"{len(data)} bytes, need {HEADER_SIZE}")
        mtype, length, cookie = struct.unpack_from("!HHI", data)
        if mtype & 0xC000:
            raise _bad("message type", f"0x{mtype:04X} has the top bits set")
        if cookie != MAGIC_COOKIE:
            raise _bad("magic cookie", f"0x{cookie:08X}")
        if length % 4:
            raise _bad("message length", f"{length} is not a multiple of 4")
        if HEADER_SIZE + length != len(data):
            raise _bad("message length", f"header says {length}, body is {len(data) - HEADER_SIZE}")
        method, mcls = split_message_type(mtype)
        tid = data[8:20]
        msg = cls(_enum_or_int(Method, method), MessageClass(mcls), tid, raw=data)
        unknown: list[int] = []
        offset = HEADER_SIZE
        seen_integrity = seen_fingerprint = False
        while offset < len(data):
            if seen_fingerprint:
                raise _bad("FINGERPRINT", "attributes follow it")
            if len(data) - offset < 4:
                raise _bad("attribute header", f"{len(data) - offset} trailing bytes")
            atype, alen = struct.unpack_from("!HH", data, offset)
            start, end = offset + 4, offset + 4 + alen
            if end > len(data):
                raise _bad(f"{attr_name(atype)} length", f"{alen} runs past the message end")
            value_bytes = data[start:end]
            attr_start, offset = offset, start + alen + (-alen % 4)
            if atype == AttrType.FINGERPRINT:
                seen_fingerprint = True
                expected = _fingerprint(_with_length(data[:attr_start], attr_start - HEADER_SIZE + 8))
                got = ATTRIBUTES[atype].decode(value_bytes, tid)
                if got != expected:
                    raise _bad("FINGERPRINT", f"0x{got:08X} != 0x{expected:08X}")
                msg.attributes.append((AttrType.FINGERPRINT, got))
                continue
            if seen_integrity and atype != AttrType.MESSAGE_INTEGRITY_SHA256:
                continue  # RFC 8489 §14.5: ignore what follows MESSAGE-INTEGRITY
            if atype == AttrType.MESSAGE_INTEGRITY:
                seen_integrity = True
                msg._integrity_offset = attr_start
            codec = ATTRIBUTES.get(atype)
            if codec is None:
                if is_comprehension_required(atype):
                    unknown.append(atype)
                msg.attributes.append((_enum_or_int(AttrType, atype), value_bytes))
                continue
            try:
                value = codec.decode(value_bytes, tid)
            except RemoteProtocolError:
                raise
            except (ValueError, struct.error, IndexError, UnicodeDecodeError) as exc:
                raise _bad(codec.name, str(exc)) from None
            msg.attributes.append((_enum_or_int(AttrType, atype), value))
        msg.unknown_required = tuple(unknown)
        return msg

    def encode(self, *, key: bytes | None = None, fingerprint: bool = False,
               padding: bytes = b"\x00") -> bytes:
        """Serialise. With ``key`` (re)compute MESSAGE-INTEGRITY; FINGERPRINT is recomputed
        whenever present, and added with ``fingerprint``. ``padding`` is the pad byte."""
        body = bytearray()
        tid = self.transaction_id
        mtype = message_type(int(self.method), int(self.cls))
        header = struct.pack("!HHI", mtype, 0, MAGIC_COOKIE) + tid
        wrote_integrity = False
        want_fp = fingerprint
        for atype, value in self.attributes:
            if atype == AttrType.FINGERPRINT:
                want_fp = True
                continue
            if atype == AttrType.MESSAGE_INTEGRITY:
                if wrote_integrity:
                    continue
                if key is not None:
                    body += self._integrity(header, body, key)
                    wrote_integrity = True
                    continue
            body += self._attribute(atype, value, tid, padding)
        if key is not None and not wrote_integrity:
            body += self._integrity(header, body, key)
        if want_fp:
            crc = _fingerprint(_with_length(header, len(body) + 8) + bytes(body))
            body += struct.pack("!HHI", AttrType.FINGERPRINT, 4, crc)
        if len(body) > 0xFFFF:
            raise LocalProtocolError(f"message body of {len(body)} bytes is too long", field="length")
        return _with_length(header, len(body)) + bytes(body)

    def __bytes__(self) -> bytes:
        return self.encode()

    @staticmethod
    def _attribute(atype: int, value: Any, tid: bytes, padding: bytes) -> bytes:
        codec = ATTRIBUTES.get(atype)
        try:
            raw = bytes(value) if codec is None else codec.encode(value, tid)
        except (struct.error, TypeError, AttributeError, ValueError) as exc:
            if isinstance(exc, LocalProtocolError):
                raise
            name = attr_name(atype)
            raise LocalProtocolError(f"cannot encode {name} {value!r}: {exc}", field=name) from None
        if len(raw) > 0xFFFF:
            raise LocalProtocolError(f"{attr_name(atype)} value too long", field=attr_name(atype))
        return struct.pack("!HH", atype, len(raw)) + raw + padding[:1] * (-len(raw) % 4)

    @staticmethod
    def _integrity(header: bytes, body: bytearray, key: bytes) -> bytes:
        digest = hmac.new(key, _with_length(header, len(body) + 24) + bytes(body), hashlib.sha1).digest()
        return struct.pack("!HH", AttrType.MESSAGE_INTEGRITY, 20) + digest

    def verify_integrity(self, key: bytes) -> bool:
        """Check MESSAGE-INTEGRITY of a parsed message against ``key`` (False if absent)."""
        if self._integrity_offset is None or not self.raw:
            return False
        off = self._integrity_offset
        signed = _with_length(self.raw[:off], off - HEADER_SIZE + 24)
        expected = hmac.new(key, signed, hashlib.sha1).digest()
        return hmac.compare_digest(expected, self.raw[off + 4:off + 24])

    @property
    def has_integrity(self) -> bool:
        return self._integrity_offset is not None

    def __repr__(self) -> str:
        method = self.method.name if isinstance(self.method, Method) else f"0x{self.method:03X}"
        attrs = ", ".join(f"{attr_name(t)}={v!r}" for t, v in self.attributes)
        return f"<StunMessage {method} {self.cls.name} {self.transaction_id.hex()} [{attrs}]>"


# --- helpers for the common shapes -----------------------------------------------------------

def binding_request(transaction_id: bytes, *, change: ChangeRequest | None = None,
                    software: str | None = None) -> StunMessage:
    msg = StunMessage(Method.BINDING, MessageClass.REQUEST, transaction_id)
    if change is not None and (change.change_ip or change.change_port):
        msg.add(AttrType.CHANGE_REQUEST, change)
    if software:
        msg.add(AttrType.SOFTWARE, software)
    return msg


def error_response(request: StunMessage, code: int, reason: str = "", *,
                   unknown: Iterable[int] = (), software: str | None = None) -> StunMessage:
    msg = StunMessage(request.method, MessageClass.ERROR, request.transaction_id)
    msg.add(AttrType.ERROR_CODE, ErrorValue(code, reason or ERROR_REASONS.get(code, "")))
    codes = tuple(unknown)
    if codes:
        msg.add(AttrType.UNKNOWN_ATTRIBUTES, codes)
    if software:
        msg.add(AttrType.SOFTWARE, software)
    return msg


def is_stun(data: bytes) -> bool:
    """Cheap check that ``data`` starts like a STUN message (for demultiplexing)."""
    return len(data) >= HEADER_SIZE and data[0] & 0xC0 == 0 and data[4:8] == _COOKIE_BYTES


class StreamFramer:
    """Split a TCP byte stream into whole STUN messages (RFC 8489 §6.2.2: the header length
    frames them). With ``channel_data`` also TURN ChannelData frames (first bits 01, padded
    to 4 over TCP, RFC 8656 §12.5). Raises RemoteProtocolError on a bad header; after that
    the stream is unusable and should be closed."""

    def __init__(self, *, channel_data: bool = False, max_size: int = MAX_MESSAGE_SIZE) -> None:
        self._buf = bytearray()
        self._channel_data = channel_data
        self._max = max_size

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        out: list[bytes] = []
        while len(self._buf) >= 4:
            first = self._buf[0] >> 6
            length = struct.unpack_from("!H", self._buf, 2)[0]
            if first == 0:
                total = HEADER_SIZE + length
                if len(self._buf) >= 8 and self._buf[4:8] != _COOKIE_BYTES:
                    raise _bad("magic cookie", self._buf[4:8].hex())
                if length % 4:
                    raise _bad("message length", f"{length} is not a multiple of 4")
            elif first == 1 and self._channel_data:
                total = 4 + length + (-length % 4)
            else:
                raise _bad("stream framing", f"first byte 0x{self._buf[0]:02X}")
            if total > self._max:
                raise _bad("message length", f"{total} exceeds {self._max}")
            if len(self._buf) < total:
                break
            out.append(bytes(self._buf[:total]))
            del self._buf[:total]
        return out

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def take_remaining(self) -> bytes:
        """Hand over unframed bytes (e.g. when a TURN ConnectionBind turns the stream raw)."""
        data = bytes(self._buf)
        self._buf.clear()
        return data
