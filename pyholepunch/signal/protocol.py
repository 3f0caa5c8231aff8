"""Signaling wire protocol, sans-IO: frames, message types, the connection state machine.

Wire format (inside TLS over TCP)::

    +----------------+---------------------------------------------+
    | length: u32 BE | body: msgpack map, `length` bytes            |
    +----------------+---------------------------------------------+

``length`` counts the body only; it is checked against the connection's ``max_frame``
(default 64 KiB) *before* any of the body is buffered, so an oversized frame costs nothing.
The body is a msgpack map with string keys; key ``"t"`` names the message type, the other keys
are that type's fields (table below). Unknown keys are ignored (forward compatibility);
missing required fields, wrong types, extension types and trailing bytes are errors.
Binary fields are msgpack bin, times are float64 seconds (Unix epoch, *sender's* clock unless
stated), candidates are ``[[ip, port, family, iface, origin], ...]`` (strategy/candidates.py;
v1 ``[ip, port]`` pairs are still read), NAT profiles are ``NatProfile.to_dict()`` maps.

==============  =====  =============================================================
type            dir    fields
==============  =====  =============================================================
hello           S->C   nonce (32 B), server_time, server_id (SHA-256 of the TLS cert), version
register        C->S   name, public_key (32 B Ed25519), challenge (the hello nonce),
                       signature (over `registration_message`), token?, cert?, profiles,
                       candidates
ping            both   t1 (sender clock), offset?, rtt? (sender's current estimate of the
                       receiver's clock offset and the round trip, for the receiver's info)
pong            both   t1 (echoed), t2 (receive time), t3 (send time), receiver's clock
registered      S->C   peer_id, offset, rtt (server's estimate: client clock - server clock)
update          C->S   candidates?, profiles?, cert?
connect         C->S   session, target (name or peer_id), candidates, profiles
punch           S->C   session, role ("initiator"|"responder"), start_at (RECEIVER's clock),
                       peer {peer_id, name, public_key, cert, candidates, profiles}, plan
result          C->S   session, outcome ("direct"|"relay"|"failed"), stats, reason? (why it
                       failed: passed on to the other peer)
relay           C->S   session, relayed? ([ip, port]: the sender's TURN relayed address, to
                       hand to the other peer; absent: ask for the built-in relay)
relay_grant     S->C   session, token, relay ([host, port]), via ("builtin"|"turn"; token
                       is empty for turn: dial ``relay`` with plain TCP)
error           S->C   code, reason, session?, fatal
==============  =====  =============================================================

Conversation: hello -> register -> (ping/pong)* -> registered, then anything in READY.
A fatal error closes the connection; a non-fatal one (with ``session``) answers one request,
or, with code 424 (PEER_GAVE_UP), tells a peer that the session's other peer sent ``result``
"failed" (reason: "NAME gave up: REASON"): it stops punching or waiting for a relay.

Relaying: ``relay`` without ``relayed`` makes the server issue built-in relay tokens and send
``relay_grant`` (via "builtin") to both peers. With ``relayed`` (a TURN allocation the sender
holds, RFC 6062), the server sends ``relay_grant`` (via "turn", that address, empty token) to
the session's other peer and the same frame back to the sender as the acknowledgement; one
offer per session. v1 peers that predate ``via`` ignore it (unknown keys are ignored).
"""
from __future__ import annotations

import enum
import ipaddress
import math
import re
import struct
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar, get_type_hints

import msgpack  # type: ignore[import-untyped]

from ..errors import LocalProtocolError, RemoteProtocolError
from ..strategy.candidates import parse_candidates

VERSION = 1
HEADER = struct.Struct("!I")
DEFAULT_MAX_FRAME = 64 * 1024
MAX_CANDIDATES = 32
MAX_PROFILES = 4
REGISTER_CONTEXT = b"pyholepunch/register/v1\x00"

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
PEER_ID_RE = re.compile(r"^[a-z2-7]{32}$")
SESSION_RE = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
ROLES = ("initiator", "responder")
RELAY_KINDS = ("builtin", "turn")
OUTCOMES = ("direct", "relay", "failed")


