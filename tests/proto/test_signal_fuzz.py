"""Fuzz the signaling frame codec: >= 100k hostile inputs, only ProtocolError may come out."""
from __future__ import annotations

import random
import struct

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from pyholepunch.errors import ProtocolError
from pyholepunch.signal.machine import Role, SignalConnection
from pyholepunch.signal.protocol import MESSAGES, FrameDecoder, decode_body

from .test_signal_protocol import SAMPLES

VALID = [msgpack.packb(m.to_wire(), use_bin_type=True) for m in SAMPLES]
KEYS = sorted({k for b in VALID for k in msgpack.unpackb(b)} | set(MESSAGES))
VALUES: list[object] = [None, True, 0, -1, 2**63, 1.5, float("inf"), "", "x" * 300, b"", b"k" * 32,
                        [], {}, [["10.0.0.1", 1]], [1, 2], {"a": 1}, msgpack.ExtType(3, b"z")]


def _mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(4)
        if op == 0 and b:
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif op == 1 and b:
            del b[rng.randrange(len(b)):][: rng.randint(1, 8)]
        elif op == 2:
            pos = rng.randrange(len(b) + 1)
            b[pos:pos] = rng.randbytes(rng.randint(1, 8))
        else:
            b = b[: rng.randrange(len(b) + 1)]
    return bytes(b)


def _structured(rng: random.Random) -> bytes:
    d: dict[object, object] = {"t": rng.choice(list(MESSAGES) + ["bogus", 7])}
    for _ in range(rng.randint(0, 6)):
        d[rng.choice(KEYS)] = rng.choice(VALUES)
    return msgpack.packb(d, use_bin_type=True)


def _check(body: bytes) -> bool:
    """True if accepted; any exception but ProtocolError fails the test."""
    try:
        decode_body(body)
    except ProtocolError:
        return False
    return True


def test_codec_fuzz_100k_inputs() -> None:
    rng = random.Random(0x5EED)
    n = accepted = 0
    for i in range(120_000):
        kind = i % 3
        if kind == 0:
            body = _mutate(rng, rng.choice(VALID))
        elif kind == 1:
            body = _structured(rng)
        else:
            body = rng.randbytes(rng.randint(0, 64))
        accepted += _check(body)
        n += 1
    assert n >= 100_000
    assert 100 < accepted < n - 10_000     # the inputs reach both verdicts, not just one


def test_stream_fuzz_through_connection() -> None:
    """Random chunkings of mutated frame streams into a server connection: ProtocolError or events."""
    rng = random.Random(7)
    for _ in range(3_000):
        stream = b"".join(struct.pack("!I", len(b)) + b
                          for b in (_mutate(rng, rng.choice(VALID)) for _ in range(3)))
        conn = SignalConnection(Role.SERVER, max_frame=4096)
        try:
            for i in range(0, len(stream), rng.randint(1, 50)):
                conn.receive_data(stream[i:i + 50])
        except ProtocolError:
            pass


@settings(max_examples=3_000, deadline=None)
@given(st.binary(max_size=200))
def test_hypothesis_bodies(data: bytes) -> None:
    _check(data)


@settings(max_examples=1_000, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=6))
def test_hypothesis_frame_decoder(chunks: list[bytes]) -> None:
    dec = FrameDecoder(max_frame=256)
    try:
        for c in chunks:
            for body in dec.feed(c):
                _check(body)
    except ProtocolError:
        pass
