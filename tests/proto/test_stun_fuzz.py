"""Bad input: >= 100k random and mutated STUN messages into the codec, the responder and a
running server. Only ProtocolError may escape the codec; the server keeps answering."""
from __future__ import annotations

import asyncio
import json
import random
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyholepunch.errors import ProtocolError
from pyholepunch.stun import codec
from pyholepunch.stun.client import stun_binding
from pyholepunch.stun.codec import AttrType, ChangeRequest, MessageClass, Method, StreamFramer, StunMessage
from pyholepunch.stun.responder import Layout, Responder
from pyholepunch.stun.server import StunServer

COUNT = 100_000
VECTORS = json.loads((Path(__file__).parent.parent / "data" / "rfc5769.json").read_text())["vectors"]


def _seeds() -> list[bytes]:
    seeds = [bytes.fromhex(v["hex"]) for v in VECTORS.values()]
    tid = bytes(range(12))
    seeds.append(bytes(codec.binding_request(tid, change=ChangeRequest(True, True), software="x")))
    resp = StunMessage(Method.BINDING, MessageClass.SUCCESS, tid)
    for t in (AttrType.XOR_MAPPED_ADDRESS, AttrType.MAPPED_ADDRESS, AttrType.RESPONSE_ORIGIN,
              AttrType.OTHER_ADDRESS):
        resp.add(t, ("203.0.113.9", 3478))
    resp.add(AttrType.XOR_MAPPED_ADDRESS, ("2001:db8::5", 1))
    seeds.append(resp.encode(key=b"k", fingerprint=True))
    err = codec.error_response(codec.binding_request(tid), 420, unknown=[1, 2, 3])
    seeds.append(err.encode(fingerprint=True))
    return seeds


SEEDS = _seeds()
ATTR_TYPES = [int(t) for t in AttrType] + [0x0000, 0x7FFF, 0x8000, 0xFFFF]


