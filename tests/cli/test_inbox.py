"""The stream's receive side (cli/inbox.py) in one process, over real loopback TCP sockets:
frames cut anywhere (a header split across reads, across the buffer's end), bytes the
StreamReader held before the take-over, TLS (decrypted bytes copied in, overflow when the
buffer is full), and losses: a malformed frame, an end inside a frame, the peer's X frame."""
from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from pyholepunch.cli import inbox as inbox_module
from pyholepunch.cli.stream import DATA, END, ERROR, HEADER, run_stream
from pyholepunch.connection import Connection
from pyholepunch.errors import StreamFailed
from pyholepunch.identity import Identity
from pyholepunch.report import ConnectionReport
from pyholepunch.security import certificate_for, secure_stream

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]


class Chunks:
    """A source of odd-sized chunks (a header lands anywhere) and a sink that hashes."""

    def __init__(self, data: bytes, sizes: tuple[int, ...] = (1, 4, 5, 6, 70_001, 1 << 20)) -> None:
        self.data, self.sizes, self.pos, self.i = data, sizes, 0, 0
        self.got = hashlib.sha256()
        self.received = 0
        self.closed = False

    async def read(self) -> bytes:
        n = self.sizes[self.i % len(self.sizes)]
        self.i += 1
        piece = self.data[self.pos:self.pos + n]
        self.pos += len(piece)
        return piece

    async def write(self, data: bytes | memoryview) -> None:
        self.got.update(data)
        self.received += len(data)
        if self.received % 3 == 0:
            await asyncio.sleep(0)         # a sink that yields: the buffer fills meanwhile

    async def close(self) -> None:
        self.closed = True


async def _pair(tls: bool) -> tuple[Connection, Connection]:
    with socket.create_server(("127.0.0.1", 0)) as listening:
        a = socket.create_connection(listening.getsockname())
        b, _ = listening.accept()
    ida, idb = Identity.generate(), Identity.generate()
    kw = {"insecure_plain": not tls}
    sa, sb = await asyncio.gather(
        secure_stream(a, identity=ida, peer_id=idb.peer_id, peer_cert=certificate_for(idb),
                      initiator=True, **kw),
        secure_stream(b, identity=idb, peer_id=ida.peer_id, peer_cert=certificate_for(ida),
                      initiator=False, **kw))
    report = ConnectionReport("initiator")
    return (Connection(*sa, peer_id=idb.peer_id, route="direct", report=report, keepalive=None),
            Connection(*sb, peer_id=ida.peer_id, route="direct", report=report, keepalive=None))


@asynccontextmanager
async def small_buffer(size: int) -> AsyncIterator[None]:
    """An inbox of ``size`` bytes: frames wrap around its end all the time."""
    old = inbox_module.SIZE, inbox_module.READ_SIZE
    inbox_module.SIZE, inbox_module.READ_SIZE = size, size // 3
    try:
        yield
    finally:
        inbox_module.SIZE, inbox_module.READ_SIZE = old


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
async def test_both_ways_with_frames_cut_anywhere(tls: bool) -> None:
    a_data, b_data = os.urandom(3_000_017), os.urandom(1_500_007)
    ca, cb = await _pair(tls)
    a, b = Chunks(a_data), Chunks(b_data, sizes=(3, 1 << 20, 65_537))
    async with small_buffer(100_003):
        await ca.send(HEADER.pack(DATA, 3) + b"pre")        # held by the StreamReader first
        await asyncio.sleep(0.05)
        ta, tb = await asyncio.gather(run_stream(ca, a, a), run_stream(cb, b, b))
    assert b.got.digest() == hashlib.sha256(b"pre" + a_data).digest() and b.closed
    assert a.got.digest() == hashlib.sha256(b_data).digest() and a.closed
    assert (ta.sent, tb.received, tb.sent, ta.received) == (
        len(a_data), len(a_data) + 3, len(b_data), len(b_data))


async def _lone_receiver(frames: bytes, close: bool, src: Chunks | None = None) -> str:
    """``frames`` from a bare socket to a stream; its failure message (the CLI turns
    StreamFailed and OSError alike into exit 1 with that message)."""
    ca, cb = await _pair(False)
    src = src or Chunks(b"")
    ca.writer.write(frames)
    await ca.writer.drain()
    if close:
        ca.writer.close()
    with pytest.raises((StreamFailed, OSError)) as failed:
        await run_stream(cb, src, src)
    ca.writer.transport.abort()
    return str(failed.value)


async def test_malformed_frame() -> None:
    assert "malformed frame" in await _lone_receiver(HEADER.pack(ord("Q"), 0), close=False)


async def test_end_inside_a_frame_is_a_loss() -> None:
    msg = await _lone_receiver(HEADER.pack(DATA, 1000) + b"x" * 10, close=True)
    assert "ended inside a frame" in msg and "10 bytes received" in msg


async def test_end_before_end_of_stream_is_a_loss() -> None:
    msg = await _lone_receiver(HEADER.pack(DATA, 4) + b"abcd", close=True)
    assert "before its end-of-stream" in msg and "4 bytes received" in msg


async def test_peer_error_frame() -> None:
    why = b"disk full"
    msg = await _lone_receiver(HEADER.pack(DATA, 2) + b"ok" + HEADER.pack(ERROR, len(why)) + why,
                               close=False)
    assert msg.endswith("failed: disk full")


async def test_end_frame_closes_the_sink_then_loss() -> None:
    """E closes our output at once (the command sees its input end), then the missing A is a loss."""
    out = Chunks(b"")
    msg = await _lone_receiver(HEADER.pack(END, 0), close=True, src=out)
    assert out.closed and ("before its acknowledgement of our end-of-stream" in msg
                           or "Connection lost" in msg), msg
