"""The sans-IO TURN client, stepped by hand: bytes in, bytes and events out, time passed in."""
from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from pyholepunch.errors import LocalProtocolError, RemoteProtocolError
from pyholepunch.relay.turn_proto import (
    Allocated,
    AllocationExpired,
    ConnectionAttempted,
    Event,
    PeerConnected,
    PermissionCreated,
    RequestFailed,
    State,
    TurnClientProtocol,
    TurnCredentials,
)
from pyholepunch.stun.codec import (
    AttrType,
    ErrorValue,
    MessageClass,
    Method,
    StreamFramer,
    StunMessage,
    long_term_key,
)

CREDS = TurnCredentials("alice", "wonderland")
REALM = "example.org"
KEY = long_term_key("alice", REALM, "wonderland")
RELAYED = ("198.51.100.9", 49152)
MAPPED = ("203.0.113.5", 40000)


def sent(client: TurnClientProtocol) -> list[StunMessage]:
    return [StunMessage.parse(m) for m in StreamFramer().feed(client.data_to_send())]


def events(client: TurnClientProtocol) -> list[Event]:
    out: list[Event] = []
    while (e := client.next_event()) is not None:
        out.append(e)
    return out


def reply(req: StunMessage, cls: MessageClass, *attrs: tuple[int, object],
          key: bytes | None = None) -> bytes:
    msg = StunMessage(req.method, cls, req.transaction_id, list(attrs))
    return msg.encode(key=key)


def challenge(req: StunMessage, code: int = 401, nonce: str = "n1") -> bytes:
    return reply(req, MessageClass.ERROR, (AttrType.ERROR_CODE, ErrorValue(code, "")),
                 (AttrType.REALM, REALM), (AttrType.NONCE, nonce))


def allocated(now: float = 0.0, lifetime: int = 600, **kw: object) -> TurnClientProtocol:
    client = TurnClientProtocol(CREDS, **kw)  # type: ignore[arg-type]
    rid = client.allocate(now)
    (req,) = sent(client)
    client.receive_data(challenge(req), now)
    (req,) = sent(client)
    client.receive_data(reply(req, MessageClass.SUCCESS, (AttrType.XOR_RELAYED_ADDRESS, RELAYED),
                              (AttrType.XOR_MAPPED_ADDRESS, MAPPED),
                              (AttrType.LIFETIME, lifetime), key=KEY), now)
    assert events(client) == [Allocated(rid, RELAYED, MAPPED, lifetime)]
    return client


def test_shared_secret_credentials_follow_the_turn_rest_scheme() -> None:
    creds = TurnCredentials.from_shared_secret("S", "bob", now=1_700_000_000.4, ttl=3600)
    assert creds.username == "1700003600:bob"
    expected = hmac.new(b"S", b"1700003600:bob", hashlib.sha1).digest()
    assert base64.b64decode(creds.password) == expected
    assert TurnCredentials.from_shared_secret(b"S", now=10, ttl=5).username == "15"


def test_allocate_runs_the_401_dance_and_keeps_the_request_id() -> None:
    client = TurnClientProtocol(CREDS)
    rid = client.allocate(0.0)
    (first,) = sent(client)
    assert first.method == Method.ALLOCATE and first.cls == MessageClass.REQUEST
    assert first.get(AttrType.REQUESTED_TRANSPORT) == 6
    assert not first.has_integrity and AttrType.USERNAME not in first
    client.receive_data(challenge(first), 0.0)
    assert events(client) == []
    (second,) = sent(client)
    assert second.transaction_id != first.transaction_id
    assert second.get(AttrType.USERNAME) == "alice" and second.get(AttrType.REALM) == REALM
    assert second.get(AttrType.NONCE) == "n1" and second.verify_integrity(KEY)
    client.receive_data(reply(second, MessageClass.SUCCESS,
                              (AttrType.XOR_RELAYED_ADDRESS, RELAYED),
                              (AttrType.LIFETIME, 600), key=KEY), 0.0)
    assert events(client) == [Allocated(rid, RELAYED, None, 600)]
    assert client.state is State.ALLOCATED
    with pytest.raises(LocalProtocolError, match="cannot allocate in state allocated"):
        client.allocate(0.0)


