"""Drivers for the pure engine's punches: blocking (a selector loop) or on the event loop.

A punch (``_SimOpen``, ``_Sweep``) is a state machine over non-blocking sockets that it
registers in ``punch.sel``: ``open()`` readies its sockets before ``start``, ``tick(now)``
connects what is due and says when to tick again (``None``: it is over), ``on_ready(sock)``
handles a readable or writable socket and returns the winner, ``close(winner)`` closes every
other socket and ``outcome(winner)`` is the result or the exception. ``run`` drives it in the
calling thread, ``run_async`` on the running asyncio loop (a ``LoopSelector`` turns the
registrations into loop readers and writers, timers are the loop's), the C engine's
blocking driver and scheduler in the same shape.
"""
from __future__ import annotations

import asyncio
import selectors
import socket
import time
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from ._base import PunchResult
from ._pure_clock import wait_until


class Driven(Protocol):
    """A punch the pure driver steps: a simultaneous open or a sweep."""

    start: float
    sel: selectors.BaseSelector

    def open(self) -> None: ...
    def tick(self, now: float) -> float | None: ...
    def on_ready(self, fileobj: Any) -> socket.socket | None: ...
    def close(self, winner: socket.socket | None) -> None: ...
    def outcome(self, winner: socket.socket | None) -> PunchResult: ...


def _advance(punch: Driven, ready: Iterable[Any]) -> tuple[socket.socket | None, float | None]:
    """The step both drivers take: hand the ``ready`` file objects to ``punch`` until one wins,
    else tick it. The winner (or None) and how long to wait for sockets next (None: over)."""
    for fileobj in ready:
        winner = punch.on_ready(fileobj)
        if winner is not None:
            return winner, None
    wake = punch.tick(time.time())
    return None, None if wake is None else max(0.0, wake - time.time())


def run(punch: Driven) -> PunchResult:
    """Drive ``punch`` to its end in this thread (blocking in select/sleep)."""
    winner: socket.socket | None = None
    try:
        punch.open()
        wait_until(punch.start)
        winner, wait = _advance(punch, ())
        while wait is not None:
            winner, wait = _advance(punch, (key.fileobj for key, _ev in punch.sel.select(wait)))
    finally:
        punch.close(winner)
    return punch.outcome(winner)


class LoopSelector(selectors.BaseSelector):
    """The selector calls a punch makes, served by the running loop's readers and writers.

    Ready sockets collect until ``wait`` hands them over; ``select`` is not supported (the
    loop itself selects)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.keys: dict[int, selectors.SelectorKey] = {}
        self.ready: dict[int, selectors.SelectorKey] = {}
        self.waiter: asyncio.Future[None] | None = None

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        fd = fileobj.fileno()
        key = selectors.SelectorKey(fileobj, fd, events, data)
        if events & selectors.EVENT_READ:
            self.loop.add_reader(fd, self._on_event, key)
        if events & selectors.EVENT_WRITE:
            self.loop.add_writer(fd, self._on_event, key)
        self.keys[fd] = key
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        key = self.keys.pop(fd)
        self.ready.pop(fd, None)
        if key.events & selectors.EVENT_READ:
            self.loop.remove_reader(fd)
        if key.events & selectors.EVENT_WRITE:
            self.loop.remove_writer(fd)
        return key

    def _on_event(self, key: selectors.SelectorKey) -> None:
        self.ready[key.fd] = key
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def wait(self, timeout: float) -> list[selectors.SelectorKey]:
        """The sockets that became ready, waiting up to ``timeout`` seconds for one."""
        if not self.ready:
            self.waiter = self.loop.create_future()
            timer = self.loop.call_later(timeout, _wake, self.waiter)
            try:
                await self.waiter
            finally:
                timer.cancel()
                self.waiter = None
        ready = list(self.ready.values())
        self.ready.clear()
        return ready

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        raise NotImplementedError("a LoopSelector is waited on with wait()")

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self.keys

    def close(self) -> None:
        for key in list(self.keys.values()):
            self.unregister(key.fd)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


async def run_async(punch: Driven) -> PunchResult:
    """Drive ``punch`` on the running loop (``punch.sel`` is a LoopSelector). Cancelling
    the awaiting task closes every socket of the punch before CancelledError propagates."""
    sel = punch.sel
    assert isinstance(sel, LoopSelector)
    winner: socket.socket | None = None
    try:
        punch.open()
        delay = punch.start - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        winner, wait = _advance(punch, ())
        while wait is not None:
            keys = await sel.wait(wait)     # skipping those an earlier one unregistered:
            winner, wait = _advance(punch, (key.fileobj for key in keys if key.fd in sel.keys))
    finally:
        punch.close(winner)
    return punch.outcome(winner)
