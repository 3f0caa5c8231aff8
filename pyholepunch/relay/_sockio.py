"""Socket helpers the relays share (the built-in hub and the TURN client): plain sockets on
the running loop, no streams."""
from __future__ import annotations

import asyncio
import contextlib
import socket


def shutdown(*socks: socket.socket) -> None:
    for s in socks:
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)


async def either_readable(loop: asyncio.AbstractEventLoop, a: socket.socket, b: socket.socket,
                           timeout: float) -> bool:
    """True once ``a`` or ``b`` has a byte (or EOF) to read; False after ``timeout``. One
    reader callback per socket, no polling."""
    # One loop turn first: a cancelled sock_recv on these sockets removes "its" reader in a
    # callback already queued, which would otherwise remove ours.
    await asyncio.sleep(0)
    fut: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not fut.done():
            fut.set_result(None)

    fds = (a.fileno(), b.fileno())
    for fd in fds:
        loop.add_reader(fd, wake)
    try:
        await asyncio.wait_for(fut, timeout)
        return True
    except TimeoutError:
        return False
    finally:
        for fd in fds:
            loop.remove_reader(fd)


async def recv_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = await loop.sock_recv(sock, n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf
