"""The race between address families (RFC 8305, Happy Eyeballs v2) on a punch's schedule.

punch.py runs each family's steps as one lane (IPv6 from the common start, IPv4
``race_delay`` later); :func:`race_lanes` decides which connection both peers keep. Only one
side may choose, as in a sweep: the initiator keeps the first connection any lane brings up
and sends KEEP on it; the responder keeps the one that carries KEEP; the pinned TLS
handshake runs on it inside the race, so the first *mutually authenticated* connection wins
(a failed handshake lets the race go on). Everything else is closed, now or when it comes up.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from .engine import PunchResult
from .errors import AuthenticationError, PunchError

log = logging.getLogger(__name__)

KEEP = b"\x02"             # the initiator sends this on the one connection a race keeps


@dataclass(frozen=True)
class Won:
    """The race's connection, its secured streams (with ``secure``) and its family."""

    result: PunchResult
    streams: Any
    family: str


Secure = Callable[[PunchResult], Awaitable[Any]]


async def race_lanes(role: str, lanes: dict[str, Coroutine[Any, Any, PunchResult]], *,
                     deadline: float, secure: Secure | None = None) -> Won:
    """Run one coroutine per address family; the first mutually authenticated connection
    wins.

    The initiator sends KEEP on the first connection a lane brings up; the responder reads
    one byte from each connection its lanes bring up and takes the one that carries KEEP.
    Both then run ``secure`` on it (the pinned TLS handshake, see peer.py): if that fails,
    the connection is closed and the race goes on (the initiator marks the next connection
    a lane brings up). Every other connection is closed, now or when it comes up. The
    responder gives up at ``deadline`` (the end of the longest lane) plus a grace for the
    KEEP byte. An authentication failure is raised when no lane authenticated (an impostor
    gets no relay either)."""
    loop = asyncio.get_running_loop()
    family: dict[asyncio.Future[Any], str] = {asyncio.ensure_future(c): f for f, c in lanes.items()}
    lane_tasks = set(family)
    won: Won | None = None
    errors: list[str] = []
    refused: BaseException | None = None
    pending: set[asyncio.Future[Any]] = set(lane_tasks)

    async def take(result: PunchResult, fam: str) -> Won | None:
        nonlocal refused
        result.sock.setblocking(True)
        if secure is None:
            return Won(result, None, fam)
        try:
            return Won(result, await secure(result), fam)
        except (TimeoutError, OSError, AuthenticationError) as exc:
            errors.append(f"{fam}: TLS: {exc}")
            if isinstance(exc, AuthenticationError):
                refused = exc
            with contextlib.suppress(OSError):
                result.sock.close()
            return None

    try:
        while pending and won is None:
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
                if won is not None:
                    result.sock.close()
                elif fut not in lane_tasks:     # the responder read KEEP on it
                    won = await take(result, fam)
                elif role == "initiator":
                    try:
                        await loop.sock_sendall(_nonblocking(result.sock), KEEP)
                    except OSError as err:
                        result.sock.close()
                        errors.append(f"{fam}: {err}")
                        continue
                    won = await take(result, fam)
                else:
                    reader = asyncio.ensure_future(_kept(result))
                    family[reader] = fam
                    pending.add(reader)
    finally:
        keep = won.result if won is not None else None
        for fut in family:
            if not fut.done():
                fut.cancel()
            fut.add_done_callback(lambda f: _close_unless(f, keep))
    if won is None:
        if refused is not None:
            raise refused
        raise PunchError("no lane of the race connected: " + ("; ".join(errors) or
                                                              "out of time"))
    log.info("%s: the %s lane won the race", role, won.family)
    return won



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
