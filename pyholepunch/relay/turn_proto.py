"""Sans-IO TURN client for TCP allocations (RFC 8656 + RFC 6062), on the STUN codec.

No sockets, no clock: the driver feeds control-connection bytes to ``receive_data(data,
now)``, sends ``data_to_send()``, drains ``next_event()`` and re-arms one timer from
``get_timer()`` (``handle_timer(now)``). Long-term credentials (RFC 8489 §9.2) including the
401 realm/nonce dance and 438 stale-nonce retries are handled here; so are the allocation
and permission refresh timers. Each request the caller starts gets a ``request_id`` that
survives the internal authentication retries; its outcome is one event carrying that id.
"""
from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import logging
import os
import struct
from dataclasses import dataclass, field
from typing import Any

from ..address import Address
from ..errors import LocalProtocolError, RemoteProtocolError
from ..stun.codec import (
    ATTRIBUTES,
    AttrType,
    MessageClass,
    Method,
    StreamFramer,
    StunMessage,
    _xor_address,
    long_term_key,
    register_attribute,
)

log = logging.getLogger(__name__)


TRANSPORT_TCP = 6
DEFAULT_LIFETIME = 600
PERMISSION_REFRESH = 240.0        # permissions live 300 s (RFC 8656 §9); refresh early
MAX_AUTH_RETRIES = 3              # 401 once, then stale nonces


def _u32(name: str) -> tuple[Any, Any]:
    def dec(b: bytes, tid: bytes) -> int:
        if len(b) != 4:
            raise RemoteProtocolError(f"bad {name}: {len(b)} bytes, need 4", field=name)
        return int(struct.unpack("!I", b)[0])
    return (lambda v, tid: struct.pack("!I", v)), dec


def _dec_transport(b: bytes, tid: bytes) -> int:
    if len(b) != 4:
        raise RemoteProtocolError(f"bad REQUESTED-TRANSPORT: {len(b)} bytes, need 4",
                                  field="REQUESTED-TRANSPORT")
    return b[0]


for _code, _name, (_enc, _dec) in [
    (AttrType.LIFETIME, "LIFETIME", _u32("LIFETIME")),
    (AttrType.CONNECTION_ID, "CONNECTION-ID", _u32("CONNECTION-ID")),
    (AttrType.XOR_PEER_ADDRESS, "XOR-PEER-ADDRESS", _xor_address("XOR-PEER-ADDRESS")),
    (AttrType.XOR_RELAYED_ADDRESS, "XOR-RELAYED-ADDRESS", _xor_address("XOR-RELAYED-ADDRESS")),
    (AttrType.REQUESTED_TRANSPORT, "REQUESTED-TRANSPORT",
     (lambda v, tid: struct.pack("!B3x", v), _dec_transport)),
]:
    if _code not in ATTRIBUTES:      # the STUN codec may grow them; keep its version then
        register_attribute(_code, _name, _enc, _dec)


@dataclass(frozen=True, slots=True)
class TurnCredentials:
    username: str
    password: str

    @classmethod
    def from_shared_secret(cls, secret: str | bytes, user: str = "", *, now: float,
                           ttl: float = 86400.0) -> TurnCredentials:
        """coturn ``use-auth-secret`` (TURN REST API) credentials valid until ``now + ttl``
        (``now`` is wall-clock seconds): username "expiry:user", password
        base64(HMAC-SHA1(secret, username))."""
        expiry = int(now + ttl)
        username = f"{expiry}:{user}" if user else str(expiry)
        key = secret.encode() if isinstance(secret, str) else secret
        digest = hmac.new(key, username.encode(), hashlib.sha1).digest()
        return cls(username, base64.b64encode(digest).decode("ascii"))


# --- events --------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Allocated:
    request_id: bytes
    relayed: Address
    mapped: Address | None
    lifetime: int


@dataclass(frozen=True, slots=True)
class Refreshed:
    request_id: bytes
    lifetime: int


@dataclass(frozen=True, slots=True)
class PermissionCreated:
    request_id: bytes
    peers: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class PeerConnected:
    """Our Connect succeeded: bind a data connection with ``connection_id``."""

    request_id: bytes
    peer: Address
    connection_id: int


@dataclass(frozen=True, slots=True)
class ConnectionAttempted:
    """A peer connected to our relayed address: bind ``connection_id`` within 30 s."""

    peer: Address
    connection_id: int