class ErrorCode(enum.IntEnum):
    """ERROR frame codes. 4xx: the request was refused; 5xx: the server could not serve it."""

    MALFORMED = 400            # garbled frame, bad msgpack, wrong field types
    BAD_SIGNATURE = 401        # registration signature does not verify
    REPLAYED_CHALLENGE = 402   # signed challenge is not this connection's fresh nonce
    TOKEN_REQUIRED = 403       # server wants an access token, none given
    UNKNOWN_TARGET = 404       # no such peer online
    TOKEN_INVALID = 405        # token does not match
    TOKEN_EXPIRED = 406        # time-limited token past its expiry
    TIMEOUT = 408              # handshake or idle timeout
    NAME_TAKEN = 409           # the name is bound to another key
    UNEXPECTED = 410           # message not allowed in this state
    UNKNOWN_SESSION = 411      # RESULT/RELAY for a session this peer is not part of
    SESSION_EXISTS = 412       # CONNECT reused a session id
    FRAME_TOO_LARGE = 413
    BAD_NAME = 414             # name malformed or shaped like a peer_id
    BAD_REQUEST = 422          # well-formed but meaningless (connect to self, bad profile)
    PEER_GAVE_UP = 424         # the session's other peer reported failure: stop waiting
    VERSION = 426
    RATE_LIMITED = 429
    INTERNAL = 500
    RELAY_UNAVAILABLE = 501
    SERVER_FULL = 503
    REPLACED = 504             # the same peer registered again on another connection


# ---------------------------------------------------------------------------------------------
# field checks: one function per field *name* (shared meaning across messages)

def _check_candidates(value: Any) -> list[list[Any]]:
    """Candidates ``[ip, port, family, iface, origin]`` (strategy/candidates.py); v1
    ``[ip, port]`` pairs are read and extended, so everything past this check sees one form."""
    if not isinstance(value, list) or len(value) > MAX_CANDIDATES:
        raise ValueError(f"at most {MAX_CANDIDATES} candidates")
    return [c.to_wire() for c in parse_candidates(value)]


def _check_profiles(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or len(value) > MAX_PROFILES:
        raise ValueError(f"at most {MAX_PROFILES} profile maps")
    for p in value:
        if not isinstance(p, dict) or not all(isinstance(k, str) for k in p):
            raise ValueError("a profile is a map with string keys")
    return value


def _check_pattern(regex: re.Pattern[str], what: str) -> Any:
    def check(value: Any) -> str:
        if not isinstance(value, str) or not regex.match(value):
            raise ValueError(f"bad {what} {value!r:.70}")
        return value
    return check


def _check_choice(choices: tuple[str, ...]) -> Any:
    def check(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"{value!r:.40} is not one of {', '.join(choices)}")
        return str(value)
    return check


def _check_key32(value: Any) -> bytes:
    if not isinstance(value, bytes) or len(value) != 32:
        raise ValueError("expected 32 bytes")
    return value


def _check_address(value: Any) -> tuple[str, int]:
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[0], str)
            and type(value[1]) is int and 0 < value[1] < 65536):
        raise ValueError(f"bad address {value!r:.60}")
    return (value[0], value[1])


def _check_relayed(value: Any) -> tuple[str, int]:
    """A TURN relayed transport address: an IP literal a peer can dial, with a port."""
    host, port = _check_address(value)
    ip = ipaddress.ip_address(host)       # ValueError names the value
    if ip.is_unspecified or ip.is_multicast or (ip.version == 4 and ip == ipaddress.IPv4Address(
            "255.255.255.255")):
        raise ValueError(f"relayed address {host} cannot be dialed")
    return (str(ip), port)


