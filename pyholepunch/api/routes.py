"""The HTTP API's routes: p2pd's set (same paths and success bodies, with ``"error": 0``) and ours.

Failures use real status codes and ``{"error": code, "message": text}`` (see docs/api.md).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .. import __version__
from ..address import format_address
from ..errors import ApiError, HolePunchError, SignalingError
from ..signal.protocol import NAME_RE as PEER_NAME_RE
from ..signal.protocol import PEER_ID_RE
from .registry import Named, opening
from .streams import CHUNK, Streams, holding

if TYPE_CHECKING:
    from .app import ApiServer

log = logging.getLogger(__name__)
MAX_RECV = 1 << 20             # bytes one /recv or /binary GET returns without ?size=
MAX_DOWNLOAD = 1 << 30         # the largest ?size= of a GET /binary
MAX_WAIT = 300.0               # seconds any /timeout/<s> may ask for


def ok(data: dict[str, Any], status: int = 200) -> web.Response:
    return web.json_response({**data, "error": 0}, status=status)


def wait_time(request: web.Request, default: float) -> float:
    text = request.match_info.get("timeout") or request.query.get("timeout")
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= MAX_WAIT:
        raise ApiError(400, "bad_timeout", f"timeout must be seconds in (0, {MAX_WAIT:g}], got {text[:20]!r}")
    return value


class Routes:
    """The handlers, over ``api`` (the ApiServer: peer, registry, events, metrics, limits)."""

    def __init__(self, api: ApiServer) -> None:
        self.api = api
        self.streams = Streams(api)

    def add_routes(self, app: web.Application) -> None:
        get = app.router.add_get
        for path, handler in [
            ("/version", self.version), ("/ifs", self.ifs), ("/addr", self.addr),
            ("/nat", self.nat), ("/connections", self.connections), ("/metrics", self.metrics_page),
            ("/events", self.streams.events_stream), ("/open/{con}/{peer}", self.open),
            ("/info/{con}", self.info), ("/send/{con}/{text:.+}", self.send),
            ("/recv/{con}", self.recv), ("/recv/{con}/timeout/{timeout}", self.recv),
            ("/binary/{con}", self.binary_get), ("/binary/{con}/timeout/{timeout}", self.binary_get),
            ("/close/{con}", self.close_con), ("/tunnel/{con}", self.streams.tunnel),
            ("/accept", self.accept), ("/accept/timeout/{timeout}", self.accept),
            ("/connections/{con}/report", self.report), ("/sub/{rest:.*}", self.sub),
        ]:
            get(path, handler, allow_head=False)
        app.router.add_post("/binary/{con}", self.binary_post, expect_handler=self.expect)
        app.router.add_delete("/sub/{rest:.*}", self.sub)

    # -- about this peer ---------------------------------------------------------------------
    async def version(self, request: web.Request) -> web.Response:
        return ok({"title": "pyholepunch", "author": "pyholepunch", "version": __version__, "api": 1})

    async def ifs(self, request: web.Request) -> web.Response:
        return ok({"ifs": [{"name": name, "index": index} for index, name in socket.if_nameindex()],
                   "route_source": self.api.peer.local_ip})

    async def addr(self, request: web.Request) -> web.Response:
        p = self.api.peer
        return ok({"addr": p.peer_id, "name": p.name, "peer_id": p.peer_id,
                   "server": format_address(p.server)})

    async def nat(self, request: web.Request) -> web.Response:
        p = self.api.peer
        return ok({"profiles": {k: v.to_dict() for k, v in p.profiles.items()},
                   "announced": list(p.announced or ()), "local": [p.local_ip, p.local_port]})

    async def metrics_page(self, request: web.Request) -> web.Response:
        from ..metrics import CONTENT_TYPE
        return web.Response(body=self.api.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE})

    async def connections(self, request: web.Request) -> web.Response:
        self.api.registry.forget_closed()
        return ok({"connections": [i.info() for i in self.api.registry.items.values()]})

    async def report(self, request: web.Request) -> web.Response:
        item = self.api.registry.get(request.match_info["con"])
        return web.json_response(item.conn.report.to_dict())

    # -- connections -------------------------------------------------------------------------
    async def open(self, request: web.Request) -> web.Response:
        name, target = request.match_info["con"], request.match_info["peer"]
        if not (PEER_NAME_RE.match(target) or PEER_ID_RE.match(target)):
            raise ApiError(400, "bad_peer", f"{target[:80]!r} is no peer name or peer_id")
        if target in ("self", self.api.peer.name, self.api.peer.peer_id):
            raise ApiError(400, "bad_peer", "a peer cannot connect to itself (p2pd's 'self' "
                                            "test target has no counterpart here)")
        timeout = wait_time(request, 15.0)
        self.api.registry.reserve(name)
        token = opening.set(name)
        try:
            conn = await self.api.peer.connect(target, timeout=timeout)
        except SignalingError as exc:
            self.api.metrics.failures.inc()
            raise ApiError(404 if exc.code == 404 else 502, "signaling", str(exc)) from None
        except TimeoutError as exc:
            self.api.metrics.failures.inc()
            raise ApiError(504, "timeout", str(exc) or f"no connection within {timeout:g} s") from None
        except (HolePunchError, OSError) as exc:
            self.api.metrics.failures.inc()
            raise ApiError(502, "connect_failed", f"{type(exc).__name__}: {exc}") from None
        finally:
            opening.reset(token)
            self.api.registry.release(name)
        item = self.api.adopt(name, conn, "out")
        return ok(item.info(), 201)

    async def accept(self, request: web.Request) -> web.Response:
        timeout = wait_time(request, 30.0)
        deadline = time.monotonic() + timeout
        while True:
            try:
                name = await asyncio.wait_for(self.api.registry.accepted.get(),
                                              max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise ApiError(504, "timeout", f"no incoming connection within {timeout:g} s") from None
            item = self.api.registry.items.get(name)
            if item is not None and not item.conn.closed:
                return ok(item.info())

    async def info(self, request: web.Request) -> web.Response:
        return ok(self.api.registry.get(request.match_info["con"]).info())

    async def close_con(self, request: web.Request) -> web.Response:
        item = self.api.registry.get(request.match_info["con"])
        await self.api.drop(item)
        return ok({"closed": item.name})

    async def send(self, request: web.Request) -> web.Response:
        item = self.api.registry.get(request.match_info["con"])
        data = request.match_info["text"].encode()
        async with holding(item, write=True):
            await self._send(item, data)
        return ok({"name": item.name, "sent": len(data)})

    async def recv(self, request: web.Request) -> web.Response:
        item = self.api.registry.get(request.match_info["con"])
        data = await self._recv(item, MAX_RECV, wait_time(request, 2.0))
        return ok({"name": item.name, "data": data.decode("utf-8", "replace"), "bytes": len(data),
                   "client_tup": list(item.conn.remote_address or ())})

    async def binary_get(self, request: web.Request) -> web.StreamResponse:
        item = self.api.registry.get(request.match_info["con"])
        timeout = wait_time(request, 2.0)
        size_text = request.query.get("size")
        if size_text is None:
            return web.Response(body=await self._recv(item, MAX_RECV, timeout),
                                content_type="application/octet-stream")
        if not size_text.isdigit() or not 0 < int(size_text) <= MAX_DOWNLOAD:
            raise ApiError(400, "bad_size", f"size must be 1..{MAX_DOWNLOAD}, got {size_text[:20]!r}")
        left = int(size_text)
        async with holding(item, read=True):
            first = await self._recv(item, min(CHUNK, left), timeout, locked=True)
            resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
            resp.content_length = left
            await resp.prepare(request)
            try:
                while True:
                    await resp.write(first)
                    left -= len(first)
                    if not left:
                        break
                    first = await self._recv(item, min(CHUNK, left), timeout, locked=True)
            except ApiError as exc:     # the status is sent: all we can do is cut it short
                log.info("GET /binary/%s cut short: %s", item.name, exc.message)
                resp.force_close()
                if request.transport is not None:
                    request.transport.close()
            return resp

    async def expect(self, request: web.Request) -> web.StreamResponse | None:
        """``Expect: 100-continue``: refuse a too-big or unauthorized upload before its body."""
        refusal = self.api.refusal(request) or self._too_big(request)
        if refusal is not None:
            return self.api.error_response(*refusal)
        if request.headers.get("Expect", "").lower() != "100-continue":
            return self.api.error_response(417, "bad_expect", "only Expect: 100-continue is understood")
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0      # the body has not started (as aiohttp's own does)
        return None

    async def binary_post(self, request: web.Request) -> web.Response:
        item = self.api.registry.get(request.match_info["con"])
        too_big = self._too_big(request)
        if too_big is not None:
            raise ApiError(*too_big)
        sent = 0
        async with holding(item, write=True):
            while True:
                try:
                    chunk = await asyncio.wait_for(request.content.readany(), self.api.body_timeout)
                except TimeoutError:
                    raise ApiError(408, "slow_body", f"no body bytes for {self.api.body_timeout:g} s "
                                                     f"({sent} sent to the peer)") from None
                if not chunk:
                    break
                if sent + len(chunk) > self.api.max_body:
                    raise ApiError(413, "body_too_large", f"more than {self.api.max_body} bytes "
                                                          f"({sent} sent to the peer)")
                await self._send(item, chunk)
                sent += len(chunk)
        return ok({"name": item.name, "sent": sent})

    def _too_big(self, request: web.Request) -> tuple[int, str, str] | None:
        length = request.content_length
        if length is not None and length > self.api.max_body:
            return (413, "body_too_large", f"{length} bytes declared, at most {self.api.max_body}")
        return None

    async def sub(self, request: web.Request) -> web.Response:
        raise ApiError(501, "not_implemented",
                       "p2pd's /sub message filters are for datagrams; a TCP connection is one "
                       "byte stream with no message boundaries to filter: use /recv or /tunnel")

    # -- data helpers ------------------------------------------------------------------------
    async def _send(self, item: Named, data: bytes) -> None:
        try:
            await item.conn.send(data)
        except (ConnectionError, OSError) as exc:
            await self.api.drop(item)
            raise ApiError(410, "connection_closed", f"connection {item.name!r}: {exc}") from None
        item.sent += len(data)
        self.api.metrics.bytes.labels("out").inc(len(data))

    async def _recv(self, item: Named, n: int, timeout: float, *,
                    locked: bool = False) -> bytes:
        async with contextlib.nullcontext() if locked else holding(item, read=True):
            try:
                data = await asyncio.wait_for(item.conn.recv(n), timeout)
            except TimeoutError:
                raise ApiError(504, "timeout", f"nothing arrived on {item.name!r} within "
                                               f"{timeout:g} s") from None
            except (ConnectionError, OSError) as exc:
                data, why = b"", str(exc)
            else:
                why = "the peer closed the connection"
        if not data:
            await self.api.drop(item)
            raise ApiError(410, "connection_closed", f"connection {item.name!r}: {why}")
        item.received += len(data)
        self.api.metrics.bytes.labels("in").inc(len(data))
        return data
