"""TLS over a plain asyncio transport, through ``ssl.MemoryBIO``: the package's one TLS layer
of its own, used by the rendezvous server (one per peer connection, server side) and by the
peer-to-peer TLS in security.py (either side, over a socket or the built-in relay's streams).

Why not ``loop.create_server(ssl=...)`` / ``start_tls``: CPython's SSLProtocol keeps a
256 KiB read buffer per connection for its whole life, which alone is 256 MB per 1,000 idle
peers; here records are decrypted with ``SSLObject.read`` into right-sized bytes and OpenSSL
releases its own buffers between records (CPython sets SSL_MODE_RELEASE_BUFFERS), so an idle
peer costs a few KiB. And asyncio's own TLS drops the alert that tells a refused peer why (it
sees a bare reset instead); this layer sends it. ``start_tls`` would also lose bytes a stream
had already buffered.

``TlsTransport`` is an asyncio protocol on the ciphertext side and a transport to the
application (plaintext) side: the application protocol comes from ``app_factory`` once the
handshake is done, and ``handshake_done`` tells a waiting caller how the handshake ended.
"""
from __future__ import annotations

import asyncio
import logging
import ssl
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)
_READ_CHUNK = 16384     # one TLS record's plaintext at most
_RECV_BUFFER = 65536    # ciphertext received per recv_into (BufferedTls)
_buffers = threading.local()    # one receive buffer per thread (per event loop), not per peer


def _retrieved(fut: asyncio.Future[None]) -> None:
    """Mark a failed handshake's exception as seen (no "never retrieved" log at collection)."""
    if not fut.cancelled():
        fut.exception()