def _mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(8)
        if op == 0 and buf:                              # flip bits
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1:                                    # truncate
            del buf[rng.randrange(len(buf) + 1):]
        elif op == 2:                                    # insert junk
            i = rng.randrange(len(buf) + 1)
            buf[i:i] = rng.randbytes(rng.randint(1, 12))
        elif op == 3 and len(buf) >= 4:                  # lie in the length field
            buf[2:4] = struct.pack("!H", rng.choice([0, 4, len(buf) - 20, rng.randrange(65536)]) & 0xFFFF)
        elif op == 4 and len(buf) >= 24:                 # break an attribute length
            i = 20 + 4 * rng.randrange((len(buf) - 20) // 4)
            if i + 4 <= len(buf):
                buf[i + 2:i + 4] = struct.pack("!H", rng.randrange(65536))
        elif op == 5:                                    # append a random attribute, fix length
            value = rng.randbytes(rng.choice([0, 1, 2, 4, 8, 12, 20, 24, 33]))
            buf += struct.pack("!HH", rng.choice(ATTR_TYPES), len(value)) + value + b"\0" * (-len(value) % 4)
            if len(buf) >= 4:
                buf[2:4] = struct.pack("!H", max(0, len(buf) - 20) & 0xFFFF)
        elif op == 6 and len(buf) >= 2:                  # another method/class
            buf[0:2] = struct.pack("!H", rng.randrange(0x4000))
        else:                                            # overwrite a byte
            if buf:
                buf[rng.randrange(len(buf))] = rng.randrange(256)
    return bytes(buf)


def corpus(n: int, seed: int) -> Iterator[bytes]:
    rng = random.Random(seed)
    for i in range(n):
        if i % 10 == 0:
            yield rng.randbytes(rng.randint(0, 120))     # pure noise
        else:
            yield _mutate(rng, rng.choice(SEEDS))


def test_codec_and_responder_survive_100k_mutations() -> None:
    responder = Responder(Layout(("198.51.100.1", "198.51.100.2"), (3478, 3479)))
    parsed = rejected = answered = 0
    for data in corpus(COUNT, seed=5769):
        try:
            msg = StunMessage.parse(data)
            parsed += 1
            bytes(msg)    # whatever parses re-encodes
        except ProtocolError:
            rejected += 1
        if responder.answer(data, ("198.51.100.1", 3478), ("203.0.113.5", 4000)) is not None:
            answered += 1
    assert parsed + rejected == COUNT
    assert parsed > 1000 and rejected > 1000   # the mutations hit both sides


def test_stream_framer_survives_mutated_streams() -> None:
    rng = random.Random(6062)
    for data in corpus(5000, seed=1):
        framer = StreamFramer(channel_data=rng.random() < 0.5)
        try:
            for i in range(0, len(data), 7):
                for frame in framer.feed(data[i:i + 7]):
                    try:
                        StunMessage.parse(frame)
                    except ProtocolError:
                        pass
        except ProtocolError:
            pass


attr_value = st.one_of(st.binary(max_size=40), st.just(b""))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(method=st.integers(0, 0xFFF), cls=st.sampled_from(list(MessageClass)),
       tid=st.binary(min_size=12, max_size=12),
       attrs=st.lists(st.tuples(st.sampled_from(ATTR_TYPES) | st.integers(0, 0xFFFF), attr_value),
                      max_size=8),
       integrity=st.booleans(), fingerprint=st.booleans())
def test_structured_messages_parse_or_fail_cleanly(method: int, cls: MessageClass, tid: bytes,
                                                   attrs: list[tuple[int, bytes]], integrity: bool,
                                                   fingerprint: bool) -> None:
    body = b"".join(struct.pack("!HH", t, len(v)) + v + b"\0" * (-len(v) % 4) for t, v in attrs)
    raw = struct.pack("!HHI", codec.message_type(method, cls), len(body), codec.MAGIC_COOKIE) + tid + body
    if integrity or fingerprint:
        try:
            raw = StunMessage.parse(raw).encode(key=b"k" if integrity else None, fingerprint=fingerprint)
        except ProtocolError:
            return
    try:
        msg = StunMessage.parse(raw)
    except ProtocolError as exc:
        assert exc.field, f"error without a field: {exc}"
        return
    assert msg.transaction_id == tid
    if integrity:
        assert msg.verify_integrity(b"k")


def _blast(server: tuple[str, int], count: int, received: Callable[[], int]) -> int:
    """Send ``count`` fuzz datagrams, never more than 1000 ahead of what the server has read
    (so the socket buffer does not overflow and every datagram really is processed)."""
    sent = 0
    deadline = time.monotonic() + 60
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for data in corpus(count, seed=8489):
            s.sendto(data or b"\0", server)
            sent += 1
            while sent - received() > 1000 and time.monotonic() < deadline:
                time.sleep(0.001)
    return sent


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_running_server_survives_fuzz_and_keeps_answering() -> None:
    async with StunServer(("127.0.0.1", 0), "127.0.0.2") as srv:
        start = time.monotonic()
        base = srv.stats["udp_in"]
        sent = await asyncio.to_thread(_blast, srv.primary, COUNT, lambda: srv.stats["udp_in"] - base)
        # wait for the server to drain what is queued
        for _ in range(200):
            before = srv.stats["udp_in"]
            await asyncio.sleep(0.05)
            if srv.stats["udp_in"] == before:
                break
        assert sent == COUNT
        assert srv.stats["udp_in"] >= 0.99 * COUNT, srv.stats    # loopback may drop a handful
        assert srv.stats["errors"] == 0
        # mutated streams over TCP: each connection dies alone
        for data in list(corpus(300, seed=11))[:300]:
            try:
                _, writer = await asyncio.open_connection(*srv.primary)
                writer.write(data)
                await writer.drain()
                writer.close()
            except OSError:
                pass
        r = await stun_binding(srv.primary, rto=0.1)
        t = await stun_binding(srv.primary, transport="tcp")
        assert r.mapped[0] == t.mapped[0] == "127.0.0.1"
        assert srv.stats["errors"] == 0
        assert time.monotonic() - start < 60
