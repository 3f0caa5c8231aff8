"""The asyncio side of the wire: one UDP socket for PCP, NAT-PMP and SSDP (answers told apart
by source port and first byte), request/response with retransmission, and HTTP/1.1 requests
to the gateway for UPnP. Every destination is the gateway; nothing else is ever addressed.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

from ..errors import PortMapError, PortMapUnavailable, RemoteProtocolError
from . import upnp

log = logging.getLogger(__name__)
T = TypeVar("T")
Matcher = Callable[[bytes, tuple[str, int]], Any]    # -> a result, or None if not for us


class _Waiter:
    def __init__(self, match: Matcher, fut: asyncio.Future[Any]) -> None:
        self.match, self.fut = match, fut
        self.bad: str = ""          # the last malformed answer seen, for the error message


class Wire(asyncio.DatagramProtocol):
    """One UDP socket bound to the local address, talking only to ``gateway``."""

    def __init__(self, gateway: str) -> None:
        self.gateway = gateway
        self.transport: asyncio.DatagramTransport | None = None
        self._waiters: list[_Waiter] = []
        self.received = 0
        self.malformed: list[str] = []      # what was wrong with bad answers (the first few)

    @classmethod
    async def open(cls, gateway: str, local_ip: str) -> Wire:
        loop = asyncio.get_running_loop()
        _, wire = await loop.create_datagram_endpoint(lambda: cls(gateway), local_addr=(local_ip, 0))
        return wire

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        if addr[0] != self.gateway:
            log.debug("ignoring %d bytes from %s:%d (not the gateway)", len(data), addr[0], addr[1])
            return
        self.received += 1
        for w in list(self._waiters):
            if w.fut.done():
                continue
            try:
                result = w.match(data, (addr[0], addr[1]))
            except RemoteProtocolError as exc:
                w.bad = str(exc)
                if len(self.malformed) < 5 and w.bad not in self.malformed:
                    self.malformed.append(w.bad)
                log.info("malformed answer from the gateway %s: %s", self.gateway, exc)
                continue
            except PortMapError as exc:
                w.fut.set_exception(exc)
                return
            if result is not None:
                w.fut.set_result(result)
                return

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable: the router does not run that service. Nothing to do here:
        # the waiters time out (the probe's budget is short).
        log.debug("UDP error from the gateway: %s", exc)

    def send(self, data: bytes, port: int) -> None:
        if self.transport is not None:
            self.transport.sendto(data, (self.gateway, port))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def request(self, sends: list[tuple[bytes, int]], match: Matcher, *, rto: float,
                      attempts: int, what: str, protocol: str) -> Any:
        """Send ``sends`` and wait for an answer ``match`` accepts; resend after rto, 2*rto...
        PortMapUnavailable (naming the last malformed answer, if any) when none came."""
        loop = asyncio.get_running_loop()
        waiter = _Waiter(match, loop.create_future())
        self._waiters.append(waiter)
        try:
            wait = rto
            for _ in range(attempts):
                for data, port in sends:
                    self.send(data, port)
                try:
                    return await asyncio.wait_for(asyncio.shield(waiter.fut), wait)
                except TimeoutError:
                    wait *= 2
            bad = f" (last answer malformed: {waiter.bad})" if waiter.bad else ""
            raise PortMapUnavailable(f"{what}: no answer from {self.gateway}{bad}", protocol=protocol)
        finally:
            self._waiters.remove(waiter)
            if not waiter.fut.done():
                waiter.fut.cancel()

    def listen(self, match: Matcher) -> asyncio.Future[Any]:
        """A future for the first answer ``match`` accepts (the probe sends by itself)."""
        waiter = _Waiter(match, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        waiter.fut.add_done_callback(lambda _: self._waiters.remove(waiter))
        return waiter.fut


async def http(gateway: str, local_ip: str, method: str, url: str, *, body: bytes = b"",
               headers: dict[str, str] | None = None, timeout: float = 2.0
               ) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request (Connection: close) to the gateway; the whole response."""
    host, port, _ = upnp.check_url(url)
    if host != gateway:
        raise PortMapError(f"UPnP URL {url!r} points away from the gateway {gateway}",
                           protocol="upnp")
    request = upnp.encode_http_request(method, url, body=body, headers=headers)
    deadline = time.monotonic() + timeout
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, port, local_addr=(local_ip, 0))
        try:
            writer.write(request)
            await writer.drain()
            data = bytearray()
            limit = upnp.MAX_BODY + upnp.MAX_HEADER
            while chunk := await reader.read(65536):
                data += chunk
                if len(data) > limit:
                    raise RemoteProtocolError(f"HTTP response over {limit} bytes", field="http")
        finally:
            writer.close()
    log.debug("%s %s: %d bytes in %.0f ms", method, url, len(data),
              (timeout - (deadline - time.monotonic())) * 1000)
    return upnp.parse_http_response(bytes(data))
