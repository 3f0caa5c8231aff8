"""The byte stream `connect` and `listen` run over a peer connection, with an explicit end.

TLS cannot half-close (a close_notify ends both directions), and a bare TCP FIN cannot tell
"the sender's input ended" from "the sender died". So the two commands frame what they send
(docs/cli.md, "The stream protocol"): every frame is one type byte and a 4-byte big-endian
length, then that many bytes.

    D  data        the next bytes of the sender's input (1 .. 1 MiB)
    E  end         the sender's input ended: nothing follows but A/X frames
    A  ack         "I have your E and wrote everything before it out": sent once, after E
    X  error       the sender failed; the payload is its reason (UTF-8); both sides exit 1

A side is done when it has sent its E, received the peer's E (and closed its output), and
received the peer's A. Then, and only then, it closes the connection and exits 0. Anything
else (the connection ends early, an X frame, a malformed frame) is a failure with a message.
No timer is involved anywhere.
"""
from __future__ import annotations

import asyncio
import logging
import struct
import time
from dataclasses import dataclass, field
from typing import Protocol

from ..connection import Connection
from ..errors import StreamFailed
from .inbox import Inbox

log = logging.getLogger(__name__)

HEADER = struct.Struct("!BI")
DATA, END, ACK, ERROR = b"D"[0], b"E"[0], b"A"[0], b"X"[0]
MAX_FRAME = 1 << 20
MAX_REASON = 4096
WRITE_BUFFER = 2 * MAX_FRAME
LOSS_GRACE = 5.0


class Source(Protocol):
    async def read(self) -> bytes:
        """The next bytes of input; b"" at its end. Raises when the input failed."""
        ...


class Sink(Protocol):
    async def write(self, data: bytes | memoryview) -> None:
        """Write all of ``data`` out (raises when the output failed). ``data`` may be a slice
        of the receive buffer, valid only until this returns: a sink that keeps it copies it."""
        ...

    async def close(self) -> None:
        """The input ended: flush and close the output (its reader sees EOF)."""
        ...


@dataclass
class Transfer:
    """What one session moved: bytes each way and the time from start to both ends."""

    sent: int = 0
    received: int = 0
    started: float = field(default_factory=time.monotonic)
    cpu_started: float = field(default_factory=time.process_time)
    seconds: float | None = None
    cpu_seconds: float | None = None        # this process's CPU time (all threads) meanwhile

    def finish(self) -> None:
        self.seconds = time.monotonic() - self.started
        self.cpu_seconds = time.process_time() - self.cpu_started

    def as_dict(self) -> dict[str, float | int | None]:
        secs = self.seconds
        return {"sent_bytes": self.sent, "received_bytes": self.received,
                "seconds": None if secs is None else round(secs, 4),
                "cpu_seconds": None if self.cpu_seconds is None else round(self.cpu_seconds, 4),
                "mb_per_s": (round((self.sent + self.received) / secs / 1e6, 1)
                             if secs else None)}


