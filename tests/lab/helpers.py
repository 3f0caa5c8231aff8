"""Helpers the lab tests share."""
from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from pyholepunch.lab import Lab, entered

T = TypeVar("T")


def in_netns(lab: Lab, node: str, fn: Callable[[], Awaitable[T]], timeout: float = 60) -> T:
    """Run the coroutine ``fn()`` on a fresh event loop in a thread inside ``node``'s namespace
    (sockets it creates live there)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            with entered(lab.netns(node)):
                box["value"] = asyncio.run(fn())
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            box["error"] = exc

    t = threading.Thread(target=run, name=f"in-{node}", daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"the scenario in {node} did not finish within {timeout} s"
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]
