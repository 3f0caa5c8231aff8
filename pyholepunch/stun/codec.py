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
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from ..address import Address
from ..errors import LocalProtocolError, RemoteProtocolError
from .attributes import _COOKIE_BYTES, _bad, _enum_or_int
from .attributes import ATTRIBUTES as ATTRIBUTES
from .attributes import ERROR_REASONS as ERROR_REASONS
from .attributes import MAGIC_COOKIE as MAGIC_COOKIE
from .attributes import AttributeCodec as AttributeCodec
from .attributes import AttrType as AttrType
from .attributes import ChangeRequest as ChangeRequest
from .attributes import ConnectBack as ConnectBack
from .attributes import Decoder as Decoder
from .attributes import Encoder as Encoder
from .attributes import ErrorCode as ErrorCode
from .attributes import ErrorValue as ErrorValue
from .attributes import _plain_address as _plain_address
from .attributes import _xor_address as _xor_address
from .attributes import attr_name as attr_name
from .attributes import is_comprehension_required as is_comprehension_required
from .attributes import register_attribute as register_attribute

HEADER_SIZE = 20
FINGERPRINT_XOR = 0x5354554E
MAX_MESSAGE_SIZE = 65535 + HEADER_SIZE   # the length field is 16 bits


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
