"""The native engine: the C core in csrc/ through the one Cython binding (``_native``).

Arguments are validated here with the same checks (and messages) as the pure engine, so the
C code only ever sees well-formed values; ``_native`` converts them, releases the GIL for the
whole blocking call and maps C error codes to exceptions.

The ``*_async`` methods hand the punch to the C scheduler (csrc/sched.c): one scheduler thread
per CPU (at most ``MAX_THREADS``) runs every punch of an event loop, the punches dealt out in
turn, and each thread's eventfd is a reader of the loop, which drains the completions. No
Python thread per punch; the scheduler threads end once the loop has had no punch for
``LINGER`` seconds.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import weakref
from collections.abc import Callable, Sequence

from . import _base, _native
from ._base import (
    Address,
    PunchResult,
    RawSynStats,
    RelayStats,
    SweepPair,
    check_raw_args,
    check_relay_args,
)

__all__ = ["NativeEngine"]

log = logging.getLogger(__name__)

_INT_MAX = 2**31 - 1
RELAY_MOVERS = ("copy", "splice")   # index = the C engine's enum hp_relay_mode

LINGER = 0.5
"""Seconds an event loop's scheduler thread outlives its last punch (bursts reuse it)."""

MAX_THREADS = 4
THREADS_ENV = "PYHOLEPUNCH_SCHED_THREADS"
"""Scheduler threads per event loop; default one per CPU this process may run on, at most
MAX_THREADS. A burst of first SYNs due at one instant is as many serial connect() calls (the
kernel handles a loopback SYN inside the call): threads on several cores share them."""

PRIORITY_ENV = "PYHOLEPUNCH_SCHED_PRIORITY"
"""1..99: run the scheduler threads under SCHED_FIFO at that priority (needs CAP_SYS_NICE), so
other busy processes cannot delay a first SYN by a time slice; unset or 0: normal threads."""


def _threads() -> int:
    text = os.environ.get(THREADS_ENV, "")
    if text:
        try:
            return max(1, int(text))
        except ValueError:
            log.warning("%s=%s ignored: not an integer", THREADS_ENV, text)
    return min(len(os.sched_getaffinity(0)), MAX_THREADS)


class _LoopScheduler:
    """The C schedulers serving one event loop: their completions are drained on the loop.

    It holds no reference to its loop, not even through a timer handle (every method runs on
    it), so the registry's entry, and with it the threads, go when the loop is collected even
    if it never went idle."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.scheds = [_native.Scheduler() for _ in range(_threads())]
        prio = os.environ.get(PRIORITY_ENV, "0")
        for sched in self.scheds:
            if prio not in ("", "0"):
                try:
                    sched.set_priority(int(prio))
                except (PermissionError, ValueError) as exc:
                    log.warning("%s=%s ignored: %s", PRIORITY_ENV, prio, exc)
                    prio = "0"
            loop.add_reader(sched.fileno(), self._drain, sched)
        self.waiting: dict[int, asyncio.Future[object]] = {}
        self.ids = itertools.count(1)
        self.idle = 0               # generation of the pending idle check (handles hold the loop)
        self.closed = False

    def sched(self, pid: int) -> _native.Scheduler:
        """The scheduler that runs punch ``pid`` (dealt out in turn)."""
        return self.scheds[pid % len(self.scheds)]

    def submit(self, start: Callable[[_native.Scheduler, int], None]
               ) -> tuple[int, asyncio.Future[object]]:
        pid = next(self.ids)
        start(self.sched(pid), pid)
        fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self.waiting[pid] = fut
        self.idle += 1              # a pending idle check is void
        return pid, fut

    def _drain(self, sched: _native.Scheduler) -> None:
        for pid, outcome in sched.drain():
            fut = self.waiting.pop(pid, None)
            if fut is None or fut.done():       # its caller is gone: nothing may leak
                if isinstance(outcome, PunchResult):
                    outcome.sock.close()
                continue
            fut.set_result(outcome)
        if not self.waiting and not self.closed:
            self.idle += 1
            asyncio.get_running_loop().call_later(LINGER, self._close_if_idle, self.idle)

    def _close_if_idle(self, generation: int) -> None:
        if generation == self.idle and not self.waiting:
            self.close()

    def close(self) -> None:
        """On the loop, once idle: stop watching, join the threads, forget these schedulers."""
        if self.closed:
            return
        self.closed = True
        loop = asyncio.get_running_loop()
        if _SCHEDULERS.get(loop) is self:
            del _SCHEDULERS[loop]
        for sched in self.scheds:
            loop.remove_reader(sched.fileno())
            sched.close()                        # joins the thread, closes every socket
        for fut in self.waiting.values():
            fut.cancel()
        self.waiting.clear()


_SCHEDULERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopScheduler] = \
    weakref.WeakKeyDictionary()


async def _punch(start: Callable[[_native.Scheduler, int], None]) -> PunchResult:
    """Run one punch on the running loop's scheduler; cancelling closes its sockets first."""
    loop = asyncio.get_running_loop()
    ls = _SCHEDULERS.get(loop)
    if ls is None:
        ls = _SCHEDULERS[loop] = _LoopScheduler(loop)
    pid, fut = ls.submit(start)
    try:
        outcome = await asyncio.shield(fut)
    except asyncio.CancelledError:
        if not ls.closed:
            ls.sched(pid).cancel(pid)
            with contextlib.suppress(asyncio.CancelledError):   # a second cancel: _drain closes
                late = await fut                                # the scheduler confirms: closed
                if isinstance(late, PunchResult):               # it had just won
                    late.sock.close()
        raise
    if isinstance(outcome, PunchResult):
        return outcome
    if isinstance(outcome, BaseException):
        raise outcome
    raise asyncio.CancelledError()                              # cancelled by the scheduler