def test_wrong_credentials_fail_once_authenticated() -> None:
    client = TurnClientProtocol(CREDS)
    rid = client.allocate(0.0)
    client.receive_data(challenge(sent(client)[0]), 0.0)
    (authed,) = sent(client)
    client.receive_data(challenge(authed), 0.0)          # 401 again: the password is wrong
    (failed,) = events(client)
    assert isinstance(failed, RequestFailed) and failed.request_id == rid and failed.code == 401
    assert sent(client) == [] and client.state is State.IDLE


def test_stale_nonce_is_retried_with_the_new_nonce_then_gives_up() -> None:
    client = allocated()
    rid = client.create_permission(["203.0.113.7"], 1.0)
    for i in range(3):
        (req,) = sent(client)
        client.receive_data(challenge(req, 438, nonce=f"fresh{i}"), 1.0)
    (req,) = sent(client)
    assert req.get(AttrType.NONCE) == "fresh2" and req.verify_integrity(KEY)
    client.receive_data(challenge(req, 438, nonce="again"), 1.0)
    (failed,) = events(client)
    assert isinstance(failed, RequestFailed) and failed.request_id == rid and failed.code == 438


def test_permission_connect_and_incoming_attempt() -> None:
    client = allocated()
    rid = client.create_permission(["203.0.113.7"], 1.0)
    (req,) = sent(client)
    assert req.get(AttrType.XOR_PEER_ADDRESS) == ("203.0.113.7", 0)
    client.receive_data(reply(req, MessageClass.SUCCESS, key=KEY), 1.0)
    assert events(client) == [PermissionCreated(rid, ("203.0.113.7",))]
    rid = client.connect(("203.0.113.7", 4000), 2.0)
    (req,) = sent(client)
    client.receive_data(reply(req, MessageClass.SUCCESS, (AttrType.CONNECTION_ID, 77), key=KEY), 2.0)
    assert events(client) == [PeerConnected(rid, ("203.0.113.7", 4000), 77)]
    ind = StunMessage(Method.CONNECTION_ATTEMPT, MessageClass.INDICATION, b"x" * 12,
                      [(AttrType.XOR_PEER_ADDRESS, ("203.0.113.8", 5555)),
                       (AttrType.CONNECTION_ID, 78)])
    client.receive_data(bytes(ind)[:7], 3.0)              # split across reads
    client.receive_data(bytes(ind)[7:], 3.0)
    assert events(client) == [ConnectionAttempted(("203.0.113.8", 5555), 78)]
    tid, data = client.connection_bind(78)
    (bind,) = [StunMessage.parse(data)]
    assert bind.method == Method.CONNECTION_BIND and bind.get(AttrType.CONNECTION_ID) == 78
    assert bind.verify_integrity(KEY)
    ok = StunMessage.parse(reply(bind, MessageClass.SUCCESS, key=KEY))
    assert client.connection_bind_result(tid, ok) is None
    stale = StunMessage.parse(challenge(bind, 438, nonce="n9"))
    failure = client.connection_bind_result(tid, stale)
    assert failure is not None and failure.code == 438
    assert StunMessage.parse(client.connection_bind(78)[1]).get(AttrType.NONCE) == "n9"


