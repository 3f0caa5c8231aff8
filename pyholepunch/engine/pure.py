"""The pure-Python engine: the native engine's twin, same contract (``_base.Engine``), same stats.

Each blocking call runs one selectors loop (epoll on Linux) over non-blocking sockets and
blocks only in select()/sleep() (plus a <= 2 ms spin before ``start_at``); each ``*_async``
call runs the same punch on the event loop itself (loop readers/writers and timers, no
thread, no spin). Split by concern: ``_pure_drive`` (the two drivers), ``_pure_sweep``
(sweep), ``_pure_raw`` (raw SYNs), ``_pure_relay`` (relay pump), ``_pure_sock`` /
``_pure_clock`` (shared plumbing).
"""
from __future__ import annotations

import asyncio
import errno
import logging
import selectors
import socket
from collections.abc import Sequence

from ..address import Address, format_address
from . import _base
from ._base import (
    PunchResult,
    PunchStats,
    RawSynStats,
    RelayStats,
    SweepPair,
    count_failure,
)
from ._pure_drive import LoopSelector, run, run_async
from ._pure_raw import raw_syn as _raw_syn
from ._pure_relay import relay_pump as _relay_pump
from ._pure_sock import (
    IN_PROGRESS,
    abort,
    close_all,
    connect_outcome,
    note_syn,
    note_won,
    reuse_socket,
    same_endpoint,
    start_connect,
)
from ._pure_sweep import run_sweep, run_sweep_async

log = logging.getLogger(__name__)

__all__ = ["PureEngine"]

LISTEN_BACKLOG = 16
TCP_SYN_RECV = 3            # tcp_info.tcpi_state (linux/tcp_states.h)
SYN_RECV_GRACES = 1         # as csrc/simopen.c: deadline extensions for a half-open connection
SYN_RECV_GRACE_MAX = 0.5    # s, each


class PureEngine:
    """Pure-Python implementation of :class:`pyholepunch.engine.Engine`."""

    name = "pure"

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
        return run(_SimOpen(a.local[0], a.local[1], a.remote, a.start, a.start + a.timeout,
                            a.interval, a.syn_ttl, a.ttl_syns, a.listen))

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
        return run_sweep(pairs, start_at, timeout, local_ip=local_ip, max_inflight=max_inflight,
                         rate=rate, interval=interval, syn_ttl=syn_ttl)

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
        return await run_async(_SimOpen(
            a.local[0], a.local[1], a.remote, a.start, a.start + a.timeout, a.interval,
            a.syn_ttl, a.ttl_syns, a.listen, sel=LoopSelector(asyncio.get_running_loop())))

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
        return await run_sweep_async(pairs, start_at, timeout, local_ip=local_ip,
                                     max_inflight=max_inflight, rate=rate, interval=interval,
                                     syn_ttl=syn_ttl)

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
        return _raw_syn(src, dst, ttl=ttl, count=count, spacing=spacing, start_at=start_at)

    def relay_pump(
        self, fd_a: int, fd_b: int, *, idle_timeout: float = 300.0, max_bytes: int = 0
    ) -> RelayStats:
        return _relay_pump(fd_a, fd_b, idle_timeout=idle_timeout, max_bytes=max_bytes)


