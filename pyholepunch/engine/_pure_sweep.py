"""The pure engine's sweep: many concurrent non-blocking connects over one epoll, first wins."""
from __future__ import annotations

import asyncio
import errno
import heapq
import logging
import selectors
import socket
import time
from collections import deque
from collections.abc import Sequence

from ..errors import PunchError, PunchTimeout
from . import _base
from ._base import PunchResult, PunchStats, SweepPair, count_failure
from ._pure_drive import LoopSelector, run, run_async
from ._pure_sock import (
    FD_ERRNOS,
    IN_PROGRESS,
    close_all,
    connect_outcome,
    note_syn,
    note_won,
    reuse_socket,
    start_connect,
)

log = logging.getLogger(__name__)


def run_sweep(
    pairs: Sequence[SweepPair], start_at: float | None, timeout: float, *, local_ip: str | None,
    max_inflight: int, rate: float, interval: float, syn_ttl: int | None,
) -> PunchResult:
    a = _base.check_sweep_args(pairs, start_at, timeout, local_ip, max_inflight, rate,
                               interval, syn_ttl)
    return run(_Sweep(a.pairs, a.local_ip, a.start, a.start + a.timeout, a.max_inflight, a.rate,
                      a.interval, a.syn_ttl))


async def run_sweep_async(
    pairs: Sequence[SweepPair], start_at: float | None, timeout: float, *, local_ip: str,
    max_inflight: int, rate: float, interval: float, syn_ttl: int | None,
) -> PunchResult:
    a = _base.check_sweep_args(pairs, start_at, timeout, local_ip, max_inflight, rate,
                               interval, syn_ttl)
    return await run_async(_Sweep(a.pairs, a.local_ip, a.start, a.start + a.timeout,
                                  a.max_inflight, a.rate, a.interval, a.syn_ttl,
                                  sel=LoopSelector(asyncio.get_running_loop())))


class _Sweep:
    def __init__(self, pairs: list[SweepPair], lip: str, start: float, deadline: float,
                 max_inflight: int, rate: float, interval: float, syn_ttl: int | None,
                 sel: selectors.BaseSelector | None = None) -> None:
        self.pairs, self.lip = pairs, lip
        self.start, self.deadline = start, deadline
        self.max_inflight, self.rate, self.interval, self.syn_ttl = max_inflight, rate, interval, syn_ttl
        self.stats = PunchStats()
        self.sel = sel if sel is not None else selectors.DefaultSelector()
        self.inflight: dict[int, tuple[socket.socket, int, float]] = {}   # fd -> (sock, pair, sent)
        self.fresh: deque[int] = deque(range(len(pairs)))   # never tried yet (first SYN: syn_ttl)
        self.rearm: list[tuple[float, int]] = []            # (due, pair) heap
        self.launched = 0                                   # SYNs so far: the pacing clock
        self.spare: tuple[socket.socket, int] | None = None  # pre-bound first socket

    def open(self) -> None:
        self.spare = (self._socket(0), 0)   # the first SYN needs only connect() at start_at

    def close(self, winner: socket.socket | None) -> None:
        self.sel.close()
        rest = [s for s, _, _ in self.inflight.values() if s is not winner]
        if self.spare is not None:
            rest.append(self.spare[0])
            self.spare = None
        close_all(rest)
        self.inflight.clear()

    def outcome(self, winner: socket.socket | None) -> PunchResult:
        s = self.stats
        if winner is None:
            what = (f"sweep over {len(self.pairs)} pairs: no connection ({s.attempts} attempts, "
                    f"{s.rsts_seen} RST, {s.icmp_errors} ICMP)")
            if time.time() < self.deadline:     # exhausted early, like the C engine's -ECONNREFUSED
                raise PunchError(what + "; every pair failed and none is left to retry", s)
            raise PunchTimeout(what + " by the deadline", s)
        return PunchResult(winner, s)

    def _socket(self, idx: int) -> socket.socket:
        sock = reuse_socket(self.lip, self.pairs[idx][0], defer_port=True)
        self.stats.sockets_opened += 1
        return sock

    def _next_pair(self, now: float) -> tuple[int, bool] | None:
        """The next pair due for a SYN and whether it is its first, or None."""
        if self.fresh:
            return self.fresh[0], True
        if self.rearm and self.rearm[0][0] <= now:
            return self.rearm[0][1], False
        return None

    def _launch(self, idx: int, first: bool) -> None:
        if first:
            self.fresh.popleft()
        else:
            heapq.heappop(self.rearm)
        try:
            if self.spare is not None and self.spare[1] == idx:
                sock, self.spare = self.spare[0], None
            else:
                sock = self._socket(idx)
        except OSError as exc:
            if exc.errno in FD_ERRNOS:
                raise OSError(exc.errno, f"sweep ran out of descriptors with {len(self.inflight)} "
                              f"sockets open: {exc.strerror}") from exc
            log.debug("sweep pair %d: local port %d unusable: %s", idx, self.pairs[idx][0], exc)
            return
        remote = self.pairs[idx][1]
        try:
            rc, sent_at = start_connect(sock, remote, self.syn_ttl if first else None)
        except BaseException:
            sock.close()
            raise
        note_syn(self.stats, rc, sent_at, self.start)
        self.launched += 1
        if rc in IN_PROGRESS:
            self.inflight[sock.fileno()] = (sock, idx, sent_at)
            self.sel.register(sock, selectors.EVENT_WRITE)
        else:
            self._failed(sock, idx, sent_at, rc, registered=False)

    def _failed(self, sock: socket.socket, idx: int, sent_at: float, err: int, *,
                registered: bool = True) -> None:
        count_failure(self.stats, err)
        if registered:
            self.sel.unregister(sock)
            del self.inflight[sock.fileno()]
        sock.close()
        if self.interval > 0:
            heapq.heappush(self.rearm, (max(sent_at + self.interval, time.time()), idx))

    def tick(self, now: float) -> float | None:
        """Launch what is due, within the in-flight cap and the pacing schedule; when to tick
        again, or None when the deadline passed or nothing is left to try."""
        if now >= self.deadline:
            return None
        pace = 1.0 / self.rate if self.rate > 0 else 0.0
        wake = self.deadline
        while len(self.inflight) < self.max_inflight:
            nxt = self._next_pair(now)
            if nxt is None:
                break
            if pace:
                due = self.start + self.launched * pace     # absolute: no drift
                if due > now:
                    wake = min(wake, due)
                    break
            self._launch(*nxt)
            if pace:
                now = time.time()
        if self.rearm and len(self.inflight) < self.max_inflight:
            wake = min(wake, max(self.rearm[0][0], now))
        if not self.inflight and not self.fresh and not self.rearm:
            return None                                     # nothing left to try
        return wake

    def on_ready(self, sock: socket.socket) -> socket.socket | None:
        entry = self.inflight.get(sock.fileno())
        if entry is None:
            return None
        _, idx, sent_at = entry
        err = connect_outcome(sock)
        if err == 0:
            self.sel.unregister(sock)
            del self.inflight[sock.fileno()]
            note_won(self.stats, sock, self.pairs[idx][1], self.start)
            return sock
        self._failed(sock, idx, sent_at, err if err else errno.ENOTCONN)
        return None