class NativeEngine:
    """C implementation of :class:`pyholepunch.engine.Engine`."""

    name = "native"

    def simultaneous_open(
        self,
        local: Address,
        remote: Address,
        start_at: float | None,
        timeout: float,
        *,
        interval: float = 0.01,
        syn_ttl: int | None = None,
        ttl_syns: int = 1,
        listen: bool = True,
    ) -> PunchResult:
        a = _base.check_simopen_args(local, remote, start_at, timeout, interval, syn_ttl,
                                     ttl_syns, listen)
        # An interval beyond the window means "no re-arm"; clamping keeps it in C's range.
        every = min(a.interval, a.timeout + 1.0)
        return _native.simultaneous_open(
            a.local[0], a.local[1], a.remote[0], a.remote[1], a.start, a.timeout, every,
            a.syn_ttl or 0, min(a.ttl_syns, _INT_MAX), a.listen)

    def sweep(
        self,
        pairs: Sequence[SweepPair],
        start_at: float | None,
        timeout: float,
        *,
        local_ip: str | None = None,
        max_inflight: int = 1024,
        rate: float = 0.0,
        interval: float = 0.0,
        syn_ttl: int | None = None,
    ) -> PunchResult:
        a = _base.check_sweep_args(pairs, start_at, timeout, local_ip, max_inflight, rate,
                                   interval, syn_ttl)
        every = min(a.interval, a.timeout + 1.0)
        return _native.sweep(a.pairs, a.local_ip, a.start, a.timeout, every, a.max_inflight,
                             a.rate, a.syn_ttl or 0)

    async def simultaneous_open_async(
        self,
        local: Address,
        remote: Address,
        start_at: float | None,
        timeout: float,
        *,
        interval: float = 0.01,
        syn_ttl: int | None = None,
        ttl_syns: int = 1,
        listen: bool = True,
    ) -> PunchResult:
        a = _base.check_simopen_args(local, remote, start_at, timeout, interval, syn_ttl,
                                     ttl_syns, listen)
        every = min(a.interval, a.timeout + 1.0)
        return await _punch(lambda sched, pid: sched.simultaneous_open(
            pid, a.local[0], a.local[1], a.remote[0], a.remote[1], a.start, a.timeout, every,
            a.syn_ttl or 0, min(a.ttl_syns, _INT_MAX), a.listen))

    async def sweep_async(
        self,
        pairs: Sequence[SweepPair],
        start_at: float | None,
        timeout: float,
        *,
        local_ip: str = "0.0.0.0",
        max_inflight: int = 1024,
        rate: float = 0.0,
        interval: float = 0.0,
        syn_ttl: int | None = None,
    ) -> PunchResult:
        a = _base.check_sweep_args(pairs, start_at, timeout, local_ip, max_inflight, rate,
                                   interval, syn_ttl)
        every = min(a.interval, a.timeout + 1.0)
        return await _punch(lambda sched, pid: sched.sweep(
            pid, a.pairs, a.local_ip, a.start, a.timeout, every, a.max_inflight, a.rate,
            a.syn_ttl or 0))

    def raw_syn(
        self,
        src: Address,
        dst: Address,
        *,
        ttl: int = 64,
        count: int = 1,
        spacing: float = 0.0,
        start_at: float | None = None,
    ) -> RawSynStats:
        (sip, sport), (dip, dport), start = check_raw_args(src, dst, ttl, count, spacing, start_at)
        return _native.raw_syn(
            sip, sport, dip, dport, ttl, count, float(spacing), start)

    # How relay_pump moves bytes: "copy" (recv/send through a buffer; measured faster and
    # cheaper per GiB than splice on loopback, bench/bench_relay.py) or "splice" (set on an
    # instance to compare them).
    relay_mover: str = "copy"

    def relay_pump(
        self, fd_a: int, fd_b: int, *, idle_timeout: float = 300.0, max_bytes: int = 0
    ) -> RelayStats:
        fd_a, fd_b, idle, limit = check_relay_args(fd_a, fd_b, idle_timeout, max_bytes)
        if self.relay_mover not in RELAY_MOVERS:
            raise ValueError(f"relay_mover must be one of {', '.join(RELAY_MOVERS)}, "
                             f"got {self.relay_mover!r}")
        return _native.relay_pump(fd_a, fd_b, idle, limit, RELAY_MOVERS.index(self.relay_mover))
