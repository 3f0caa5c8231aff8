"""Run a coroutine at once, in the caller's frame, and make a task of it only if it waits.

What asyncio's eager task factory does from Python 3.12 (we support 3.11): the rendezvous
server handles a peer's messages in a coroutine, since a Redis store must be awaited, yet
with the in-memory store no handler ever waits, and a task per message (create, schedule,
step, context switch) was ~10 % of a coordination's CPU.
"""
from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


def run_eager(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
    """Step ``coro`` now; None if it finished, else the task that carries it on from where
    it waits. An exception it raises before waiting propagates to the caller."""
    try:
        waiting = coro.send(None)
    except StopIteration:
        return None
    return asyncio.get_running_loop().create_task(_resume(coro, waiting))


async def _resume(coro: Coroutine[Any, Any, None], waiting: Any) -> None:
    """Drive ``coro`` as a Task would: wait for what it yielded (a future, or None for a
    bare yield), then step it; a cancellation cancels that future and is thrown into it."""
    while True:
        try:
            if waiting is None:
                await asyncio.sleep(0)
            else:
                waiting._asyncio_future_blocking = False
                await asyncio.wait((waiting,))      # done, however: the coroutine reads it
        except BaseException as exc:                # cancelled (or not a future at all)
            if isinstance(exc, asyncio.CancelledError) and waiting is not None:
                waiting.cancel()
            try:
                waiting = coro.throw(exc)
            except StopIteration:
                return
            continue
        try:
            waiting = coro.send(None)
        except StopIteration:
            return