def _check_peer(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError("peer info is a map")
    out = {"peer_id": _check_pattern(PEER_ID_RE, "peer_id")(value.get("peer_id")),
           "name": _check_pattern(NAME_RE, "name")(value.get("name")),
           "public_key": _check_key32(value.get("public_key")),
           "cert": value.get("cert"),
           "candidates": _check_candidates(value.get("candidates", [])),
           "profiles": _check_profiles(value.get("profiles", []))}
    if out["cert"] is not None and not isinstance(out["cert"], bytes):
        raise ValueError("cert is DER bytes")
    return out


_BY_NAME: dict[str, Any] = {
    "candidates": _check_candidates,
    "profiles": _check_profiles,
    "name": _check_pattern(NAME_RE, "name"),
    "peer_id": _check_pattern(PEER_ID_RE, "peer_id"),
    "session": _check_pattern(SESSION_RE, "session id"),
    "role": _check_choice(ROLES),
    "outcome": _check_choice(OUTCOMES),
    "public_key": _check_key32,
    "nonce": _check_key32,
    "challenge": _check_key32,
    "server_id": _check_key32,
    "relay": _check_address,
    "relayed": _check_relayed,
    "via": _check_choice(RELAY_KINDS),
    "peer": _check_peer,
}


def _check_float(value: Any) -> float:
    if type(value) not in (int, float) or not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {value!r:.40}")
    return float(value)


def _check_type(tp: Any) -> Any:
    def check(value: Any) -> Any:
        if type(value) is not tp:       # exact: bool is not an int here
            raise ValueError(f"expected {tp.__name__}, got {type(value).__name__}")
        return value
    return check


def _checker_for(name: str, hint: Any) -> tuple[Any, bool]:
    """(check function, nullable) for one dataclass field."""
    text = str(hint)
    nullable = "None" in text
    if name in _BY_NAME:
        return _BY_NAME[name], nullable
    for tp in (bytes, str, int, bool):
        if hint is tp or hint == tp | None:
            return _check_type(tp), nullable
    if hint is float or hint == float | None:
        return _check_float, nullable
    if "dict" in text:
        return _check_type(dict), nullable
    raise TypeError(f"no wire check for field {name}: {hint}")  # pragma: no cover


# ---------------------------------------------------------------------------------------------
# messages

MESSAGES: dict[str, type[Message]] = {}


class Direction(enum.Enum):
    TO_CLIENT = "s2c"
    TO_SERVER = "c2s"
    BOTH = "both"


@dataclass(frozen=True, slots=True)
class Message:
    TYPE: ClassVar[str] = ""
    DIRECTION: ClassVar[Direction] = Direction.BOTH
    _CHECKS: ClassVar[dict[str, tuple[Any, bool, bool]]] = {}

    def to_wire(self) -> dict[str, Any]:
        d: dict[str, Any] = {"t": self.TYPE}
        for f in fields(self):
            d[f.name] = getattr(self, f.name)
        return d

    @classmethod
    def from_wire(cls, body: dict[str, Any]) -> Message:
        kwargs: dict[str, Any] = {}
        for fname, (check, nullable, required) in cls._CHECKS.items():
            if fname not in body:
                if required:
                    raise RemoteProtocolError(f"{cls.TYPE}: missing field {fname!r}",
                                              code=ErrorCode.MALFORMED, field=fname)
                continue
            value = body[fname]
            if value is None and nullable:
                kwargs[fname] = None
                continue
            try:
                kwargs[fname] = check(value)
            except (ValueError, TypeError) as exc:
                raise RemoteProtocolError(f"{cls.TYPE}.{fname}: {exc}",
                                          code=ErrorCode.MALFORMED, field=fname) from None
        return cls(**kwargs)


def message(type_name: str, direction: Direction) -> Any:
    """Class decorator: register a message type and build its per-field wire checks."""
    def wrap(cls: type[Message]) -> type[Message]:
        cls.TYPE = type_name
        cls.DIRECTION = direction
        hints = get_type_hints(cls)
        checks = {}
        for f in fields(cls):
            check, nullable = _checker_for(f.name, hints[f.name])
            required = f.default is MISSING and f.default_factory is MISSING
            checks[f.name] = (check, nullable, required)
        cls._CHECKS = checks
        MESSAGES[type_name] = cls
        return cls
    return wrap


@message("hello", Direction.TO_CLIENT)
@dataclass(frozen=True, slots=True)
class Hello(Message):
    nonce: bytes
    server_time: float
    server_id: bytes
    version: int = VERSION


@message("register", Direction.TO_SERVER)
@dataclass(frozen=True, slots=True)
class Register(Message):
    name: str
    public_key: bytes
    challenge: bytes
    signature: bytes
    token: str | None = None
    cert: bytes | None = None
    profiles: list[dict[str, Any]] = field(default_factory=list)
    candidates: list[list[Any]] = field(default_factory=list)


@message("registered", Direction.TO_CLIENT)
@dataclass(frozen=True, slots=True)
class Registered(Message):
    peer_id: str
    offset: float
    rtt: float


@message("ping", Direction.BOTH)
@dataclass(frozen=True, slots=True)
class Ping(Message):
    t1: float
    offset: float | None = None
    rtt: float | None = None


@message("pong", Direction.BOTH)
@dataclass(frozen=True, slots=True)
class Pong(Message):
    t1: float
    t2: float
    t3: float


@message("update", Direction.TO_SERVER)
@dataclass(frozen=True, slots=True)
class Update(Message):
    candidates: list[list[Any]] | None = None
    profiles: list[dict[str, Any]] | None = None
    cert: bytes | None = None


@message("connect", Direction.TO_SERVER)
@dataclass(frozen=True, slots=True)
class Connect(Message):
    session: str
    target: str
    candidates: list[list[Any]] = field(default_factory=list)
    profiles: list[dict[str, Any]] = field(default_factory=list)


@message("punch", Direction.TO_CLIENT)
@dataclass(frozen=True, slots=True)
class Punch(Message):
    session: str
    role: str
    start_at: float
    peer: dict[str, Any]
    plan: dict[str, Any] | None = None


@message("result", Direction.TO_SERVER)
@dataclass(frozen=True, slots=True)
class Result(Message):
    session: str
    outcome: str
    stats: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None   # why, when outcome is "failed": passed on to the other peer


@message("relay", Direction.TO_SERVER)
@dataclass(frozen=True, slots=True)
class Relay(Message):
    session: str
    relayed: tuple[str, int] | None = None


@message("relay_grant", Direction.TO_CLIENT)
@dataclass(frozen=True, slots=True)
class RelayGrant(Message):
    session: str
    token: bytes
    relay: tuple[str, int]
    via: str = "builtin"


@message("error", Direction.TO_CLIENT)
@dataclass(frozen=True, slots=True)
class Error(Message):
    code: int
    reason: str
    session: str | None = None
    fatal: bool = True


def registration_message(nonce: bytes, server_id: bytes, name: str, public_key: bytes) -> bytes:
    """What a REGISTER signs: binds the key to this name, this challenge and this server."""
    return REGISTER_CONTEXT + nonce + server_id + public_key + name.encode("utf-8")


# ---------------------------------------------------------------------------------------------
# frames

def encode_frame(msg: Message, max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    try:
        body: bytes = msgpack.packb(msg.to_wire(), use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise LocalProtocolError(f"cannot encode {msg.TYPE}: {exc}") from None
    if len(body) > max_frame:
        raise LocalProtocolError(f"{msg.TYPE} frame of {len(body)} bytes exceeds {max_frame}",
                                 code=ErrorCode.FRAME_TOO_LARGE)
    return HEADER.pack(len(body)) + body


def decode_body(body: bytes) -> Message:
    """One frame body -> a Message; RemoteProtocolError for anything else."""
    try:
        obj = msgpack.unpackb(body, raw=False, use_list=True, strict_map_key=True)
    except Exception as exc:  # msgpack raises many types (ExtraData, FormatError, StackError...)
        raise RemoteProtocolError(f"undecodable frame body: {type(exc).__name__}",
                                  code=ErrorCode.MALFORMED) from None
    return parse_message(obj)


def parse_message(obj: Any) -> Message:
    """A decoded msgpack object -> a checked Message (also for pushes routed between nodes)."""
    if not isinstance(obj, dict):
        raise RemoteProtocolError("frame body is not a map", code=ErrorCode.MALFORMED)
    t = obj.get("t")
    cls = MESSAGES.get(t) if isinstance(t, str) else None
    if cls is None:
        raise RemoteProtocolError(f"unknown message type {obj.get('t')!r:.40}",
                                  code=ErrorCode.MALFORMED, field="t")
    return cls.from_wire(obj)


class FrameDecoder:
    """Accumulates stream bytes and yields complete frame bodies, checking size up front."""

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        bodies = []
        while len(self._buf) >= HEADER.size:
            (length,) = HEADER.unpack_from(self._buf)
            if length > self.max_frame:
                raise RemoteProtocolError(f"frame of {length} bytes exceeds {self.max_frame}",
                                          code=ErrorCode.FRAME_TOO_LARGE)
            end = HEADER.size + length
            if len(self._buf) < end:
                break
            bodies.append(bytes(self._buf[HEADER.size:end]))
            del self._buf[:end]
        return bodies

    @property
    def buffered(self) -> int:
        return len(self._buf)
