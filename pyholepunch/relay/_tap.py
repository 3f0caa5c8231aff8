"""The built-in relay's observable pump: every chunk is shown to a callback.

For tests that must see what the relay sees (e.g. proving it only ever carries TLS
ciphertext) and for debugging; slower than the engines' pumps, same limits and half-close.
"""
from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable

from ..engine import RelayStats

Tap = Callable[[str, bytes], None]
"""Called with ("a>b" | "b>a", chunk) for every relayed chunk, before it is forwarded."""

CHUNK = 65536


async def tap_pump(a: socket.socket, b: socket.socket, tap: Tap, *, idle_timeout: float,
                   max_bytes: int) -> RelayStats:
    """Pump two non-blocking sockets on the running loop until EOF both ways, idle or limit."""
    loop = asyncio.get_running_loop()
    stats = RelayStats()
    last = [loop.time()]

    async def one_way(src: socket.socket, dst: socket.socket, name: str) -> None:
        while True:
            chunk = await loop.sock_recv(src, CHUNK)
            if not chunk:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)
                return
            total = stats.bytes_a_to_b + stats.bytes_b_to_a
            if max_bytes and total + len(chunk) > max_bytes:
                chunk = chunk[: max_bytes - total]
                stats.reason = "limit"
            tap(name, chunk)
            await loop.sock_sendall(dst, chunk)
            if name == "a>b":
                stats.bytes_a_to_b += len(chunk)
            else:
                stats.bytes_b_to_a += len(chunk)
            last[0] = loop.time()
            if stats.reason == "limit":
                return

    tasks = [asyncio.ensure_future(one_way(a, b, "a>b")),
             asyncio.ensure_future(one_way(b, a, "b>a"))]
    try:
        pending = set(tasks)
        while pending:
            _, pending = await asyncio.wait(pending, timeout=0.1,
                                            return_when=asyncio.FIRST_EXCEPTION)
            if any(t.done() and t.exception() for t in tasks) or stats.reason == "limit":
                break
            if loop.time() - last[0] > idle_timeout:
                stats.reason = "idle"
                break
        for t in tasks:
            if t.done() and t.exception():
                stats.reason = f"error: {t.exception()}"
        stats.reason = stats.reason or "eof"
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return stats