class TlsTransport(asyncio.Protocol, asyncio.Transport):
    """TLS through memory BIOs between a plain transport and an application protocol.

    ``handshake_timeout`` (None: the caller bounds it) aborts a handshake that takes longer.
    ``abort_on_failure``: a failed handshake or a TLS error aborts the connection at once (the
    server: an attacker gets nothing more); without it the alert is flushed and closing is
    left to the caller, who has ``handshake_done`` (security.py: the other peer learns why).
    At the peer's end of stream (close_notify or TCP FIN) the application gets its EOF and,
    unless its ``eof_received`` asks to keep the connection open, the connection closes: no
    half-open TLS is left behind (asyncio's TLS transport does the same).
    """

    def __init__(self, context: ssl.SSLContext, app_factory: Callable[[], asyncio.Protocol],
                 handshake_timeout: float | None = 10.0,
                 on_lost: Callable[[TlsTransport], None] | None = None, *,
                 server_side: bool = True, abort_on_failure: bool = True,
                 lead: bytes = b"") -> None:
        self._on_lost = on_lost
        self._lead = lead       # dropped where the stream starts with it (no TLS record does)
        self._context = context
        self._app_factory = app_factory
        self._handshake_timeout = handshake_timeout
        self._server_side = server_side
        self._abort_on_failure = abort_on_failure
        self._app: asyncio.Protocol | None = None
        self._transport: asyncio.Transport | None = None
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl: ssl.SSLObject | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._eof_delivered = False
        self._error: BaseException | None = None
        self.handshake_done: asyncio.Future[None] | None = None
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def take_over(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Become the protocol of the transport under an asyncio stream pair, fed first with
        what ``reader`` had already buffered (nothing more arrives there). The pair is kept:
        a StreamWriter that is garbage collected closes its transport."""
        self._streams = (reader, writer)
        peer_left = reader.at_eof()
        writer.transport.set_protocol(self)
        self.connection_made(writer.transport)
        reader.feed_eof()
        if buffered := await reader.read():        # returns at once: the EOF is fed
            self.data_received(buffered)
        if peer_left:
            self.eof_received()

    # -- asyncio.Protocol (the plain side) -------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._ssl = self._context.wrap_bio(self._incoming, self._outgoing,
                                           server_side=self._server_side)
        loop = asyncio.get_running_loop()
        self.handshake_done = loop.create_future()
        self.handshake_done.add_done_callback(_retrieved)   # the server never awaits it
        if self._handshake_timeout is not None:
            self._timer = loop.call_later(self._handshake_timeout, self.abort)
        if not self._server_side:
            self._handshake()                      # the client speaks first

    def data_received(self, data: bytes | memoryview) -> None:
        if self._lead:
            lead, self._lead = self._lead, b""
            data = bytes(data)
            if data.startswith(lead):
                data = data[len(lead):]
        self._incoming.write(data)
        if self._app is None and not self._handshake():
            return
        self._deliver()

    def eof_received(self) -> bool | None:
        self._incoming.write_eof()
        if self._app is None:
            self._handshake()                      # fails: the peer left mid-handshake
            return None
        self._deliver()
        self._app_eof()
        return True                                # _app_eof closed what is not kept open

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._on_lost is not None:
            self._on_lost(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.handshake_done is not None and not self.handshake_done.done():
            self.handshake_done.set_exception(
                exc or ConnectionResetError("connection closed during the TLS handshake"))
        if self._app is not None:
            error = exc or self._error
            self._app.connection_lost(error if isinstance(error, Exception) else None)

    def pause_writing(self) -> None:
        if self._app is not None:
            self._app.pause_writing()

    def resume_writing(self) -> None:
        if self._app is not None:
            self._app.resume_writing()

    # -- transport API (the application side) -----------------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed or self._ssl is None or not data:
            return
        try:
            self._ssl.write(data)
        except (ssl.SSLError, OSError) as exc:
            self._fail("TLS write failed", exc)
            return
        self._flush()

    def close(self) -> None:
        """Send close_notify, then close the TCP connection after buffered data."""
        if self._closed:
            return
        self._closed = True
        if self._ssl is not None and self._app is not None:
            try:
                self._ssl.unwrap()
            except (ssl.SSLError, OSError, ValueError):
                pass
            self._flush()
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        self._closed = True
        if self._transport is not None:
            self._transport.abort()

    def is_closing(self) -> bool:
        return self._closed

    def can_write_eof(self) -> bool:
        return False                               # TLS cannot half-close

    def pause_reading(self) -> None:
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self._transport is not None:
            self._transport.resume_reading()

    def is_reading(self) -> bool:
        return self._transport is not None and self._transport.is_reading()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        assert isinstance(protocol, asyncio.Protocol)
        self._app = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._app is not None
        return self._app

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() if self._transport else 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self._ssl
        if name == "sslcontext":
            return self._context
        if name == "peercert":
            return self._ssl.getpeercert() if self._ssl else default
        if name == "cipher":
            return self._ssl.cipher() if self._ssl else default
        return self._transport.get_extra_info(name, default) if self._transport else default

    # -- internals ---------------------------------------------------------------------------
    def _handshake(self) -> bool:
        """Advance the handshake; True once it is done and the application is connected."""
        assert self._ssl is not None and self.handshake_done is not None
        try:
            self._ssl.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return False
        except (ssl.SSLError, OSError) as exc:
            log.debug("TLS handshake failed: %s", exc)
            self._flush()                          # the alert tells the peer why
            if not self.handshake_done.done():
                self.handshake_done.set_exception(exc)
            if self._abort_on_failure:
                self.abort()
            return False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None          # a cancelled handle kept would pin 3 objects a peer
        self._flush()
        self._app = self._app_factory()
        self._app.connection_made(self)
        if not self.handshake_done.done():
            self.handshake_done.set_result(None)
        return True

    def _deliver(self) -> None:
        """Decrypt what is buffered into the application; its EOF at close_notify."""
        assert self._ssl is not None and self._app is not None
        chunks: list[bytes] = []
        eof = False
        incoming, tls = self._incoming, self._ssl
        while True:
            # Nothing buffered on either side and no EOF to learn: the next read could only
            # raise SSLWantReadError, an exception per received record (#18). Read at most
            # what is buffered (plaintext <= its record): no 16 KiB bytes made and shrunk.
            size = max(incoming.pending, tls.pending())
            if not size and not incoming.eof and chunks:
                break
            try:
                chunk = tls.read(min(size, _READ_CHUNK) or _READ_CHUNK)
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                eof = True                         # close_notify, or a bare TCP FIN
                break
            except (ssl.SSLError, OSError) as exc:
                self._fail("TLS error", exc)
                return
            if not chunk:
                eof = True
                break
            chunks.append(chunk)
        if self._outgoing.pending:     # post-handshake messages (session tickets, key updates)
            self._flush()
        if chunks and not self._closed:
            self._app.data_received(b"".join(chunks))
        if eof:
            self._app_eof()

    def _app_eof(self) -> None:
        if self._app is not None and not self._eof_delivered and not self._closed:
            self._eof_delivered = True
            if not self._app.eof_received():
                self.close()

    def _fail(self, what: str, exc: BaseException) -> None:
        log.debug("%s: %s", what, exc)
        self._error = exc
        self.abort()

    def _flush(self) -> None:
        data = self._outgoing.read()
        if data and self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)


class BufferedTls(TlsTransport, asyncio.BufferedProtocol):
    """A TlsTransport that the socket transport fills with ``recv_into`` a buffer shared by
    its thread: asyncio's plain ``recv(256 KiB)`` allocates (and shrinks) a 256 KiB bytes per
    read, ~15 us of a ~140 us coordination on the server (#18). The ciphertext is copied into
    the incoming BIO at once, so the buffer is free again before anything else runs."""

    def get_buffer(self, sizehint: int) -> memoryview:
        view: memoryview | None = getattr(_buffers, "view", None)
        if view is None:
            view = _buffers.view = memoryview(bytearray(_RECV_BUFFER))
        return view

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(_buffers.view[:nbytes])
