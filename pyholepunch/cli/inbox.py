"""The receiving side of the stream: the connection's bytes into one preallocated buffer.

asyncio's StreamReader copies every byte three more times on its way out (into its growing
bytearray, out again by ``readexactly``, and whenever the bytearray is shifted or reallocated),
each time into freshly allocated memory. ``Inbox`` takes over the connection's transport as
its protocol instead: a plain socket reads straight into the buffer (``recv_into``, as a
BufferedProtocol), TLS's decrypted bytes are copied in once, and the stream hands slices of the
buffer to its output. A 200 MB --insecure-plain transfer thus costs the receiver what a plain
``recv``/``write`` loop costs (docs/cli.md, "The stream protocol").

Only reading moves: the Connection's StreamWriter keeps writing, its flow control (pause and
resume) and the end of the connection are passed on to the StreamReaderProtocol it had, so
``writer.drain()``, ``writer.wait_closed()`` and ``Connection.close()`` work as before.
"""
from __future__ import annotations

import asyncio
import collections

from ..connection import Connection

SIZE = 2 << 20           # at most this much waits unread: what the StreamReader held (2 x its limit)
READ_SIZE = 1 << 18      # at most this much per recv_into: still in the cache when written out


class Inbox(asyncio.Protocol, asyncio.BufferedProtocol):
    """What the peer sent, as windows of one fixed buffer (``wait()``); ``consume(n)`` after use.

    A window handed out stays valid until the next ``wait()``: only ``wait()`` moves bytes within
    the buffer, so a sink may hold a slice across its own awaits (the sinks copy what they keep).
    """

    def __init__(self, conn: Connection, size: int | None = None) -> None:
        self._buf = bytearray(SIZE if size is None else size)
        self._mem = memoryview(self._buf)
        self._start = self._end = 0
        self._overflow: collections.deque[memoryview] = collections.deque()
        self._ended = False               # the connection ended: EOF or lost
        self._cause: BaseException | None = None     # why, if not a clean end of stream
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._conn = conn
        transport = conn.writer.transport
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        protocol = self._transport.get_protocol()
        assert isinstance(protocol, asyncio.Protocol)     # a StreamReaderProtocol, TLS or not
        self._inner = protocol

    async def take_over(self) -> None:
        """Become the transport's protocol; what the StreamReader already holds comes first."""
        reader = self._conn.reader
        lost = self._transport.is_closing()
        seen_eof = bool(getattr(reader, "_eof", False))     # the peer's FIN reached the reader
        self._transport.set_protocol(self)
        reader.feed_eof()                 # nothing more arrives there: read() returns at once
        try:
            buffered = await reader.read()
        except (ConnectionError, OSError) as exc:           # the connection had already broken
            buffered, lost = b"", True
            self._cause = exc
        if buffered:
            self.data_received(buffered)
        if lost or seen_eof:
            self._ended = True
            self._cause = self._cause or reader.exception()

    # --- what the stream calls ----------------------------------------------------------------

    async def wait(self, need: int = 1) -> memoryview:
        """At least ``need`` bytes (``need`` small: a header), or fewer (what is left, maybe
        none) once the connection has ended: ``cause`` then says why (None: a clean end)."""
        while True:
            self._refill()
            if self._end - self._start >= need:
                return self._mem[self._start:self._end]
            if self._ended:
                return self._mem[self._start:self._end]
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def consume(self, n: int) -> None:
        self._start += n

    @property
    def cause(self) -> BaseException | None:
        return self._cause

    # --- asyncio protocol: the plain socket reads into the buffer -------------------------------

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._mem[self._end:self._end + READ_SIZE]

    def buffer_updated(self, nbytes: int) -> None:
        self._end += nbytes
        if self._end == len(self._buf):
            self._pause()
        self._wake()

    def data_received(self, data: bytes) -> None:     # TLS: the decrypted bytes are copied in
        room = len(self._buf) - self._end
        if self._overflow or len(data) > room:
            self._overflow.append(memoryview(data))
            self._pause()
        else:
            self._mem[self._end:self._end + len(data)] = data
            self._end += len(data)
        self._wake()

    def eof_received(self) -> bool | None:
        self._ended = True
        self._wake()
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._inner.connection_lost(exc)          # the writer's drain() and wait_closed() end
        if not self._ended:
            self._ended = True
            self._cause = self._conn.reader.exception() or exc
        self._wake()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    # --- internals -----------------------------------------------------------------------------

    def _refill(self) -> None:
        """Room at the back once the window is used up, the overflow moved in, reading resumed."""
        if self._start == self._end:
            self._start = self._end = 0
        elif self._start and (self._overflow or len(self._buf) - self._end < READ_SIZE):
            left = self._end - self._start         # a partial header or an unread tail
            self._mem[:left] = self._mem[self._start:self._end]
            self._start, self._end = 0, left
        while self._overflow and self._end < len(self._buf):
            chunk = self._overflow[0]
            n = min(len(chunk), len(self._buf) - self._end)
            self._mem[self._end:self._end + n] = chunk[:n]
            self._end += n
            if n == len(chunk):
                self._overflow.popleft()
            else:
                self._overflow[0] = chunk[n:]
        if self._paused and not self._overflow and self._end < len(self._buf):
            self._paused = False
            if not self._transport.is_closing():
                self._transport.resume_reading()

    def _pause(self) -> None:
        if not self._paused:
            self._paused = True
            self._transport.pause_reading()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