def test_refresh_and_permission_timers() -> None:
    client = allocated(lifetime=600)
    client.create_permission(["203.0.113.7"], 0.0)
    client.receive_data(reply(sent(client)[0], MessageClass.SUCCESS, key=KEY), 0.0)
    events(client)
    assert client.get_timer() == 240.0                   # the permission refresh comes first
    client.handle_timer(240.0)
    (perm,) = sent(client)
    assert perm.method == Method.CREATE_PERMISSION
    client.receive_data(reply(perm, MessageClass.SUCCESS, key=KEY), 240.0)
    assert client.get_timer() == 480.0
    client.handle_timer(480.0)
    client.receive_data(reply(sent(client)[0], MessageClass.SUCCESS, key=KEY), 480.0)
    assert client.get_timer() == 540.0                   # a minute before the lifetime ends
    client.handle_timer(540.0)
    (refresh,) = sent(client)
    assert refresh.method == Method.REFRESH and refresh.get(AttrType.LIFETIME) == 600
    client.receive_data(reply(refresh, MessageClass.SUCCESS, (AttrType.LIFETIME, 600), key=KEY),
                        541.0)
    assert events(client) == []                          # background work is silent
    assert client.state is State.ALLOCATED
    assert client.get_timer() == 720.0                   # next permission refresh


def test_allocation_expires_without_refresh() -> None:
    client = allocated(lifetime=600, auto_refresh=False)
    assert client.get_timer() == 600.0
    client.handle_timer(599.0)
    assert events(client) == []
    client.handle_timer(600.0)
    (expired,) = events(client)
    assert isinstance(expired, AllocationExpired) and "lifetime ran out" in expired.reason
    assert client.state is State.CLOSED and client.get_timer() is None
    with pytest.raises(LocalProtocolError, match="Connect needs an allocation"):
        client.connect(("203.0.113.7", 1), 601.0)


def test_refresh_rejected_by_the_server_ends_the_allocation() -> None:
    client = allocated(lifetime=100)
    client.handle_timer(50.0)
    (refresh,) = sent(client)
    client.receive_data(reply(refresh, MessageClass.ERROR,
                              (AttrType.ERROR_CODE, ErrorValue(437, "Allocation Mismatch"))), 50.0)
    (expired,) = events(client)
    assert isinstance(expired, AllocationExpired) and "437" in expired.reason


def test_transaction_timeout_and_lost_connection() -> None:
    client = allocated(transaction_timeout=5.0)
    rid = client.connect(("203.0.113.7", 4000), 10.0)
    assert client.get_timer() == 15.0
    client.handle_timer(15.0)
    (failed,) = events(client)
    assert isinstance(failed, RequestFailed) and failed.request_id == rid and failed.code is None
    rid = client.connect(("203.0.113.7", 4000), 20.0)
    client.connection_lost("reset")
    first, second = events(client)
    assert first == RequestFailed(rid, Method.CONNECT, None, "reset")
    assert second == AllocationExpired("reset")


def test_bad_bytes_and_bad_responses() -> None:
    client = allocated()
    with pytest.raises(RemoteProtocolError, match="stream framing"):
        client.receive_data(b"\xff" * 24, 1.0)
    client = allocated()
    rid = client.connect(("203.0.113.7", 4000), 1.0)
    (req,) = sent(client)
    client.receive_data(reply(req, MessageClass.SUCCESS), 1.0)   # no CONNECTION-ID
    (failed,) = events(client)
    assert isinstance(failed, RequestFailed) and failed.request_id == rid
    assert "without CONNECTION-ID" in failed.reason
    rid = client.connect(("203.0.113.7", 4000), 1.0)
    (req,) = sent(client)
    forged = reply(req, MessageClass.SUCCESS, (AttrType.CONNECTION_ID, 5), key=b"wrong key")
    client.receive_data(forged, 1.0)
    (failed,) = events(client)
    assert isinstance(failed, RequestFailed) and "MESSAGE-INTEGRITY" in failed.reason
    # A response nobody asked for is ignored, not an error.
    client.receive_data(reply(req, MessageClass.SUCCESS, key=KEY), 1.0)
    assert events(client) == []
    with pytest.raises(LocalProtocolError, match="at least one peer"):
        client.create_permission([], 1.0)
