"""The two long-lived routes: ``/tunnel/<con>`` (the HTTP connection becomes a raw two-way pipe
to the peer) and ``/events`` (server-sent events)."""
from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ..connection import both_ways
from ..errors import ApiError
from .registry import Named

if TYPE_CHECKING:
    from .app import ApiServer

CHUNK = 64 * 1024
HEARTBEAT = 15.0      # seconds between SSE comments, so a vanished subscriber is noticed


@contextlib.asynccontextmanager
async def holding(item: Named, *, read: bool = False, write: bool = False) -> AsyncIterator[None]:
    """The connection's read and/or write side for this request alone (409 when busy)."""
    locks = ([item.reading] if read else []) + ([item.writing] if write else [])
    if any(lock.locked() for lock in locks):
        raise ApiError(409, "busy", f"another request is using connection {item.name!r}")
    async with contextlib.AsyncExitStack() as stack:
        for lock in locks:
            await stack.enter_async_context(lock)
        yield


class _Feed:
    """The parser aiohttp hands the bytes of an upgraded connection to: into a StreamReader
    that pauses the socket when it holds more than twice CHUNK (back-pressure)."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self.reader.feed_data(data)
        return False, b""

    def feed_eof(self) -> None:
        self.reader.feed_eof()


class Streams:
    def __init__(self, api: ApiServer) -> None:
        self.api = api

    async def tunnel(self, request: web.Request) -> web.StreamResponse:
        """``GET /tunnel/<con>`` with ``Connection: Upgrade`` and ``Upgrade: tcp``: 101, then
        bytes both ways until either side closes (which closes the peer connection too)."""
        item = self.api.registry.get(request.match_info["con"])
        upgrade = request.headers.get("Upgrade", "").lower()
        if upgrade != "tcp" or "upgrade" not in request.headers.get("Connection", "").lower():
            raise ApiError(426, "upgrade_required",
                           "a tunnel needs 'Connection: Upgrade' and 'Upgrade: tcp' (see docs/api.md)")
        try:
            async with holding(item, read=True, write=True):
                resp = await self._pipe(request, item)
        finally:       # also when the HTTP client vanished and aiohttp cancelled us
            await self.api.drop(item)
        resp.force_close()
        if request.transport is not None:
            request.transport.close()
        return resp

    async def _pipe(self, request: web.Request, item: Named) -> web.StreamResponse:
        resp = web.StreamResponse(status=101, headers={"Connection": "Upgrade", "Upgrade": "tcp"})
        await resp.prepare(request)
        reader = asyncio.StreamReader(limit=CHUNK)
        if request.transport is not None:
            reader.set_transport(request.transport)
        request.protocol.set_parser(_Feed(reader))   # type: ignore[arg-type]
        conn = item.conn

        async def up() -> None:          # HTTP client -> peer
            while data := await reader.read(CHUNK):
                await conn.send(data)
                item.sent += len(data)
                self.api.metrics.bytes.labels("out").inc(len(data))

        async def down() -> None:        # peer -> HTTP client
            while data := await conn.recv(CHUNK):
                await resp.write(data)
                item.received += len(data)
                self.api.metrics.bytes.labels("in").inc(len(data))

        await both_ways(up(), down())
        return resp

    async def events_stream(self, request: web.Request) -> web.StreamResponse:
        """``GET /events``: ``text/event-stream``; first the NAT classification, then what
        happens: connection, plan, step, fallback, route, failed, closed."""
        queue = self.api.events.subscribe()
        try:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
            await resp.prepare(request)
            await resp.write(_sse("classification", self.api.classification()))
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), HEARTBEAT)
                except TimeoutError:
                    await resp.write(b": heartbeat\n\n")
                    continue
                if item is None:
                    break
                event, data = item
                await resp.write(f"event: {event}\ndata: {data}\n\n".encode())
        except (ConnectionError, OSError):
            pass
        finally:
            self.api.events.unsubscribe(queue)
        with contextlib.suppress(ConnectionError, OSError):
            await resp.write_eof()
        return resp


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, default=str, sort_keys=True)}\n\n".encode()
