"""The race between address families (RFC 8305, Happy Eyeballs v2) on a punch's schedule.

punch.py runs each family's steps as one lane (IPv6 from the common start, IPv4
``race_delay`` later); :func:`race_lanes` decides which connection both peers keep. Only one
side may choose, as in a sweep: the initiator keeps the first connection any lane brings up
and sends KEEP on it; the responder keeps the one that carries KEEP. Everything else is
closed, now or when it comes up.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Coroutine
from typing import Any

from .engine import PunchResult
from .errors import PunchError

log = logging.getLogger(__name__)

KEEP = b"\x02"             # the initiator sends this on the one connection a race keeps


async def race_lanes(role: str, lanes: dict[str, Coroutine[Any, Any, PunchResult]], *,
                     deadline: float) -> PunchResult:
    """Run one coroutine per address family; the first connection the initiator sees wins.

    The initiator sends KEEP on its winner and closes every other connection (now or when
    it comes up). The responder keeps the connection that carries KEEP, reading one byte
    from each connection its lanes bring up, and closes the rest; it gives up at
    ``deadline`` (the end of the longest lane) plus a grace for the KEEP byte."""
    loop = asyncio.get_running_loop()
    family: dict[asyncio.Future[Any], str] = {asyncio.ensure_future(c): f for f, c in lanes.items()}
    lane_tasks = set(family)
    winner: PunchResult | None = None
    errors: list[str] = []
    pending: set[asyncio.Future[Any]] = set(lane_tasks)
    try:
        while pending and winner is None:
            left = deadline + KEEP_GRACE - time.time()
            done, pending = await asyncio.wait(pending, timeout=max(left, 0.0),
                                               return_when=asyncio.FIRST_COMPLETED)
            if not done:
                break
            for fut in done:
                fam = family[fut]
                if fut.cancelled():
                    continue
                if (exc := fut.exception()) is not None:
                    errors.append(f"{fam}: {exc}")
                    continue
                result: PunchResult | None = fut.result()
                if result is None:              # a responder's read: not the kept one
                    continue
                if winner is not None:
                    result.sock.close()
                elif fut not in lane_tasks:     # the responder read KEEP on it
                    winner = result
                    log.info("%s: the %s lane won the race", role, fam)
                elif role == "initiator":
                    try:
                        await loop.sock_sendall(_nonblocking(result.sock), KEEP)
                    except OSError as err:
                        result.sock.close()
                        errors.append(f"{fam}: {err}")
                        continue
                    result.sock.setblocking(True)
                    winner = result
                    log.info("%s: the %s lane won the race", role, fam)
                else:
                    reader = asyncio.ensure_future(_kept(result))
                    family[reader] = fam
                    pending.add(reader)
    finally:
        for fut in family:
            if not fut.done():
                fut.cancel()
            fut.add_done_callback(lambda f: _close_unless(f, winner))
    if winner is None:
        raise PunchError("no lane of the race connected: " + ("; ".join(errors) or
                                                              "out of time"))
    winner.sock.setblocking(True)
    return winner


def _close_unless(fut: asyncio.Future[Any], keep: PunchResult | None) -> None:
    """Close what a race's lane or read brought up, unless it is the connection kept."""
    if fut.cancelled() or fut.exception() is not None:
        return
    result = fut.result()
    if result is not None and result is not keep:
        with contextlib.suppress(OSError):
            result.sock.close()


KEEP_GRACE = 1.0            # how long past its last lane the responder waits for KEEP


def _nonblocking(sock: socket.socket) -> socket.socket:
    sock.setblocking(False)
    return sock


async def _kept(result: PunchResult) -> PunchResult | None:
    """The responder's half: ``result`` if the initiator marked it KEEP, else None (closed)."""
    loop = asyncio.get_running_loop()
    try:
        data = await loop.sock_recv(_nonblocking(result.sock), 1)
    except BaseException:
        result.sock.close()
        raise
    if data == KEEP:
        result.sock.setblocking(True)
        return result
    result.sock.close()
    return None
