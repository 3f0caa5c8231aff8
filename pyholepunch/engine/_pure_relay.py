"""The pure engine's relay data path: a selectors (epoll) loop with one 1 MiB buffer per direction.

Chosen over asyncio because the call is synchronous like the C engine's (run it under
``asyncio.to_thread``), and a plain loop over recv_into/send with big buffers is the fastest
Python copy. The caller's fds are borrowed, never closed, and their O_NONBLOCK flag is left
alone: every recv/send uses MSG_DONTWAIT and only runs when epoll says it can progress.
"""
from __future__ import annotations

import selectors
import socket
import time

from ._base import RelayStats, check_relay_args

BUF_SIZE = 1 << 20
_DONTWAIT = socket.MSG_DONTWAIT
_SEND_FLAGS = socket.MSG_DONTWAIT | getattr(socket, "MSG_NOSIGNAL", 0)


class _Direction:
    """Bytes flowing src -> dst through one buffer: filled when empty, drained in order."""

    __slots__ = ("src", "dst", "buf", "view", "start", "end", "eof", "shut", "moved")

    def __init__(self, src: socket.socket, dst: socket.socket) -> None:
        self.src, self.dst = src, dst
        self.buf = bytearray(BUF_SIZE)
        self.view = memoryview(self.buf)
        self.start = self.end = 0
        self.eof = False        # src sent FIN
        self.shut = False       # FIN propagated to dst
        self.moved = 0          # bytes delivered to dst

    @property
    def pending(self) -> int:
        return self.end - self.start


def _borrow(fd: int, what: str) -> socket.socket:
    sock = socket.socket(fileno=fd)        # OSError (EBADF / ENOTSOCK) leaves fd untouched
    if sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise ValueError(f"{what} {fd} is not a stream socket")
    return sock


def relay_pump(fd_a: int, fd_b: int, *, idle_timeout: float = 300.0, max_bytes: int = 0) -> RelayStats:
    fd_a, fd_b, idle_timeout, max_bytes = check_relay_args(fd_a, fd_b, idle_timeout, max_bytes)
    sa = _borrow(fd_a, "fd_a")
    try:
        sb = _borrow(fd_b, "fd_b")
    except BaseException:
        sa.detach()
        raise
    sel = selectors.DefaultSelector()
    try:
        return _pump(sel, sa, sb, idle_timeout, max_bytes)
    finally:
        sel.close()
        sa.detach()
        sb.detach()


def _pump(sel: selectors.BaseSelector, sa: socket.socket, sb: socket.socket,
          idle_timeout: float, max_bytes: int) -> RelayStats:
    stats = RelayStats()
    ab, ba = _Direction(sa, sb), _Direction(sb, sa)
    dirs = (ab, ba)
    interest = {sa: 0, sb: 0}
    last_io = time.monotonic()

    def total() -> int:
        return ab.moved + ba.moved + ab.pending + ba.pending

    def finish(reason: str) -> RelayStats:
        stats.bytes_a_to_b, stats.bytes_b_to_a = ab.moved, ba.moved
        stats.reason = reason
        return stats

    while True:
        limited = max_bytes > 0 and total() >= max_bytes
        for d in dirs:
            if d.eof and not d.pending and not d.shut:
                d.shut = True
                try:
                    d.dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass            # dst already gone: its own direction reports it
        if ab.shut and ba.shut:
            return finish("eof")
        if limited and not ab.pending and not ba.pending:
            return finish("limit")

        want = {sa: 0, sb: 0}
        for d in dirs:
            if d.pending:
                want[d.dst] |= selectors.EVENT_WRITE
            elif not d.eof and not limited:
                want[d.src] |= selectors.EVENT_READ
        for s in (sa, sb):
            if want[s] != interest[s]:
                if interest[s] and want[s]:
                    sel.modify(s, want[s])
                elif want[s]:
                    sel.register(s, want[s])
                else:
                    sel.unregister(s)
                interest[s] = want[s]

        wait: float | None = None
        if idle_timeout:
            wait = last_io + idle_timeout - time.monotonic()
            if wait <= 0:
                return finish("idle")
        ready = dict((key.fileobj, ev) for key, ev in sel.select(wait))
        try:
            for d in dirs:
                if d.pending and ready.get(d.dst, 0) & selectors.EVENT_WRITE:
                    try:
                        n = d.dst.send(d.view[d.start:d.end], _SEND_FLAGS)
                    except BlockingIOError:
                        n = 0
                    d.start += n
                    d.moved += n
                    if n:
                        last_io = time.monotonic()
                elif not d.pending and ready.get(d.src, 0) & selectors.EVENT_READ:
                    room = BUF_SIZE
                    if max_bytes:
                        room = min(room, max_bytes - total())
                    if room <= 0:
                        continue
                    try:
                        n = d.src.recv_into(d.view[:room], room, _DONTWAIT)
                    except BlockingIOError:
                        continue
                    last_io = time.monotonic()
                    if n == 0:
                        d.eof = True
                    d.start, d.end = 0, n
        except OSError as exc:
            return finish(f"error: {exc.strerror or exc}")