@dataclass(frozen=True, slots=True)
class RequestFailed:
    request_id: bytes
    method: int
    code: int | None            # STUN error code; None for a timeout or a local failure
    reason: str
    response: StunMessage | None = None


@dataclass(frozen=True, slots=True)
class AllocationExpired:
    reason: str


Event = (Allocated | Refreshed | PermissionCreated | PeerConnected | ConnectionAttempted
         | RequestFailed | AllocationExpired)


class State(enum.Enum):
    IDLE = "idle"
    ALLOCATING = "allocating"
    ALLOCATED = "allocated"
    CLOSED = "closed"


@dataclass(slots=True)
class _Pending:
    request_id: bytes
    method: int
    attrs: list[tuple[int, Any]]
    deadline: float
    internal: bool            # started by a timer, not by the caller
    authed: bool
    retries: int = 0


@dataclass
class _Auth:
    realm: str | None = None
    nonce: str | None = None
    key: bytes | None = None


@dataclass
class _Timers:
    refresh_at: float | None = None
    expires_at: float | None = None
    permissions: dict[str, float] = field(default_factory=dict)   # ip -> next refresh


class TurnClientProtocol:
    """One TURN allocation over one TCP control connection (sans-IO)."""

    def __init__(self, credentials: TurnCredentials, *, lifetime: int = DEFAULT_LIFETIME,
                 transaction_timeout: float = 10.0, auto_refresh: bool = True,
                 software: str | None = "pyholepunch") -> None:
        self.credentials = credentials
        self.lifetime = lifetime
        self.transaction_timeout = transaction_timeout
        self.auto_refresh = auto_refresh
        self.software = software
        self.state = State.IDLE
        self.relayed: Address | None = None
        self.mapped: Address | None = None
        self._auth = _Auth()
        self._timers = _Timers()
        self._framer = StreamFramer()
        self._out = bytearray()
        self._events: list[Event] = []
        self._pending: dict[bytes, _Pending] = {}

    # --- I/O surface ---------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        data = bytes(self._out)
        self._out.clear()
        return data

    def next_event(self) -> Event | None:
        return self._events.pop(0) if self._events else None

    def get_timer(self) -> float | None:
        times = [p.deadline for p in self._pending.values()]
        if self.state is State.ALLOCATED:
            t = self._timers
            if t.expires_at is not None:
                times.append(t.expires_at)
            if self.auto_refresh:
                if t.refresh_at is not None:
                    times.append(t.refresh_at)
                times.extend(t.permissions.values())
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        for tid, p in list(self._pending.items()):
            if now >= p.deadline:
                del self._pending[tid]
                self._fail(p, None, f"no response within {self.transaction_timeout:g} s")
        if self.state is not State.ALLOCATED:
            return
        t = self._timers
        if t.expires_at is not None and now >= t.expires_at:
            self._expire("allocation lifetime ran out without a successful refresh")
            return
        if not self.auto_refresh:
            return
        if t.refresh_at is not None and now >= t.refresh_at:
            t.refresh_at = None     # re-armed by the Refresh response
            self._request(Method.REFRESH, [(AttrType.LIFETIME, self.lifetime)], now,
                          internal=True)
        due = [ip for ip, at in t.permissions.items() if now >= at]
        if due:
            for ip in due:
                t.permissions[ip] = now + PERMISSION_REFRESH
            self._request(Method.CREATE_PERMISSION, _peer_attrs(due), now, internal=True)

    def receive_data(self, data: bytes, now: float) -> None:
        for raw in self._framer.feed(data):
            self._handle(StunMessage.parse(raw), now)

    def connection_lost(self, reason: str) -> None:
        """The control connection ended: everything in flight fails, the allocation is gone."""
        for p in list(self._pending.values()):
            self._fail(p, None, reason)
        self._pending.clear()
        if self.state is not State.CLOSED:
            self.state = State.CLOSED
            self._events.append(AllocationExpired(reason))

    # --- requests ------------------------------------------------------------------------

    def allocate(self, now: float) -> bytes:
        if self.state is not State.IDLE:
            raise LocalProtocolError(f"cannot allocate in state {self.state.value}")
        self.state = State.ALLOCATING
        attrs: list[tuple[int, Any]] = [(AttrType.REQUESTED_TRANSPORT, TRANSPORT_TCP),
                                        (AttrType.LIFETIME, self.lifetime)]
        return self._request(Method.ALLOCATE, attrs, now)

    def create_permission(self, peers: list[str], now: float) -> bytes:
        self._require_allocated("CreatePermission")
        if not peers:
            raise LocalProtocolError("CreatePermission needs at least one peer address")
        return self._request(Method.CREATE_PERMISSION, _peer_attrs(peers), now)

    def connect(self, peer: Address, now: float) -> bytes:
        self._require_allocated("Connect")
        return self._request(Method.CONNECT, [(AttrType.XOR_PEER_ADDRESS, peer)], now)

    def refresh(self, lifetime: int, now: float) -> bytes:
        self._require_allocated("Refresh")
        return self._request(Method.REFRESH, [(AttrType.LIFETIME, lifetime)], now)

    def connection_bind(self, connection_id: int) -> tuple[bytes, bytes]:
        """(transaction id, bytes) of a ConnectionBind for a new data connection."""
        self._require_allocated("ConnectionBind")
        tid = os.urandom(12)
        msg = self._build(Method.CONNECTION_BIND, [(AttrType.CONNECTION_ID, connection_id)], tid)
        return tid, msg

    def connection_bind_result(self, tid: bytes, response: StunMessage) -> RequestFailed | None:
        """Judge the ConnectionBind response read from the data connection: None on
        success (the connection is raw from the next byte on), else why it failed. A stale
        nonce is learned so the caller can retry on a fresh data connection."""
        if response.transaction_id != tid:
            return RequestFailed(tid, Method.CONNECTION_BIND, None,
                                 "response to another transaction on the data connection")
        if response.cls == MessageClass.SUCCESS:
            return None
        err = response.error
        code = err.code if err else None
        if code in (401, 438):
            self._learn_nonce(response)
        return RequestFailed(tid, Method.CONNECTION_BIND, code, _reason(response), response)

    # --- internals -----------------------------------------------------------------------

    def _require_allocated(self, what: str) -> None:
        if self.state is not State.ALLOCATED:
            raise LocalProtocolError(f"{what} needs an allocation (state {self.state.value})")

    def _build(self, method: int, attrs: list[tuple[int, Any]], tid: bytes) -> bytes:
        msg = StunMessage(method, MessageClass.REQUEST, tid, list(attrs))
        if self.software:
            msg.add(AttrType.SOFTWARE, self.software)
        a = self._auth
        if a.nonce is not None and a.realm is not None and a.key is not None:
            msg.add(AttrType.USERNAME, self.credentials.username)
            msg.add(AttrType.REALM, a.realm)
            msg.add(AttrType.NONCE, a.nonce)
            return msg.encode(key=a.key, fingerprint=True)
        return msg.encode(fingerprint=True)

    def _request(self, method: int, attrs: list[tuple[int, Any]], now: float, *,
                 internal: bool = False, request_id: bytes | None = None,
                 retries: int = 0) -> bytes:
        tid = os.urandom(12)
        self._out += self._build(method, attrs, tid)
        self._pending[tid] = _Pending(request_id or tid, method, attrs,
                                      now + self.transaction_timeout, internal,
                                      self._auth.key is not None, retries)
        return request_id or tid

    def _learn_nonce(self, msg: StunMessage) -> bool:
        realm, nonce = msg.get(AttrType.REALM), msg.get(AttrType.NONCE)
        if not isinstance(nonce, str):
            return False
        if isinstance(realm, str) and realm != self._auth.realm:
            self._auth.realm = realm
            self._auth.key = long_term_key(self.credentials.username, realm,
                                           self.credentials.password)
        self._auth.nonce = nonce
        return self._auth.realm is not None

    def _handle(self, msg: StunMessage, now: float) -> None:
        if msg.cls == MessageClass.INDICATION:
            if msg.method == Method.CONNECTION_ATTEMPT:
                peer, cid = msg.get(AttrType.XOR_PEER_ADDRESS), msg.get(AttrType.CONNECTION_ID)
                if isinstance(peer, tuple) and isinstance(cid, int):
                    self._events.append(ConnectionAttempted(peer, cid))
                    return
            log.debug("ignoring indication %r", msg)
            return
        if msg.cls == MessageClass.REQUEST:
            log.debug("ignoring request from the server %r", msg)
            return
        p = self._pending.pop(msg.transaction_id, None)
        if p is None:
            log.debug("response to no pending transaction: %r", msg)
            return
        if msg.cls == MessageClass.ERROR:
            err = msg.error
            code = err.code if err else None
            # 401 on an unauthenticated try, or 438: learn realm/nonce and go again.
            if ((code == 401 and not p.authed) or code == 438) and p.retries < MAX_AUTH_RETRIES \
                    and self._learn_nonce(msg):
                self._request(p.method, p.attrs, now, internal=p.internal,
                              request_id=p.request_id, retries=p.retries + 1)
                return
            self._fail(p, code, _reason(msg), msg)
            return
        if p.authed and self._auth.key is not None and msg.has_integrity \
                and not msg.verify_integrity(self._auth.key):
            self._fail(p, None, "response failed its MESSAGE-INTEGRITY check", msg)
            return
        self._succeed(p, msg, now)

    def _succeed(self, p: _Pending, msg: StunMessage, now: float) -> None:
        t = self._timers
        if p.method == Method.ALLOCATE:
            relayed = msg.get(AttrType.XOR_RELAYED_ADDRESS)
            if not isinstance(relayed, tuple):
                self._fail(p, None, "Allocate success without XOR-RELAYED-ADDRESS", msg)
                return
            lifetime = int(msg.get(AttrType.LIFETIME, self.lifetime))
            self.state, self.relayed, self.mapped = State.ALLOCATED, relayed, msg.mapped_address
            self._arm_lifetime(lifetime, now)
            self._events.append(Allocated(p.request_id, relayed, self.mapped, lifetime))
        elif p.method == Method.REFRESH:
            lifetime = int(msg.get(AttrType.LIFETIME, 0))
            if lifetime == 0:
                self.state = State.CLOSED
                t.refresh_at = t.expires_at = None
            else:
                self._arm_lifetime(lifetime, now)
            if not p.internal:
                self._events.append(Refreshed(p.request_id, lifetime))
        elif p.method == Method.CREATE_PERMISSION:
            peers = tuple(str(v[0]) for k, v in p.attrs if k == AttrType.XOR_PEER_ADDRESS)
            for ip in peers:
                t.permissions[ip] = now + PERMISSION_REFRESH
            if not p.internal:
                self._events.append(PermissionCreated(p.request_id, peers))
        elif p.method == Method.CONNECT:
            cid = msg.get(AttrType.CONNECTION_ID)
            if not isinstance(cid, int):
                self._fail(p, None, "Connect success without CONNECTION-ID", msg)
                return
            self._events.append(PeerConnected(p.request_id, p.attrs[0][1], cid))

    def _arm_lifetime(self, lifetime: int, now: float) -> None:
        # Refresh a minute early, or half-way through a short lifetime.
        self._timers.expires_at = now + lifetime
        self._timers.refresh_at = now + max(lifetime / 2, lifetime - 60)

    def _fail(self, p: _Pending, code: int | None, reason: str,
              msg: StunMessage | None = None) -> None:
        if p.method == Method.ALLOCATE and self.state is State.ALLOCATING:
            self.state = State.IDLE
        if p.internal:
            log.warning("TURN background %s failed: %s %s", _method_name(p.method), code, reason)
            # A lost allocation is final; a failed permission refresh is retried next round.
            if p.method == Method.REFRESH and code in (437, 401, 441, None):
                self._expire(f"refresh failed: {code or ''} {reason}".strip())
            return
        self._events.append(RequestFailed(p.request_id, p.method, code, reason, msg))

    def _expire(self, reason: str) -> None:
        self.state = State.CLOSED
        self._timers = _Timers()
        self._events.append(AllocationExpired(reason))


def _peer_attrs(peers: list[str]) -> list[tuple[int, Any]]:
    # The port is ignored for permissions (RFC 8656 §9.1); 0 keeps the intent visible.
    return [(AttrType.XOR_PEER_ADDRESS, (ip, 0)) for ip in peers]


def _reason(msg: StunMessage) -> str:
    err = msg.error
    if err is None:
        return "error response without ERROR-CODE"
    return err.reason.rstrip("\x00 ")     # coturn pads the phrase with NULs


def _method_name(method: int) -> str:
    try:
        return Method(method).name
    except ValueError:
        return f"0x{method:03X}"
