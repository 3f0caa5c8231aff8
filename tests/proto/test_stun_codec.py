"""STUN codec: RFC 5769 vectors byte for byte, round trips, and every parse error."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyholepunch.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from pyholepunch.stun import codec
from pyholepunch.stun.codec import (
    AttrType,
    ChangeRequest,
    ErrorValue,
    MessageClass,
    Method,
    StreamFramer,
    StunMessage,
    long_term_key,
    short_term_key,
)

VECTORS = json.loads((Path(__file__).parent.parent / "data" / "rfc5769.json").read_text())["vectors"]
TID = bytes(range(12))


def _vector(name: str) -> tuple[bytes, dict[str, str]]:
    v = VECTORS[name]
    return bytes.fromhex(v["hex"]), v


def _key(v: dict[str, str]) -> bytes:
    if "realm" in v:
        return long_term_key(v["username"], v["realm"], v["password"])
    return short_term_key(v["password"])


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_rfc5769_vector_parses_verifies_and_reencodes(name: str) -> None:
    data, v = _vector(name)
    msg = StunMessage.parse(data)
    assert msg.verify_integrity(_key(v))
    assert not msg.verify_integrity(b"wrong password")
    pad = bytes.fromhex(v["padding"])
    assert msg.encode(padding=pad) == data
    # recomputing MESSAGE-INTEGRITY and FINGERPRINT from scratch gives the same bytes
    plain = [(t, val) for t, val in msg.attributes
             if t not in (AttrType.MESSAGE_INTEGRITY, AttrType.FINGERPRINT)]
    rebuilt = StunMessage(msg.method, msg.cls, msg.transaction_id, plain)
    assert rebuilt.encode(key=_key(v), fingerprint=AttrType.FINGERPRINT in msg, padding=pad) == data


def test_rfc5769_decoded_values() -> None:
    req = StunMessage.parse(_vector("sample_request")[0])
    assert (req.method, req.cls) == (Method.BINDING, MessageClass.REQUEST)
    assert req.get(AttrType.SOFTWARE) == "STUN test client"
    assert req.get(AttrType.USERNAME) == "evtj:h6vY"
    assert req.get(AttrType.PRIORITY) == 0x6E0001FF
    v4 = StunMessage.parse(_vector("sample_ipv4_response")[0])
    assert v4.mapped_address == ("192.0.2.1", 32853)
    v6 = StunMessage.parse(_vector("sample_ipv6_response")[0])
    assert v6.mapped_address == ("2001:db8:1234:5678:11:2233:4455:6677", 32853)
    lt = StunMessage.parse(_vector("sample_request_long_term")[0])
    assert lt.get(AttrType.REALM) == "example.org"
    assert lt.get(AttrType.NONCE) == "f//499k954d6OL34oL9FSTvy64sA"


def test_round_trip_every_stun_attribute() -> None:
    msg = StunMessage(Method.BINDING, MessageClass.SUCCESS, TID)
    msg.add(AttrType.XOR_MAPPED_ADDRESS, ("203.0.113.7", 40000))
    msg.add(AttrType.MAPPED_ADDRESS, ("2001:db8::1", 1))
    msg.add(AttrType.RESPONSE_ORIGIN, ("198.51.100.1", 3478))
    msg.add(AttrType.OTHER_ADDRESS, ("198.51.100.2", 3479))
    msg.add(AttrType.CHANGE_REQUEST, ChangeRequest(True, False))
    msg.add(AttrType.ERROR_CODE, ErrorValue(420, "Unknown Attribute"))
    msg.add(AttrType.UNKNOWN_ATTRIBUTES, (0x7777, 0x0002))
    msg.add(AttrType.SOFTWARE, "pyholepunch ✓")
    msg.add(AttrType.RESPONSE_PORT, 5555)
    msg.add(0xC001, b"\x01\x02\x03")             # unknown, comprehension-optional
    data = msg.encode(key=b"k", fingerprint=True)
    back = StunMessage.parse(data)
    assert back.attributes[:10] == msg.attributes
    assert back.verify_integrity(b"k")
    assert back.unknown_required == ()
    assert bytes(back) == data


def test_change_request_flags() -> None:
    for ip in (False, True):
        for port in (False, True):
            msg = StunMessage(Method.BINDING, MessageClass.REQUEST, TID,
                              [(AttrType.CHANGE_REQUEST, ChangeRequest(ip, port))])
            assert StunMessage.parse(bytes(msg)).get(AttrType.CHANGE_REQUEST) == ChangeRequest(ip, port)
    body = struct.pack("!HHI", AttrType.CHANGE_REQUEST, 4, 6)
    raw = struct.pack("!HHI", 1, 8, codec.MAGIC_COOKIE) + TID + body
    assert raw[-1] == 6 and StunMessage.parse(raw).get(AttrType.CHANGE_REQUEST) == ChangeRequest(True, True)


def test_message_type_interleaving() -> None:
    for method in (1, 3, 0xA, 0xB, 0xC, 0xFFF):
        for cls in MessageClass:
            assert codec.split_message_type(codec.message_type(method, cls)) == (method, cls)
    assert codec.message_type(1, MessageClass.SUCCESS) == 0x0101
    assert codec.message_type(1, MessageClass.ERROR) == 0x0111


def test_unknown_comprehension_required_is_reported() -> None:
    msg = StunMessage(Method.BINDING, MessageClass.REQUEST, TID, [(0x0777, b"x"), (0x8777, b"y")])
    back = StunMessage.parse(bytes(msg))
    assert back.unknown_required == (0x0777,)


def test_attributes_after_integrity_are_ignored_except_fingerprint() -> None:
    msg = StunMessage(Method.BINDING, MessageClass.REQUEST, TID)
    data = bytearray(msg.encode(key=b"k"))
    extra = struct.pack("!HH", AttrType.SOFTWARE, 4) + b"evil"
    data += extra
    data[2:4] = struct.pack("!H", len(data) - 20)
    back = StunMessage.parse(bytes(data))
    assert back.get(AttrType.SOFTWARE) is None
    assert back.verify_integrity(b"k")


def _msg_with(attrs: bytes, mtype: int = 1) -> bytes:
    return struct.pack("!HHI", mtype, len(attrs), codec.MAGIC_COOKIE) + TID + attrs


@pytest.mark.parametrize(("data", "field", "text"), [
    (b"\x00\x01", "header", "2 bytes, need 20"),
    (struct.pack("!HHI", 0xC001, 0, codec.MAGIC_COOKIE) + TID, "message type", "top bits"),
    (struct.pack("!HHI", 1, 0, 0xDEADBEEF) + TID, "magic cookie", "0xDEADBEEF"),
    (struct.pack("!HHI", 1, 2, codec.MAGIC_COOKIE) + TID + b"\0\0", "message length", "multiple of 4"),
    (struct.pack("!HHI", 1, 8, codec.MAGIC_COOKIE) + TID, "message length", "header says 8"),
    (_msg_with(struct.pack("!HH", 0x8022, 40) + b"abcd"), "SOFTWARE length", "runs past"),
    (_msg_with(struct.pack("!HHBBH", 0x20, 4, 0, 1, 9)), "XOR-MAPPED-ADDRESS", "IPv4 address of 0"),
    (_msg_with(struct.pack("!HHBBH", 0x01, 8, 0, 7, 9) + b"\0" * 4), "MAPPED-ADDRESS", "family 7"),
    (_msg_with(struct.pack("!HH", 0x03, 2) + b"\0\0\0\0"), "CHANGE-REQUEST", "2 bytes"),
    (_msg_with(struct.pack("!HHHBB", 0x09, 4, 0, 9, 1)), "ERROR-CODE", "class 1"),
    (_msg_with(struct.pack("!HH", 0x8022, 4) + b"\xff\xfe\xfd\xfc"), "SOFTWARE", "not UTF-8"),
    (_msg_with(struct.pack("!HHI", 0x8028, 4, 1)), "FINGERPRINT", "!= 0x"),
    (_msg_with(struct.pack("!HH", 0x000A, 3) + b"\0\0\0\0"), "UNKNOWN-ATTRIBUTES", "odd length"),
    (_msg_with(struct.pack("!HH", 0x0008, 4) + b"\0\0\0\0"), "MESSAGE-INTEGRITY", "4 bytes, need 20"),
])
def test_parse_errors_name_the_field(data: bytes, field: str, text: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        StunMessage.parse(data)
    assert info.value.field == field
    assert text in str(info.value)
    assert isinstance(info.value, ProtocolError)


def test_address_family_error_hints_440() -> None:
    with pytest.raises(ProtocolError) as info:
        StunMessage.parse(_msg_with(struct.pack("!HHBBH", 0x01, 8, 0, 7, 9) + b"\0" * 4))
    assert info.value.code == 440


def test_attribute_after_fingerprint_is_an_error() -> None:
    data = bytearray(StunMessage(Method.BINDING, MessageClass.REQUEST, TID).encode(fingerprint=True))
    data += struct.pack("!HH", 0x8022, 0)
    data[2:4] = struct.pack("!H", len(data) - 20)
    with pytest.raises(RemoteProtocolError, match="attributes follow it"):
        StunMessage.parse(bytes(data))


def test_encode_errors_are_local() -> None:
    with pytest.raises(LocalProtocolError, match="transaction id is 3 bytes"):
        StunMessage(Method.BINDING, MessageClass.REQUEST, b"abc")
    bad = StunMessage(Method.BINDING, MessageClass.SUCCESS, TID, [(AttrType.XOR_MAPPED_ADDRESS, ("nope", 1))])
    with pytest.raises(LocalProtocolError, match="'nope' is not an IP address"):
        bytes(bad)
    bad = StunMessage(Method.BINDING, MessageClass.SUCCESS, TID,
                      [(AttrType.XOR_MAPPED_ADDRESS, ("1.2.3.4", 70000))])
    with pytest.raises(LocalProtocolError, match="70000"):
        bytes(bad)
    bad = StunMessage(Method.BINDING, MessageClass.SUCCESS, TID, [(AttrType.PRIORITY, -1)])
    with pytest.raises(LocalProtocolError, match="cannot encode PRIORITY"):
        bytes(bad)
    bad = StunMessage(Method.BINDING, MessageClass.ERROR, TID, [(AttrType.ERROR_CODE, ErrorValue(200))])
    with pytest.raises(LocalProtocolError, match="error code 200"):
        bytes(bad)


def test_register_attribute_refuses_silent_override() -> None:
    with pytest.raises(ValueError, match="already registered as SOFTWARE"):
        codec.register_attribute(AttrType.SOFTWARE, "X", lambda v, t: b"", lambda b, t: b)
    code = 0xBEEF
    try:
        codec.register_attribute(code, "TEST-ATTR", lambda v, t: v.to_bytes(2, "big"),
                                 lambda b, t: int.from_bytes(b, "big"))
        msg = StunMessage(Method.BINDING, MessageClass.REQUEST, TID, [(code, 513)])
        assert StunMessage.parse(bytes(msg)).get(code) == 513
        assert codec.attr_name(code) == "TEST-ATTR"
    finally:
        codec.ATTRIBUTES.pop(code, None)


def test_stream_framer_splits_and_buffers() -> None:
    a = bytes(codec.binding_request(TID, software="a"))
    b = bytes(codec.binding_request(bytes(12), change=ChangeRequest(True, True)))
    framer = StreamFramer()
    stream = a + b
    got: list[bytes] = []
    for i in range(0, len(stream), 7):          # arbitrary chunking
        got += framer.feed(stream[i:i + 7])
    assert got == [a, b]
    assert framer.buffered == 0
    assert framer.feed(a[:10]) == [] and framer.buffered == 10


def test_stream_framer_channel_data_and_errors() -> None:
    framer = StreamFramer(channel_data=True)
    frame = struct.pack("!HH", 0x4001, 3) + b"abc" + b"\0"
    assert framer.feed(frame) == [frame]
    with pytest.raises(RemoteProtocolError, match="first byte 0x40"):
        StreamFramer().feed(frame)
    with pytest.raises(RemoteProtocolError, match="magic cookie"):
        StreamFramer().feed(struct.pack("!HHI", 1, 0, 0) + TID)
    with pytest.raises(RemoteProtocolError, match="exceeds 100"):
        StreamFramer(max_size=100).feed(struct.pack("!HHI", 1, 200, codec.MAGIC_COOKIE))


def test_is_stun() -> None:
    assert codec.is_stun(bytes(codec.binding_request(TID)))
    assert not codec.is_stun(b"\x16\x03\x01" + b"\0" * 30)
    assert not codec.is_stun(b"\x00\x01")


def test_error_response_shape() -> None:
    req = codec.binding_request(TID)
    resp = StunMessage.parse(bytes(codec.error_response(req, 420, unknown=[0x7777], software="s")))
    assert resp.cls is MessageClass.ERROR and resp.error == ErrorValue(420, "Unknown Attribute")
    assert resp.get(AttrType.UNKNOWN_ATTRIBUTES) == (0x7777,)


_addr = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).map(str)
_attr = st.one_of(
    st.tuples(st.sampled_from([AttrType.XOR_MAPPED_ADDRESS, AttrType.MAPPED_ADDRESS,
                               AttrType.RESPONSE_ORIGIN, AttrType.OTHER_ADDRESS]),
              st.tuples(_addr, st.integers(0, 65535))),
    st.tuples(st.just(AttrType.CHANGE_REQUEST), st.builds(ChangeRequest, st.booleans(), st.booleans())),
    st.tuples(st.just(AttrType.ERROR_CODE),
              st.builds(ErrorValue, st.integers(300, 699), st.text(min_size=1, max_size=40))),
    st.tuples(st.sampled_from([AttrType.SOFTWARE, AttrType.REALM, AttrType.NONCE]), st.text(max_size=60)),
    st.tuples(st.just(AttrType.UNKNOWN_ATTRIBUTES), st.lists(st.integers(0, 0xFFFF), max_size=5).map(tuple)),
    st.tuples(st.integers(0xC000, 0xFFFF).filter(lambda t: t not in codec.ATTRIBUTES),
              st.binary(max_size=30)),
)


@settings(max_examples=300, deadline=None)
@given(attrs=st.lists(_attr, max_size=6), tid=st.binary(min_size=12, max_size=12),
       cls=st.sampled_from(list(MessageClass)),
       key=st.one_of(st.none(), st.binary(min_size=1, max_size=20)), fingerprint=st.booleans())
def test_property_round_trip(attrs: list[tuple[int, object]], tid: bytes, cls: MessageClass,
                             key: bytes | None, fingerprint: bool) -> None:
    msg = StunMessage(Method.BINDING, cls, tid, list(attrs))
    data = msg.encode(key=key, fingerprint=fingerprint)
    back = StunMessage.parse(data)
    extra = [t for t, _ in back.attributes[len(attrs):]]
    assert back.attributes[:len(attrs)] == [(t, v) for t, v in attrs]
    assert extra == [AttrType.MESSAGE_INTEGRITY] * (key is not None) + [AttrType.FINGERPRINT] * fingerprint
    assert back.transaction_id == tid and back.cls is cls
    if key is not None:
        assert back.verify_integrity(key)
    assert bytes(back) == data


DATA = Path(__file__).parent.parent / "data"


@pytest.mark.parametrize("name", ["coturn_udp_binding_response", "coturn_udp_change_response",
                                  "coturn_tcp_change_error"])
def test_captured_coturn_messages(name: str) -> None:
    """Real bytes from Debian's coturn 4.6 (loopback capture): parse and re-encode exactly."""
    data = (DATA / f"{name}.bin").read_bytes()
    msg = StunMessage.parse(data)
    assert bytes(msg) == data
    assert msg.transaction_id == bytes.fromhex("0123456789abcdef01234567")
    assert msg.get(AttrType.SOFTWARE).startswith("Coturn-")
    if name == "coturn_tcp_change_error":
        assert msg.error is not None and msg.error.code == 400
        assert msg.error.reason.rstrip("\0") == "Wrong request: applicable only to UDP protocol"
    else:
        assert msg.mapped_address == ("127.0.0.1", 57781)
        assert msg.get(AttrType.OTHER_ADDRESS) == ("127.0.0.2", 39491)
        origin = ("127.0.0.2", 39491) if "change" in name else ("127.0.0.1", 39490)
        assert msg.get(AttrType.RESPONSE_ORIGIN) == origin
