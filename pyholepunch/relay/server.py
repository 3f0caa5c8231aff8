"""The built-in relay's stand-alone listener (``serve`` mounts the hub on its shared port)."""
from __future__ import annotations

import asyncio
import socket
from typing import TYPE_CHECKING

from ..address import Address

if TYPE_CHECKING:
    from .builtin import RelayHub


class RelayServer:
    """A stand-alone listener feeding every accepted connection to a hub (``serve`` mounts
    the hub on its shared port instead). ``async with RelayServer(hub, ("127.0.0.1", 0))``."""

    def __init__(self, hub: RelayHub, address: Address = ("127.0.0.1", 0), *,
                 backlog: int = 128, sock: socket.socket | None = None) -> None:
        self.hub = hub
        self._bind = address
        self._backlog = backlog
        self._given = sock          # an already bound socket (e.g. made in another netns)
        self._sock: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._conns: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> Address:
        assert self._sock is not None, "RelayServer not started"
        host, port = self._sock.getsockname()[:2]
        return (host, port)

    async def start(self) -> None:
        sock = self._given or socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if self._given is None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(self._bind)
            sock.listen(self._backlog)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._accept_task = asyncio.ensure_future(self._accept_loop())

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        while True:
            conn, _peer = await loop.sock_accept(self._sock)
            task = asyncio.ensure_future(self.hub.handle_connection(conn))
            self._conns.add(task)
            task.add_done_callback(self._conns.discard)

    async def close(self) -> None:
        if self._accept_task is not None:
            self._accept_task.cancel()
            await asyncio.gather(self._accept_task, return_exceptions=True)
        if self._sock is not None:
            self._sock.close()
        await self.hub.close()
        if self._conns:
            await asyncio.gather(*self._conns, return_exceptions=True)

    async def __aenter__(self) -> RelayServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
