"""Signaling codec and state machine: bytes in, messages out, errors named. No I/O, no sleeps."""
from __future__ import annotations

import os
import struct

import msgpack
import pytest

from pyholepunch.errors import LocalProtocolError, RemoteProtocolError
from pyholepunch.signal.auth import TokenBucket, check_token, make_token
from pyholepunch.signal.connection import (
    ClockEstimator,
    ConnectionClosed,
    Role,
    SignalConnection,
    State,
    common_start,
)
from pyholepunch.signal.protocol import (
    MESSAGES,
    Connect,
    Error,
    ErrorCode,
    FrameDecoder,
    Hello,
    Ping,
    Pong,
    Punch,
    Register,
    Registered,
    Relay,
    RelayGrant,
    Result,
    Update,
    decode_body,
    encode_frame,
)


def _cand(ip: str, port: int, origin: str = "stun", iface: str = "") -> list[object]:
    return [ip, port, "ipv6" if ":" in ip else "ipv4", iface, origin]


PEER = {"peer_id": "a" * 32, "name": "bob", "public_key": b"k" * 32, "cert": b"der",
        "candidates": [_cand("198.51.100.7", 4000), _cand("2001:db8::7", 4000, "stun", "eth0")],
        "profiles": [{"transport": "tcp"}]}
SAMPLES = [
    Hello(nonce=b"n" * 32, server_time=1.5, server_id=b"s" * 32),
    Register(name="alice", public_key=b"k" * 32, challenge=b"n" * 32, signature=b"x" * 64,
             token="tok", cert=b"der", profiles=[{"transport": "tcp", "mapping": "none"}],
             candidates=[_cand("10.0.0.2", 5000, "host")]),
    Registered(peer_id="b" * 32, offset=-0.25, rtt=0.04),
    Ping(t1=10.0, offset=0.1, rtt=0.02), Pong(t1=1.0, t2=2.0, t3=2.5),
    Update(candidates=[_cand("192.0.2.1", 1)]),
    Connect(session="sess-0001", target="bob",
            candidates=[_cand("10.1.2.3", 999), _cand("2001:db8::3", 999)]),
    Punch(session="sess-0001", role="responder", start_at=123.25, peer=PEER, plan={"steps": []}),
    Result(session="sess-0001", outcome="direct", stats={"syns": 3}),
    Relay(session="sess-0001"),
    RelayGrant(session="sess-0001", token=b"t" * 16, relay=("203.0.113.1", 3478)),
    Error(code=404, reason="no", session="sess-0001", fatal=False),
]


def body(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def frame(obj: object) -> bytes:
    b = body(obj)
    return struct.pack("!I", len(b)) + b


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: m.TYPE)
def test_every_message_round_trips(msg: object) -> None:
    data = encode_frame(msg)  # type: ignore[arg-type]
    assert struct.unpack("!I", data[:4])[0] == len(data) - 4
    again = decode_body(data[4:])
    assert again == msg
    assert encode_frame(again) == data


def test_all_message_types_covered() -> None:
    assert {m.TYPE for m in SAMPLES} == set(MESSAGES)


def test_decoder_reassembles_byte_by_byte_and_batches() -> None:
    stream = b"".join(encode_frame(m) for m in SAMPLES)
    dec = FrameDecoder()
    bodies = [b for i in range(len(stream)) for b in dec.feed(stream[i:i + 1])]
    assert [decode_body(b) for b in bodies] == SAMPLES
    assert FrameDecoder().feed(stream) == bodies and dec.buffered == 0


def test_oversized_frame_refused_from_its_header_alone() -> None:
    dec = FrameDecoder(max_frame=1024)
    with pytest.raises(RemoteProtocolError, match="1025 bytes exceeds 1024") as e:
        dec.feed(struct.pack("!I", 1025))   # no body sent: the header is enough
    assert e.value.code == ErrorCode.FRAME_TOO_LARGE
    with pytest.raises(LocalProtocolError, match="exceeds 100"):
        encode_frame(Result(session="sess-0001", outcome="failed", stats={"x": "y" * 200}), 100)


@pytest.mark.parametrize("raw, match", [
    (b"\xc1", "undecodable"),                                   # reserved msgpack byte
    (body([1, 2]), "not a map"),
    (body({"t": "nope"}), "unknown message type 'nope'"),
    (body({"x": 1}), "unknown message type None"),
    (body({"t": "ping"}), "ping: missing field 't1'"),
    (body({"t": "ping", "t1": "soon"}), r"ping.t1: expected a finite number"),
    (body({"t": "ping", "t1": float("nan")}), "finite"),
    (body({"t": "ping", "t1": True}), "finite"),
    (body({"t": "relay", "session": "short"}), "bad session id"),
    (body({"t": "connect", "session": "sess-0001", "target": "bob",
           "candidates": [["not-an-ip", 1]]}), "connect.candidates"),
    (body({"t": "connect", "session": "sess-0001", "target": "bob",
           "candidates": [["10.0.0.1", 70000]]}), "bad candidate"),
    (body({"t": "result", "session": "sess-0001", "outcome": "won"}), "not one of direct"),
    (body({"t": "hello", "nonce": b"short", "server_time": 1.0, "server_id": b"s" * 32}),
     "hello.nonce: expected 32 bytes"),
    (body({"t": "ping", "t1": 1.0}) + b"\x00", "undecodable"),  # trailing bytes
    (msgpack.packb({"t": "ping", "t1": msgpack.ExtType(1, b"x")}), "ping.t1"),
    (body({1: 2}), "undecodable"),                              # non-string key
])
def test_garbled_bodies_raise_remote_protocol_error(raw: bytes, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match) as e:
        decode_body(raw)
    assert e.value.code == ErrorCode.MALFORMED


