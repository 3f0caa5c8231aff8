"""Server-side TLS over a plain asyncio transport, through ``ssl.MemoryBIO``.

Why not ``loop.create_server(ssl=...)``: CPython's SSLProtocol keeps a 256 KiB read buffer
per connection for its whole life, which alone is 256 MB per 1,000 idle peers. Here records
are decrypted with ``SSLObject.read`` into right-sized bytes and OpenSSL releases its own
buffers between records (CPython sets SSL_MODE_RELEASE_BUFFERS), so an idle peer costs a few
KiB. The wrapped application protocol sees a transport-like object (``TlsTransport``).
"""
from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)
_READ_CHUNK = 16384     # one TLS record's plaintext at most


class TlsTransport(asyncio.Protocol):
    """Accepts a plain TCP connection, runs the TLS server handshake, then relays plaintext."""

    def __init__(self, context: ssl.SSLContext, app_factory: Callable[[], asyncio.Protocol],
                 handshake_timeout: float = 10.0,
                 on_lost: Callable[[TlsTransport], None] | None = None) -> None:
        self._on_lost = on_lost
        self._context = context
        self._app_factory = app_factory
        self._handshake_timeout = handshake_timeout
        self._app: asyncio.Protocol | None = None
        self._transport: asyncio.Transport | None = None
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl: ssl.SSLObject | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    # -- asyncio.Protocol (the plain side) -------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._ssl = self._context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._timer = asyncio.get_running_loop().call_later(self._handshake_timeout, self.abort)

    def data_received(self, data: bytes) -> None:
        assert self._ssl is not None
        self._incoming.write(data)
        if self._app is None:
            try:
                self._ssl.do_handshake()
            except ssl.SSLWantReadError:
                self._flush()
                return
            except (ssl.SSLError, OSError) as exc:
                log.debug("TLS handshake failed: %s", exc)
                self._flush()
                self.abort()
                return
            if self._timer is not None:
                self._timer.cancel()
            self._flush()
            self._app = self._app_factory()
            self._app.connection_made(self)  # type: ignore[arg-type]
        chunks, eof = [], False
        while True:
            try:
                chunk = self._ssl.read(_READ_CHUNK)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                eof = True
                break
            except (ssl.SSLError, OSError) as exc:
                log.debug("TLS error: %s", exc)
                self.abort()
                return
            if not chunk:
                eof = True
                break
            chunks.append(chunk)
        self._flush()                  # post-handshake messages (session tickets, key updates)
        if chunks and not self._closed:
            self._app.data_received(b"".join(chunks))
        if eof and not self._closed:
            self._app.eof_received()

    def eof_received(self) -> bool | None:
        if self._app is not None:
            self._app.eof_received()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._on_lost is not None:
            self._on_lost(self)
        if self._timer is not None:
            self._timer.cancel()
        if self._app is not None:
            self._app.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._app is not None:
            self._app.pause_writing()

    def resume_writing(self) -> None:
        if self._app is not None:
            self._app.resume_writing()

    # -- transport-like API (the application side) ------------------------------------------
    def write(self, data: bytes) -> None:
        if self._closed or self._ssl is None:
            return
        try:
            self._ssl.write(data)
        except (ssl.SSLError, OSError) as exc:
            log.debug("TLS write failed: %s", exc)
            self.abort()
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
            except (ssl.SSLError, OSError):
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

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() if self._transport else 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self._ssl
        if name == "peercert":
            return self._ssl.getpeercert() if self._ssl else default
        return self._transport.get_extra_info(name, default) if self._transport else default

    def _flush(self) -> None:
        data = self._outgoing.read()
        if data and self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)
