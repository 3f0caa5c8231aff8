"""ApiServer: the HTTP interface over one started Peer (aiohttp).

Limits, all constructor arguments: named connections (``max_connections``), HTTP connections
at once (``max_clients``; more are answered 503 and closed), request bodies (``max_body``; a
larger ``Content-Length`` is refused with 413 before its body is read, also on ``Expect:
100-continue``), a client that sends no complete request within ``header_timeout`` or pauses
a body longer than ``body_timeout`` (408), event subscribers (``Events``).
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from ..address import Address, format_address
from ..connection import Connection
from ..errors import ApiError
from ..metrics import PeerMetrics
from ..peer import Peer
from ..report import ConnectionReport
from .auth import Gate
from .registry import Events, Named, Registry, opening
from .routes import Routes

log = logging.getLogger(__name__)
STATUS_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 408: "timeout",
                413: "body_too_large", 414: "uri_too_long", 431: "headers_too_large"}


class _JsonErrors(RequestHandler):
    """aiohttp's connection handler, answering requests it cannot even parse (a bad request
    line, headers over 8 KiB, not HTTP at all) with our JSON error body, logged at debug: a
    client's garbage is not a server error."""

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None, message: str | None = None,
                     ) -> web.StreamResponse:
        if status >= 500:
            self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
        else:
            log.debug("unparsable request from %s: %s", request.remote, message or exc)
        if request.writer.output_size > 0:
            raise ConnectionError("response already started: cannot send the error")
        code = STATUS_CODES.get(status, "bad_request" if status < 500 else "internal")
        text = (message or str(exc or "") or "bad request").splitlines()[0][:200]
        resp = web.json_response({"error": code, "message": text}, status=status)
        resp.force_close()
        return resp


