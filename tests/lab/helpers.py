"""Helpers the lab tests share."""
from __future__ import annotations

import asyncio
import socket
import threading
import time
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


def connect_times_ms(lab: Lab, node: str, family: int, listener: socket.socket,
                     dst: tuple[str, int], n: int) -> list[float]:
    """How long each of ``n`` TCP connects from ``node`` to ``listener`` at ``dst`` took."""
    samples = []
    for _ in range(n):
        with lab.socket(node, family) as c:
            t0 = time.perf_counter()
            c.connect(dst)
            samples.append((time.perf_counter() - t0) * 1000)
        listener.accept()[0].close()
    return samples


def datagrams_through(sender: socket.socket, receiver: socket.socket, dst: tuple[str, int],
                      n: int) -> int:
    """Send ``n`` one-byte datagrams to ``dst``; how many ``receiver`` got."""
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)  # hold them all until read
    for _ in range(n):
        sender.sendto(b"x", dst)
    receiver.settimeout(0.3)
    got = 0
    try:
        while True:
            receiver.recv(8)
            got += 1
    except TimeoutError:
        pass
    return got