def _registered_pair() -> tuple[SignalConnection, SignalConnection]:
    s, c = SignalConnection(Role.SERVER), SignalConnection(Role.CLIENT)
    for sender, receiver, msg in [
        (s, c, SAMPLES[0]), (c, s, SAMPLES[1]), (s, c, Ping(t1=1.0)),
        (c, s, Pong(t1=1.0, t2=2.0, t3=2.0)), (s, c, SAMPLES[2]),
    ]:
        assert receiver.receive_data(sender.send(msg)) == [msg]
    assert s.state is c.state is State.READY
    return s, c


def test_state_machine_happy_path_and_counts() -> None:
    s, c = _registered_pair()
    assert (s.frames_out, s.frames_in, c.frames_out, c.frames_in) == (3, 2, 2, 3)


def test_illegal_moves() -> None:
    s, c = SignalConnection(Role.SERVER), SignalConnection(Role.CLIENT)
    with pytest.raises(LocalProtocolError, match="connect not allowed from client in state start"):
        c.send(Connect(session="sess-0001", target="bob"))
    with pytest.raises(LocalProtocolError, match="punch not allowed from server"):
        s.send(Punch(session="sess-0001", role="initiator", start_at=1.0, peer=PEER))
    with pytest.raises(RemoteProtocolError, match="register not allowed") as e:
        s.receive_data(encode_frame(SAMPLES[1]))   # REGISTER before HELLO
    assert e.value.code == ErrorCode.UNEXPECTED
    s, c = _registered_pair()
    with pytest.raises(LocalProtocolError, match="register not allowed"):
        c.send(SAMPLES[1])
    with pytest.raises(RemoteProtocolError, match="hello not allowed"):
        c.receive_data(encode_frame(SAMPLES[0]))


def test_errors_fatal_and_not() -> None:
    s, c = _registered_pair()
    soft = Error(code=404, reason="nobody", session="sess-0001", fatal=False)
    assert c.receive_data(s.send(soft)) == [soft]
    assert c.state is State.READY
    hard = Error(code=429, reason="slow down")
    assert c.receive_data(s.send(hard)) == [ConnectionClosed(hard)]
    assert s.state is c.state is State.CLOSED
    with pytest.raises(LocalProtocolError, match="closed"):
        s.send(Ping(t1=1.0))
    assert c.receive_data(encode_frame(Ping(t1=1.0))) == []


def test_eof_closes() -> None:
    c = SignalConnection(Role.CLIENT)
    assert c.receive_data(b"") == [ConnectionClosed(None)] and c.state is State.CLOSED


def test_clock_estimator_keeps_min_rtt_sample() -> None:
    est = ClockEstimator(window=4)
    assert est.best is None and est.offset == 0.0
    # remote clock = local + 3.0; symmetric 10 ms path; one sample delayed 40 ms on the way back
    est.add(100.0, 103.005, 103.006, 100.011)
    est.add(101.0, 104.005, 104.006, 101.051)        # queued reply: offset looks -20 ms off
    assert est.rtt == pytest.approx(0.010)
    assert est.offset == pytest.approx(3.0)
    for i in range(4):                               # window slides the old best out
        est.add(200.0 + i, 203.0 + i + 0.02, 203.0 + i + 0.02, 200.0 + i + 0.04)
    assert est.rtt == pytest.approx(0.04) and est.offset == pytest.approx(3.0)
    assert est.count == 6


def test_common_start() -> None:
    assert common_start(1000.0, [0.040, 0.100], 0.02) == pytest.approx(1000.07)
    assert common_start(5.0, [], 0.01) == pytest.approx(5.01)
    # The margin grows with the jitterier peer's RTT spread, and no further than the cap.
    assert common_start(1000.0, [0.040, 0.040], 0.01, [0.002, 0.030]) == pytest.approx(1000.06)
    assert common_start(1000.0, [0.040], 0.01, [9.0]) == pytest.approx(1000.0 + 0.02 + 0.01 + 0.25)


def test_rtt_spread_measures_jitter() -> None:
    est = ClockEstimator(window=4)
    assert est.spread == 0.0
    for rtt in (0.041, 0.040, 0.043):
        est.add(100.0, 100.0 + rtt / 2, 100.0 + rtt / 2, 100.0 + rtt)
    assert est.spread == pytest.approx(0.003)
    est.add(200.0, 200.03, 200.03, 200.06)           # one 20 ms late round trip
    assert est.spread == pytest.approx(0.020) and est.rtt == pytest.approx(0.040)
    for _ in range(4):                               # it leaves the window
        est.add(300.0, 300.02, 300.02, 300.04)
    assert est.spread == pytest.approx(0.0)


def test_tokens() -> None:
    assert check_token(None, None, 0) is None
    assert check_token("s3cret", None, 0) is ErrorCode.TOKEN_REQUIRED
    assert check_token("s3cret", "s3cret", 0) is None
    assert check_token("s3cret", "wrong", 0) is ErrorCode.TOKEN_INVALID
    tok = make_token("s3cret", 1000)
    assert check_token("s3cret", tok, 999.0) is None
    assert check_token("s3cret", tok, 1000.5) is ErrorCode.TOKEN_EXPIRED
    assert check_token("other", tok, 0) is ErrorCode.TOKEN_INVALID
    forged = tok.replace(".1000.", ".9999.")
    assert check_token("s3cret", forged, 0) is ErrorCode.TOKEN_INVALID


def test_token_bucket() -> None:
    b = TokenBucket(rate=10, burst=3, now=0.0)
    assert [b.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert b.take(0.1) and not b.take(0.1)


def test_nonce_is_fresh() -> None:
    assert os.urandom(32) != os.urandom(32)   # sanity for the replay defence's assumption
