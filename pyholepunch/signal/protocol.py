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
                       peer {peer_id, name, public_key, cert, candidates, profiles}, plan,
                       spread? (the larger RTT spread of the two peers: how late a PUNCH
                       may arrive, which the initiator's relay decision allows for)
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

Bounds (checked on arrival, so whatever one peer registers can be forwarded to another):
names, ids, sessions and targets match their pattern whole (``re.fullmatch``); candidates
(``check_candidates``): at most 32, 16 per family, addresses a peer could have; profiles:
4 maps, 32 keys each, 4 KiB encoded; a cert: 4 KiB, and the server parses it and checks it
holds the registering key; other strings 1 KiB (a ``reason`` is cut there). A PUNCH's
``start_at`` is never more than MAX_START_AHEAD ahead (``clamp_start``, applied by the server
and again by the peer). Code 430 (QUOTA_EXCEEDED): a per-key, per-peer or per-address bound
(names one key or address holds, relay sessions one peer or address holds).
"""
from __future__ import annotations

import enum
import re
import struct
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar, get_type_hints

import msgpack  # type: ignore[import-untyped]

from ..address import unusable_peer_ip
from ..errors import LocalProtocolError, RemoteProtocolError, SignalingError
from ..strategy.candidates import parse_candidates
from . import fields as checks

VERSION = 1
HEADER = struct.Struct("!I")
DEFAULT_MAX_FRAME = 64 * 1024
REGISTER_CONTEXT = b"pyholepunch/register/v1\x00"
# Bounds on everything a peer sends that the server stores or forwards (the others, with
# their checks, in fields.py). Together they keep the largest PUNCH the server can build
# (peer info + plan) well inside DEFAULT_MAX_FRAME: what one peer registers always fits.
MAX_CANDIDATES = 32              # in all (every interface's, every family's)
MAX_CANDIDATES_PER_FAMILY = 16
MAX_START_AHEAD = 5.0            # a PUNCH never starts further ahead than this (seconds)

# Patterns are applied with re.fullmatch: "$" would let "bob\n" pass as a name.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
PEER_ID_RE = re.compile(r"[a-z2-7]{32}")
SESSION_RE = re.compile(r"[A-Za-z0-9_-]{8,64}")
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
    QUOTA_EXCEEDED = 430       # a per-key/per-address/per-peer bound (names, relays)
    INTERNAL = 500
    RELAY_UNAVAILABLE = 501
    SERVER_FULL = 503
    REPLACED = 504             # the same peer registered again on another connection


QUOTA_FINAL = ("a quota of this server is used up (the names one key or address may hold, or the "
               "relays one peer or address may hold); not retried")


def refusal(reason: str, code: int, prefix: str = "") -> SignalingError:
    """A server's ERROR as the exception a client raises: ``[prefix]reason (code)``; a quota
    (430) says it is final, since retrying at once would only be refused again."""
    why = f"{code}: {QUOTA_FINAL}" if code == ErrorCode.QUOTA_EXCEEDED else f"{code}"
    return SignalingError(f"{prefix}{reason} ({why})", code=code)


# ---------------------------------------------------------------------------------------------
# field checks: one function per field *name* (shared meaning across messages)

# Lists remembered as checked: every peer's, twice off loopback (wire check, then policy).
CHECKED_CACHE = 1 << 17          # #18's 50,000 peers
# (allow_loopback, msgpack of the list) -> None: passed unchanged (~190 B), or the result.
_checked: dict[tuple[bool, bytes], tuple[tuple[Any, ...], ...] | None] = {}


def check_candidates(value: Any, *, allow_loopback: bool = True) -> list[list[Any]]:
    """``_check_candidates``, remembered: a peer's list, checked at REGISTER, in each CONNECT
    and against the loopback policy, is judged once (ipaddress parsing costs). Only lists
    that passed, at most CHECKED_CACHE (then all forgotten); each call gets fresh lists."""
    if not isinstance(value, (list, tuple)) or len(value) > MAX_CANDIDATES:
        return _check_candidates(value, allow_loopback=allow_loopback)
    try:        # exact types only ([ip, True] is not [ip, 1]; a subclass or tuple raises)
        key = (allow_loopback, checks.pack(value, strict=True))
    except (TypeError, ValueError, OverflowError):   # not wire data: checked afresh
        return _check_candidates(value, allow_loopback=allow_loopback)
    try:
        known = _checked[key]
    except KeyError:
        checked = _check_candidates(value, allow_loopback=allow_loopback)
        if len(_checked) >= CHECKED_CACHE:
            _checked.clear()
        same = checks.pack(checked, strict=True) == key[1]
        _checked[key] = None if same else tuple(tuple(c) for c in checked)
        return checked
    return [list(c) for c in (value if known is None else known)]


def _check_candidates(value: Any, *, allow_loopback: bool = True) -> list[list[Any]]:
    """THE candidate check (wire parsing and the server's policy both call it). Candidates
    are ``[ip, port, family, iface, origin]`` (strategy/candidates.py parses the form; v1
    ``[ip, port]`` pairs are read and extended, so everything past this check sees one
    form): at most MAX_CANDIDATES, MAX_CANDIDATES_PER_FAMILY per family, each an address a
    remote peer could really dial (``unusable_peer_ip``), loopback only when
    ``allow_loopback`` (the server allows it only from a peer on its own host). Exact
    duplicates are dropped; one address under two origins stays (a peer without NAT has its
    host address as its public one, and the LAN step looks for the host one); ValueError
    names what is wrong."""
    if not isinstance(value, (list, tuple)) or len(value) > MAX_CANDIDATES:
        raise ValueError(f"at most {MAX_CANDIDATES} candidates")
    out: list[list[Any]] = []
    seen: set[tuple[str, int, str]] = set()
    per_family: dict[str, int] = {}
    for c in parse_candidates(value):
        why = unusable_peer_ip(c.ip)
        if why is not None and not (why == "loopback" and allow_loopback):
            raise ValueError(f"candidate {c.ip} is {why}")
        per_family[c.family] = per_family.get(c.family, 0) + 1
        if per_family[c.family] > MAX_CANDIDATES_PER_FAMILY:
            raise ValueError(f"more than {MAX_CANDIDATES_PER_FAMILY} {c.family} candidates")
        if (c.ip, c.port, c.origin) not in seen:
            seen.add((c.ip, c.port, c.origin))
            out.append(c.to_wire())
    return out


def _check_target(value: Any) -> str:
    """A CONNECT target: a name or a peer_id."""
    if not isinstance(value, str) or not (NAME_RE.fullmatch(value) or PEER_ID_RE.fullmatch(value)):
        raise ValueError(f"bad target {value!r:.70}")
    return value


def clamp_start(start_at: float, now: float) -> float:
    """A PUNCH start no further ahead than MAX_START_AHEAD (both the server and the peer
    apply it: neither waits on a start a peer's claimed round trip pushed into the future)."""
    return min(start_at, now + MAX_START_AHEAD)


def _check_peer(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError("peer info is a map")
    out = {"peer_id": checks.check_pattern(PEER_ID_RE, "peer_id")(value.get("peer_id")),
           "name": checks.check_pattern(NAME_RE, "name")(value.get("name")),
           "public_key": checks.check_key32(value.get("public_key")),
           "cert": value.get("cert"),
           "candidates": check_candidates(value.get("candidates", [])),
           "profiles": checks.check_profiles(value.get("profiles", []))}
    if out["cert"] is not None:
        checks.check_cert(out["cert"])
    return out


_BY_NAME: dict[str, Any] = {
    "candidates": check_candidates,
    "profiles": checks.check_profiles,
    "cert": checks.check_cert,
    "target": _check_target,
    "reason": checks.check_reason,
    "name": checks.check_pattern(NAME_RE, "name"),
    "peer_id": checks.check_pattern(PEER_ID_RE, "peer_id"),
    "session": checks.check_pattern(SESSION_RE, "session id"),
    "role": checks.check_choice(ROLES),
    "outcome": checks.check_choice(OUTCOMES),
    "public_key": checks.check_key32,
    "nonce": checks.check_key32,
    "challenge": checks.check_key32,
    "server_id": checks.check_key32,
    "relay": checks.check_address,
    "relayed": checks.check_relayed,
    "via": checks.check_choice(RELAY_KINDS),
    "peer": _check_peer,
}


def _checker_for(name: str, hint: Any) -> tuple[Any, bool]:
    """(check function, nullable) for one dataclass field."""
    text = str(hint)
    nullable = "None" in text
    if name in _BY_NAME:
        return _BY_NAME[name], nullable
    if hint is str or hint == str | None:
        return checks.check_text, nullable
    for tp in (bytes, int, bool):
        if hint is tp or hint == tp | None:
            return checks.check_type(tp), nullable
    if hint is float or hint == float | None:
        return checks.check_float, nullable
    if "dict" in text:
        return checks.check_type(dict), nullable
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
        for name in self._CHECKS:       # the fields, in order (dataclasses.fields is slow)
            d[name] = getattr(self, name)
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
    spread: float = 0.0     # the larger RTT spread of the two peers (s): how late a PUNCH may be


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
        body = checks.pack(msg.to_wire())
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
