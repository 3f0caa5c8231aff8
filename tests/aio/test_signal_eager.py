"""eager.run_eager: a handler that never waits runs to its end in the caller's frame (no
task); one that waits goes on in a task, sees the outcome of what it waited for, and is
cancelled like a task would be."""
from __future__ import annotations

import asyncio

import pytest

from pyholepunch.signal.eager import run_eager

pytestmark = pytest.mark.timeout(10)


async def _nested(log: list[str]) -> None:
    log.append("inner")


@pytest.mark.asyncio
async def test_a_coroutine_that_never_waits_is_done_before_run_eager_returns() -> None:
    log: list[str] = []

    async def handler() -> None:
        await _nested(log)
        log.append("done")

    assert run_eager(handler()) is None
    assert log == ["inner", "done"]


@pytest.mark.asyncio
async def test_a_coroutine_that_waits_carries_on_in_a_task() -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[int] = loop.create_future()
    failing: asyncio.Future[int] = loop.create_future()
    log: list[object] = []

    async def handler() -> None:
        log.append("before")
        log.append(await fut)
        await asyncio.sleep(0)                      # a bare yield
        try:
            await failing
        except KeyError as exc:
            log.append(repr(exc))

    task = run_eager(handler())
    assert task is not None and log == ["before"]
    fut.set_result(7)
    await asyncio.sleep(0.01)
    failing.set_exception(KeyError("k"))
    await asyncio.wait_for(task, 1)
    assert log == ["before", 7, "KeyError('k')"]


@pytest.mark.asyncio
async def test_cancelling_the_task_cancels_what_it_waits_for_and_the_coroutine() -> None:
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    seen: list[str] = []

    async def handler() -> None:
        try:
            await fut
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    task = run_eager(handler())
    assert task is not None
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == ["cancelled"] and fut.cancelled()


@pytest.mark.asyncio
async def test_an_exception_before_any_wait_reaches_the_caller() -> None:
    async def handler() -> None:
        raise ValueError("at once")

    with pytest.raises(ValueError, match="at once"):
        run_eager(handler())