class _Session:
    def __init__(self, conn: Connection, source: Source, sink: Sink) -> None:
        self.conn, self.source, self.sink = conn, source, sink
        self.inbox = Inbox(conn)
        self.transfer = Transfer()
        self.peer = conn.peer_name or conn.peer_id

    def _frame(self, kind: int, payload: bytes = b"") -> None:
        writer = self.conn.writer
        writer.write(HEADER.pack(kind, len(payload)))
        if payload:
            writer.write(payload)

    async def _send(self, kind: int, payload: bytes = b"") -> None:
        if self.conn.writer.is_closing():
            raise StreamFailed(f"the connection to {self.peer} is closed")
        self._frame(kind, payload)
        await self.conn.writer.drain()

    async def send_input(self) -> None:
        """Our input -> D frames, then E."""
        while True:
            try:
                data = await self.source.read()
            except OSError as exc:
                raise _Local(f"reading the input failed: {exc}") from exc
            if not data:
                break
            for i in range(0, len(data), MAX_FRAME):
                await self._send(DATA, data[i:i + MAX_FRAME])
            self.transfer.sent += len(data)
        await self._send(END)
        log.debug("sent end-of-stream to %s after %d bytes", self.peer, self.transfer.sent)

    async def receive(self) -> None:
        """D frames -> our output; E closes it and is acknowledged; until E and A are in.

        A D frame's payload goes out as it arrives, in the slices the inbox holds (no waiting
        for the whole frame, no copy); a frame the connection ends inside is a loss all the same.
        """
        inbox = self.inbox
        got_end = got_ack = False
        while not (got_end and got_ack):
            window = await self._wait(inbox, HEADER.size, got_end, got_ack, "ended")
            kind, length = HEADER.unpack(window[:HEADER.size])
            inbox.consume(HEADER.size)
            if length > MAX_FRAME or (kind in (END, ACK) and length) or kind not in (DATA, END, ACK, ERROR):
                raise StreamFailed(f"{self.peer} sent a malformed frame (type {kind:#04x}, length "
                                   f"{length}): is it a pyholepunch connect/listen?")
            if kind == DATA:
                if got_end:
                    raise StreamFailed(f"{self.peer} sent data after its end-of-stream")
                while length:
                    window = await self._wait(inbox, 1, got_end, got_ack, "ended inside a frame")
                    piece = window[:length]
                    try:
                        await self.sink.write(piece)
                    except OSError as exc:
                        raise _Local(f"writing the output failed after {self.transfer.received} "
                                     f"bytes: {exc}") from exc
                    inbox.consume(len(piece))
                    length -= len(piece)
                    self.transfer.received += len(piece)
            elif kind == END:
                if got_end:
                    raise StreamFailed(f"{self.peer} sent its end-of-stream twice")
                try:
                    await self.sink.close()
                except OSError as exc:
                    raise _Local(f"closing the output failed: {exc}") from exc
                got_end = True
                await self._send(ACK)
            elif kind == ACK:
                got_ack = True
            else:
                reason = bytearray()
                while length:
                    window = await self._wait(inbox, 1, got_end, got_ack, "ended inside a frame")
                    piece = window[:length]
                    reason += piece[:MAX_REASON - len(reason)]
                    inbox.consume(len(piece))
                    length -= len(piece)
                raise StreamFailed(f"{self.peer} failed: {reason.decode('utf-8', 'replace')}")

    async def _wait(self, inbox: Inbox, need: int, got_end: bool, got_ack: bool,
                    how: str) -> memoryview:
        window = await inbox.wait(need)
        if len(window) >= need:
            return window
        if inbox.cause is None:
            raise StreamFailed(self._lost(got_end, got_ack, how))
        raise StreamFailed(self._lost(got_end, got_ack, f"broke ({inbox.cause})"))

    def _lost(self, got_end: bool, got_ack: bool, how: str) -> str:
        missing = ("its end-of-stream" if not got_end
                   else "its acknowledgement of our end-of-stream")
        return (f"the connection to {self.peer} {how} before {missing} "
                f"({self.transfer.received} bytes received, {self.transfer.sent} sent)")


class _Local(Exception):
    """Our own input or output failed: the peer is told with an X frame."""


async def run_stream(conn: Connection, source: Source, sink: Sink) -> Transfer:
    """Run the framed stream over ``conn`` until both directions are done; close ``conn``.

    Returns what was moved; raises StreamFailed (peer's failure, connection lost, bad frame)
    or the local input/output error (after telling the peer).
    """
    session = _Session(conn, source, sink)
    await session.inbox.take_over()
    try:    # room for a few frames: the socket never runs dry while the next one is read
        conn.writer.transport.set_write_buffer_limits(high=WRITE_BUFFER)
    except NotImplementedError:
        pass
    sending = asyncio.ensure_future(session.send_input())
    receiving = asyncio.ensure_future(session.receive())
    tasks = [sending, receiving]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        if _failed(sending) and not isinstance(sending.exception(), _Local) and not receiving.done():
            # The connection went away under our writes: what the peer said last (its X
            # frame, already on its way) or how the reading side saw the loss says more.
            # The reader ends soon on a closed connection; the bound is only a backstop.
            await asyncio.wait([receiving], timeout=LOSS_GRACE)
        failed = next((t for t in (receiving, sending) if _failed(t)), None)
        if _failed(sending) and isinstance(sending.exception(), _Local):
            failed = sending
        if failed is not None:
            exc = failed.exception()
            assert exc is not None
            if isinstance(exc, _Local):
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                await _tell_peer(session, str(exc))
                raise StreamFailed(str(exc)) from exc.__cause__
            raise exc
        session.transfer.finish()
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    await conn.close()
    return session.transfer


def _failed(task: asyncio.Future[None]) -> bool:
    return task.done() and not task.cancelled() and task.exception() is not None


async def _tell_peer(session: _Session, reason: str) -> None:
    """Best effort: an X frame, so the peer exits with our reason instead of a bare loss.

    Then a lingering close: what the peer still sends is read and dropped until it closes
    (it does on our X). Closing at once with its bytes unread would make our kernel answer
    with a reset, which can destroy the X frame before the peer reads it.
    """
    try:
        async with asyncio.timeout(LOSS_GRACE):
            await session._send(ERROR, reason.encode()[:MAX_REASON])
            while window := await session.inbox.wait():
                session.inbox.consume(len(window))
    except (StreamFailed, ConnectionError, OSError, TimeoutError):
        pass