class _Busy(asyncio.Protocol):
    """Answers 503 and closes: too many HTTP connections at once."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        body = b'{"error": "busy", "message": "too many HTTP connections to this API"}'
        assert isinstance(transport, asyncio.Transport)
        transport.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                        b"Connection: close\r\nContent-Length: " + str(len(body)).encode()
                        + b"\r\n\r\n" + body)
        transport.close()


class ApiServer:
    def __init__(self, peer: Peer, *, listen: Address, token: str, max_connections: int = 64,
                 max_clients: int = 128, max_body: int = 64 << 20, header_timeout: float = 10.0,
                 body_timeout: float = 30.0, allow_hosts: Sequence[str] = ()) -> None:
        self.peer = peer
        self.listen = listen
        self.gate = Gate(token, listen, allow_hosts)
        self.max_clients, self.max_body = max_clients, max_body
        self.header_timeout, self.body_timeout = header_timeout, body_timeout
        self.registry = Registry(max_connections)
        self.events = Events()
        self.metrics = PeerMetrics(lambda: len(self.registry))
        self.address: Address = listen
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None
        self._acceptor: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        app = web.Application(middlewares=[self._middleware], client_max_size=self.max_body)
        self.routes = Routes(self)
        self.routes.add_routes(app)
        # lingering_time: after refusing a body, read and discard it for at most 1 s (so the
        # client sees the answer, not a reset), never aiohttp's default 10 s of 1 GB uploads.
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True,
                                     keepalive_timeout=30.0, lingering_time=1.0)
        await self._runner.setup()
        http = self._runner.server
        assert http is not None
        loop = asyncio.get_running_loop()

        def factory() -> asyncio.Protocol:
            if len(http.connections) >= self.max_clients:
                return _Busy()
            proto = _JsonErrors(http, loop=loop, **http._kwargs)
            loop.call_later(self.header_timeout, self._first_request_due, proto)
            return proto

        host, port = self.listen
        self._server = await loop.create_server(factory, host, port, reuse_address=True, backlog=128)
        self.address = (host, self._server.sockets[0].getsockname()[1])
        self.gate.set_port(self.address[1])
        self.peer.report_hooks.append(self._watch_report)
        self._acceptor = asyncio.create_task(self._accept_loop())
        self.events.publish("classification", self.classification())

    async def close(self) -> None:
        if self._acceptor is not None:
            self._acceptor.cancel()
            await asyncio.gather(self._acceptor, return_exceptions=True)
        if self._watch_report in self.peer.report_hooks:
            self.peer.report_hooks.remove(self._watch_report)
        self.events.close()
        if self._server is not None:
            self._server.close()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._server is not None:
            await self._server.wait_closed()
        await self.registry.close_all()

    async def __aenter__(self) -> ApiServer:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def url(self) -> str:
        return f"http://{format_address(self.address)}"

    def _first_request_due(self, proto: Any) -> None:
        """A client that has not completed one request by now is slow or idle: 408, closed."""
        transport = getattr(proto, "transport", None)
        if getattr(proto, "_request_count", 1) == 0 and transport is not None \
                and not transport.is_closing():
            body = b'{"error": "timeout", "message": "no complete request in time"}'
            transport.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
                            b"Connection: close\r\nContent-Length: " + str(len(body)).encode()
                            + b"\r\n\r\n" + body)
            transport.close()

    # -- requests --------------------------------------------------------------------------
    def refusal(self, request: web.BaseRequest) -> tuple[int, str, str] | None:
        h = request.headers
        return self.gate.refusal(h.get("Host"), h.get("Origin"), h.get("Authorization"))

    @staticmethod
    def error_response(status: int, code: str, message: str) -> web.Response:
        headers = {"WWW-Authenticate": 'Bearer realm="pyholepunch"'} if status == 401 else None
        resp = web.json_response({"error": code, "message": message}, status=status,
                                 headers=headers)
        if status in (408, 413):     # a body is left unread (or half read): end the connection
            resp.force_close()
        return resp

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        refusal = self.refusal(request)
        resp: web.StreamResponse
        if refusal is not None:
            resp = self.error_response(*refusal)
        else:
            try:
                resp = await handler(request)
            except ApiError as exc:
                resp = self.error_response(exc.status, exc.code, exc.message)
            except web.HTTPException as exc:
                resp = self.error_response(exc.status, STATUS_CODES.get(exc.status, "http_error"),
                                           f"{exc.reason}: {request.method} {request.path[:200]}")
            except (ConnectionError, asyncio.CancelledError):
                raise
            except Exception as exc:
                log.exception("API request %s %s failed", request.method, request.path[:200])
                resp = self.error_response(500, "internal", f"{type(exc).__name__}: {exc}")
        self.metrics.requests.labels(str(resp.status)).inc()
        return resp

    # -- connections -----------------------------------------------------------------------
    def adopt(self, name: str, conn: Connection, direction: str) -> Named:
        item = self.registry.add(name, conn, direction)
        self.metrics.connected(conn.report)
        self.events.publish("connection", {"con": name, "direction": direction,
                                           "peer": conn.peer_name, "route": str(conn.route)})
        return item

    async def drop(self, item: Named) -> None:
        if self.registry.items.get(item.name) is item:
            del self.registry.items[item.name]
            self.events.publish("closed", {"con": item.name, "peer": item.conn.peer_name,
                                           "bytes_sent": item.sent, "bytes_received": item.received})
        await item.conn.close()

    async def _accept_loop(self) -> None:
        """Every incoming connection gets a name and a place in /connections; /accept hands
        out the names in order."""
        queue = self.registry.accepted
        while True:
            conn = await self.peer.accept()
            name = self.registry.incoming_name(conn)
            if name is None:
                log.warning("refusing a connection from %s: %d connections open already",
                            conn.peer_name or conn.peer_id, self.registry.max_connections)
                await conn.close()
                continue
            self.adopt(name, conn, "in")
            if queue.qsize() >= self.registry.max_connections:
                queue.get_nowait()          # nobody calls /accept: keep the newest names
            queue.put_nowait(name)

    def _watch_report(self, report: ConnectionReport) -> None:
        con = opening.get()

        def forward(event: str, data: dict[str, Any]) -> None:
            self.events.publish(event, {"con": con, "role": report.role,
                                        "peer": report.peer_name, **data})
        report.observers.append(forward)

    def classification(self) -> dict[str, Any]:
        p = self.peer
        return {"name": p.name, "peer_id": p.peer_id,
                "profiles": {k: v.to_dict() for k, v in p.profiles.items()},
                "announced": list(p.announced or ())}


__all__ = ["ApiServer"]
