"""The native engine: the C core in csrc/ through the one Cython binding (``_native``).

Arguments are validated here with the same checks (and messages) as the pure engine, so the
C code only ever sees well-formed values; ``_native`` converts them, releases the GIL for the
whole blocking call and maps C error codes to exceptions. Run any method from asyncio with
``await asyncio.to_thread(engine.method, ...)``: the event loop keeps running meanwhile.
"""
from __future__ import annotations

from collections.abc import Sequence

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

_INT_MAX = 2**31 - 1


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

    def relay_pump(
        self, fd_a: int, fd_b: int, *, idle_timeout: float = 300.0, max_bytes: int = 0
    ) -> RelayStats:
        fd_a, fd_b, idle, limit = check_relay_args(fd_a, fd_b, idle_timeout, max_bytes)
        return _native.relay_pump(fd_a, fd_b, idle, limit)