class _SimOpen:
    """One simultaneous_open call: a connecting socket re-armed on one port, plus a listener."""

    def __init__(self, lip: str, lport: int, remote: Address, start: float, deadline: float,
                 interval: float, syn_ttl: int | None, ttl_syns: int, listen: bool,
                 sel: selectors.BaseSelector | None = None) -> None:
        self.lip, self.lport, self.remote = lip, lport, remote
        self.start, self.deadline, self.interval = start, deadline, interval
        self.syn_ttl, self.ttl_syns, self.listen = syn_ttl, ttl_syns, listen
        self.stats = PunchStats()
        self.sel = sel if sel is not None else selectors.DefaultSelector()
        self.listener: socket.socket | None = None
        self.conn: socket.socket | None = None     # bound, connecting or about to
        self.connecting = False
        self.next_at = start
        self.graces = 0

    def _new_conn(self) -> None:
        self.conn = reuse_socket(self.lip, self.lport)
        self.stats.sockets_opened += 1
        self.lport = self.conn.getsockname()[1]    # port 0: every later attempt reuses it

    def open(self) -> None:
        if self.listen:
            self.listener = reuse_socket(self.lip, self.lport)
            self.stats.sockets_opened += 1
            self.listener.listen(LISTEN_BACKLOG)
            self.lport = self.listener.getsockname()[1]
            self.sel.register(self.listener, selectors.EVENT_READ)
        self._new_conn()                           # ready before start_at: only connect() is left

    def close(self, winner: socket.socket | None) -> None:
        self.sel.close()
        if self.conn is not None and self.conn is not winner and self._half_open():
            abort(self.conn)    # csrc/simopen.c hp_simopen_end: a RST, not a FIN
            self.conn = None
        close_all(s for s in (self.listener, self.conn) if s is not None and s is not winner)

    def outcome(self, winner: socket.socket | None) -> PunchResult:
        if winner is None:
            what = f"{format_address((self.lip, self.lport))} -> {format_address(self.remote)}"
            raise _base.punch_failure("simultaneous_open", what, self.stats, exhausted=False)
        return PunchResult(winner, self.stats)

    def _arm(self, now: float) -> None:
        assert self.conn is not None
        ttl = self.syn_ttl if self.stats.attempts < self.ttl_syns else None
        rc, sent_at = start_connect(self.conn, self.remote, ttl)
        note_syn(self.stats, rc, sent_at, self.start)
        self.next_at = sent_at + self.interval
        if rc in IN_PROGRESS:
            self.sel.register(self.conn, selectors.EVENT_WRITE)
            self.connecting = True
        else:
            self._failed(rc)

    def _failed(self, err: int) -> None:
        assert self.conn is not None
        why = count_failure(self.stats, err)
        log.debug("simultaneous_open attempt %d to %s ended: %s", self.stats.attempts,
                  self.remote, why)
        if self.connecting:
            self.sel.unregister(self.conn)
            self.connecting = False
        self.conn.close()
        self.conn = None
        self._new_conn()                           # bound now, connects at next_at

    def tick(self, now: float) -> float | None:
        """Connect if due; when to tick again, or None at the deadline (stretched for a
        connection the peer has answered: csrc/simopen.c, HP_SIMOPEN_GRACES)."""
        if now >= self.deadline:
            if self.graces >= SYN_RECV_GRACES or not self._half_open():
                return None
            self.graces += 1
            self.deadline = now + min(self.deadline - self.start, SYN_RECV_GRACE_MAX)
        if not self.connecting and now >= self.next_at:
            self._arm(now)
        return self.deadline if self.connecting else min(self.deadline, self.next_at)

    def _half_open(self) -> bool:
        """The peer's SYN seen and our SYN-ACK sent (SYN_RECV): closing it would send a FIN."""
        if self.conn is None or not self.connecting:
            return False
        try:
            info = self.conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
        except OSError:
            return False
        return info[0] == TCP_SYN_RECV

    def on_ready(self, fileobj: object) -> socket.socket | None:
        if fileobj is self.listener:
            return self._accept()
        if self.conn is not None and fileobj is self.conn and self.connecting:
            err = connect_outcome(self.conn)
            if err == 0:
                won, self.conn = self.conn, None
                self.sel.unregister(won)
                note_won(self.stats, won, self.remote, self.start)
                return won
            self._failed(err)
        return None

    def _accept(self) -> socket.socket | None:
        assert self.listener is not None
        while True:
            try:
                sock, peer = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return None
            except OSError as exc:              # ECONNABORTED etc.: that one is gone, go on
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    raise
                return None
            if same_endpoint(peer, self.remote):
                self.stats.accepted = True
                self.stats.sockets_opened += 1
                note_won(self.stats, sock, self.remote, self.start)
                return sock
            log.debug("simultaneous_open: dropped a connection from unexpected %s", peer)
            sock.close()
