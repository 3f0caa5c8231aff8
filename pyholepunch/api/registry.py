"""The API's named connections and its event stream (no HTTP here).

Connections are known by the name the client gave at ``/open/<con>/...`` or, for incoming
ones, a name made from the peer's (``bob``, ``bob-2``, ...). Their number is bounded; a
connection that closes (either side) leaves the table. One request at a time may read a
connection, one may write it (a tunnel holds both); a second gets 409.

Events: every subscriber gets a bounded queue; one that does not keep up is dropped (its
stream ends with an ``overflow`` event) rather than growing memory.
"""
from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

from ..connection import Connection
from ..errors import ApiError

NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
EVENT_QUEUE = 256
# The connection name an /open request is creating, seen by the report hook that runs in the
# same task (peer.connect is awaited by the handler).
opening: contextvars.ContextVar[str | None] = contextvars.ContextVar("opening", default=None)


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise ApiError(400, "bad_name", f"connection name {name[:80]!r}: use 1-64 of A-Z a-z 0-9 _ . -")
    return name


@dataclass
class Named:
    name: str
    conn: Connection
    direction: str                       # "out" (we opened it) or "in" (accepted)
    created: float = field(default_factory=time.time)
    sent: int = 0
    received: int = 0
    reading: asyncio.Lock = field(default_factory=asyncio.Lock)
    writing: asyncio.Lock = field(default_factory=asyncio.Lock)

    def info(self) -> dict[str, Any]:
        c = self.conn
        sock = c.writer.get_extra_info("socket")
        return {
            "name": self.name, "direction": self.direction, "peer_id": c.peer_id,
            "peer_name": c.peer_name, "route": str(c.route),
            "strategy": (w.kind if (w := c.report.winning_step) else str(c.route)),
            "laddr": list(c.local_address or ()), "raddr": list(c.remote_address or ()),
            "fd": sock.fileno() if sock is not None else -1, "tls": c.encrypted,
            "bytes_sent": self.sent, "bytes_received": self.received, "created": self.created,
            "closed": c.closed, "error": 0}


class Registry:
    def __init__(self, max_connections: int) -> None:
        self.max_connections = max_connections
        self.items: dict[str, Named] = {}
        self._reserved: set[str] = set()       # /open in progress
        self.accepted: asyncio.Queue[str] = asyncio.Queue()
        self._serial = itertools.count(2)

    def __len__(self) -> int:
        return len(self.items)

    def get(self, name: str) -> Named:
        item = self.items.get(check_name(name))
        if item is None:
            raise ApiError(404, "unknown_connection", f"no connection named {name!r}")
        return item

    def reserve(self, name: str) -> None:
        check_name(name)
        if name in self.items or name in self._reserved:
            raise ApiError(409, "name_taken", f"a connection named {name!r} exists already")
        if len(self.items) + len(self._reserved) >= self.max_connections:
            raise ApiError(429, "too_many_connections",
                           f"{self.max_connections} connections open: close one first")
        self._reserved.add(name)

    def release(self, name: str) -> None:
        self._reserved.discard(name)

    def add(self, name: str, conn: Connection, direction: str) -> Named:
        self._reserved.discard(name)
        item = self.items[name] = Named(name, conn, direction)
        return item

    def incoming_name(self, conn: Connection) -> str | None:
        """A free name for an accepted connection, or None when the table is full."""
        if len(self.items) + len(self._reserved) >= self.max_connections:
            return None
        base = conn.peer_name if conn.peer_name and NAME_RE.match(conn.peer_name) else "in"
        name = base
        while name in self.items or name in self._reserved:
            name = f"{base}-{next(self._serial)}"
        return name

    async def close(self, name: str) -> None:
        item = self.items.pop(name, None)
        if item is not None:
            await item.conn.close()

    def forget_closed(self) -> None:
        for name, item in list(self.items.items()):
            if item.conn.closed:
                del self.items[name]

    async def close_all(self) -> None:
        items, self.items = list(self.items.values()), {}
        await asyncio.gather(*(i.conn.close() for i in items), return_exceptions=True)


class Events:
    """Fan-out of events to server-sent-event subscribers, each with a bounded queue."""

    def __init__(self, max_subscribers: int = 16) -> None:
        self.max_subscribers = max_subscribers
        self._subscribers: set[asyncio.Queue[tuple[str, str] | None]] = set()

    def subscribe(self) -> asyncio.Queue[tuple[str, str] | None]:
        if len(self._subscribers) >= self.max_subscribers:
            raise ApiError(429, "too_many_subscribers",
                           f"{self.max_subscribers} event streams open already")
        queue: asyncio.Queue[tuple[str, str] | None] = asyncio.Queue(EVENT_QUEUE)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[tuple[str, str] | None]) -> None:
        self._subscribers.discard(queue)

    def publish(self, event: str, data: dict[str, Any]) -> None:
        text = json.dumps({"time": time.time(), **data}, default=str, sort_keys=True)
        for queue in list(self._subscribers):
            try:
                queue.put_nowait((event, text))
            except asyncio.QueueFull:      # too slow: its stream ends, memory stays bounded
                self._subscribers.discard(queue)
                for _ in range(2):
                    queue.get_nowait()
                queue.put_nowait(("overflow", json.dumps({"dropped": True})))
                queue.put_nowait(None)

    def close(self) -> None:
        for queue in list(self._subscribers):
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)
        self._subscribers.clear()
