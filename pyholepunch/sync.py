"""A blocking facade over ``pyholepunch.Punch`` for programs without asyncio.

::

    conn = pyholepunch.sync.connect("stun.example:3478", exchange)
    conn.sock.sendall(b"hello")          # a connected, blocking socket.socket
    conn.close()

``exchange(mine: bytes) -> bytes`` is the app's signaling: it sends our offer to the other
side and returns the other side's offer (blocking as long as it needs). When the other side
*answers* that offer — ``pyholepunch.sync.answer(stun, theirs, send)``, or
``Punch.offer(reply_to=...)`` — the common start is agreed by measuring the two clocks'
offset over the exchange (offer_clock.py); two offers exchanged independently rely on both
clocks being NTP-synced (the report's ``start_sync`` says which). The session runs on
an event loop in a thread of its own; the caller gets one end of a socket pair whose other
end that loop pumps to and from the peer connection (TLS 1.3, pinned, as with ``Punch``).

Limits: the socket is an AF_UNIX stream socket on this host, not the punched TCP socket —
the bytes pass one local copy (the loop thread), so throughput is that of one Python thread;
TCP-level options (keepalive, TCP_NODELAY, getpeername) do not reach the peer connection.
TLS cannot half-close: when either side closes or shuts down writing, the connection closes
(send everything, then read the answer, then close). One loop thread per connection: meant
for a handful of connections, not thousands (use ``Punch`` from asyncio for that).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .address import Address
from .backend import Punch
from .connection import Connection, both_ways
from .report import ConnectionReport, Route

log = logging.getLogger(__name__)
T = TypeVar("T")
CHUNK = 64 * 1024
STOP_TIMEOUT = 5.0


class _LoopThread:
    """An event loop running in a daemon thread; coroutines submitted from the caller's."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="pyholepunch-sync",
                                       daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except BaseException:
            future.cancel()
            raise

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        with contextlib.suppress(Exception):     # its to_thread workers end too
            self.run(self.loop.shutdown_default_executor(), STOP_TIMEOUT)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(STOP_TIMEOUT)
        if not self.thread.is_alive():
            self.loop.close()


@dataclass
class SyncConnection:
    """``sock``: a connected blocking socket to the peer (see the module's limits);
    ``route``, ``report``, ``peer_id`` as on ``Connection``. ``close()`` ends it all."""

    sock: socket.socket
    route: Route
    report: ConnectionReport
    peer_id: str
    _runner: _LoopThread = field(repr=False)
    _done: threading.Event = field(repr=False)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        self._done.wait(STOP_TIMEOUT)
        self._runner.stop()

    def __enter__(self) -> SyncConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(stun: str | Address, exchange: Callable[[bytes], bytes], *,
            peer_id: str | None = None, strategies: Sequence[str] | None = None,
            timeout: float = 15.0, **punch_options: Any) -> SyncConnection:
    """Offer, ``exchange`` offers, connect: a SyncConnection to the other side (which
    answers with ``answer``, or does the same as we do, with ``Punch`` or with this
    function). ``punch_options`` go to ``Punch`` (identity, relay, relay_secret,
    turn_user/turn_password/turn_secret, lead, name, clock, ...); errors are Punch's
    (OfferError, AuthenticationError, PunchError, TimeoutError, ...)."""
    def offer(runner: _LoopThread, punch: Punch) -> bytes:
        return exchange(runner.run(punch.offer(strategies=strategies)))   # then connect at once
    return _session(stun, offer, peer_id, timeout, punch_options)


def answer(stun: str | Address, theirs: bytes, send: Callable[[bytes], None], *,
           peer_id: str | None = None, strategies: Sequence[str] | None = None,
           timeout: float = 15.0, **punch_options: Any) -> SyncConnection:
    """The answering side: ``theirs`` is the other side's offer, just received over the app's
    channel (call this at once: the answer records when); ``send(answer)`` delivers our
    answer to it (its ``connect``'s ``exchange`` returns it). Then connect, as ``connect``.
    The start is agreed without trusting either clock."""
    received = time.time()                       # before our NAT is classified

    def reply(runner: _LoopThread, punch: Punch) -> bytes:
        # ``received`` into the Punch's clock (a clock= option may shift it).
        at = received + punch.clock() - time.time()
        send(runner.run(punch.offer(strategies=strategies, reply_to=theirs, received=at)))
        return theirs
    return _session(stun, reply, peer_id, timeout, punch_options)


def _session(stun: str | Address, offers: Callable[[_LoopThread, Punch], bytes],
             peer_id: str | None, timeout: float, punch_options: dict[str, Any]
             ) -> SyncConnection:
    """A Punch on a loop thread; ``offers`` makes and exchanges the offers and returns
    theirs; then the connection, pumped to a socket pair."""
    runner = _LoopThread()
    punch = Punch(stun, **punch_options)
    started = False
    try:
        runner.run(punch.__aenter__())
        started = True
        theirs = offers(runner, punch)
        conn = runner.run(punch.connect(theirs, peer_id=peer_id, timeout=timeout))
        user, inner = socket.socketpair()
    except BaseException:
        if started:
            with contextlib.suppress(Exception):
                runner.run(punch.close(), STOP_TIMEOUT)
        runner.stop()
        raise
    done = threading.Event()
    asyncio.run_coroutine_threadsafe(_pump(conn, inner, punch, done), runner.loop)
    return SyncConnection(user, conn.route, conn.report, conn.peer_id, runner, done)


async def _pump(conn: Connection, inner: socket.socket, punch: Punch,
                done: threading.Event) -> None:
    """Bytes both ways between the peer connection and our end of the socket pair, until
    either side ends; then everything is closed."""
    try:
        reader, writer = await asyncio.open_connection(sock=inner)

        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(CHUNK):
                dst.write(data)
                await dst.drain()

        try:
            await both_ways(copy(conn.reader, writer), copy(reader, conn.writer))
        finally:
            writer.close()
    except Exception as exc:     # the connection broke: the user's socket sees it closed
        log.info("sync connection to %s ended: %s", conn.peer_id, exc)
    finally:
        inner.close()
        with contextlib.suppress(Exception):
            await conn.close()
        with contextlib.suppress(Exception):
            await punch.close()
        done.set()
