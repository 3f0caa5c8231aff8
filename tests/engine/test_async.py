"""simultaneous_open_async / sweep_async on both engines: the blocking calls' results and errors
(IPv4 and IPv6), a thousand concurrent punches, cancellation that leaves nothing behind, five
thousand at once.

Timing (first-SYN delay) is asserted in bench/bench_volume.py, not here.
"""
from __future__ import annotations

import asyncio
import os
import random
import re
import resource
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from pyholepunch.engine import Engine, PunchResult
from pyholepunch.errors import PunchError, PunchTimeout
from pyholepunch.peer import _raise_fd_limit

from .helpers import A_IP, B_IP, Family, closed_ports, free_port, open_fds, silent_port

HANDFUL = {"native": min(len(os.sched_getaffinity(0)), 4), "pure": 0}
"""Threads an engine may add: the native one runs a scheduler thread per CPU (at most 4)."""


def socket_fds() -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return n


def os_threads() -> int:
    """Every thread of the process, the C scheduler's included (threading sees only Python's)."""
    return len(os.listdir("/proc/self/task"))


async def settle(check: Callable[[], bool], within: float = 3.0) -> bool:
    """Wait until check() holds (the native scheduler thread lingers after its last punch)."""
    end = time.monotonic() + within
    while not check():
        if time.monotonic() > end:
            return False
        await asyncio.sleep(0.05)
    return True


def need_fds(n: int) -> None:
    _raise_fd_limit(n + 256)
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n + 256:
        pytest.skip(f"needs {n + 256} descriptors, RLIMIT_NOFILE hard limit is {soft}")


def pair_ports(n: int) -> list[int]:
    """n ports nothing listens on; the two sides of pair k are (A_IP, p_k) and (B_IP, p_k)."""
    return closed_ports(n, low=random.randrange(10000, 30000 - n))


async def punch_pairs(engine: Engine, ports: list[int], start_at: float,
                      timeout: float = 10.0) -> list[PunchResult | BaseException]:
    calls: list[Coroutine[Any, Any, PunchResult]] = []
    for p in ports:
        calls.append(engine.simultaneous_open_async((A_IP, p), (B_IP, p), start_at, timeout))
        calls.append(engine.simultaneous_open_async((B_IP, p), (A_IP, p), start_at, timeout))
    return await asyncio.gather(*calls, return_exceptions=True)


def check_all_connected(results: list[PunchResult | BaseException], ports: list[int]) -> None:
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, f"{len(errors)} of {len(results)} failed, e.g. {errors[:3]}"
    try:
        for k, p in enumerate(ports):
            a, b = results[2 * k], results[2 * k + 1]
            assert isinstance(a, PunchResult) and isinstance(b, PunchResult)
            assert a.stats.remote == (B_IP, p) and b.stats.remote == (A_IP, p)
            assert a.sock.getpeername() == b.sock.getsockname()     # one connection
    finally:
        for r in results:
            if isinstance(r, PunchResult):
                r.sock.close()


# --- same results, same errors as the blocking calls ------------------------------------------

@pytest.mark.asyncio
async def test_async_pair_connects_and_carries_data(engine: Engine, fam: Family) -> None:
    pa = free_port(fam.a)
    pb = next(p for p in iter(lambda: free_port(fam.b), None) if p != pa)
    start = time.time() + 0.1
    a, b = await asyncio.gather(
        engine.simultaneous_open_async((fam.a, pa), (fam.b, pb), start, 5.0),
        engine.simultaneous_open_async((fam.b, pb), (fam.a, pa), start, 5.0))
    try:
        assert a.sock.getblocking() and b.sock.getblocking()
        assert a.sock.family == fam.af
        assert a.stats.local_port == pa and a.stats.remote == (fam.b, pb)
        assert a.stats.first_syn_delay_ns is not None or a.stats.accepted
        a.sock.sendall(b"ping")
        assert b.sock.recv(4) == b"ping"
    finally:
        a.sock.close()
        b.sock.close()


@pytest.mark.asyncio
async def test_async_stats_equal_blocking(engine: Engine, fam: Family) -> None:
    """A connect to a listener: every deterministic stat is the blocking call's."""
    with fam.sock() as lst:
        lst.bind((fam.b, 0))
        lst.listen(4)
        target = lst.getsockname()[:2]
        got = []
        for call in ("blocking", "async"):
            args = ((fam.a, 0), target, None, 2.0)
            if call == "blocking":
                r = await asyncio.to_thread(engine.simultaneous_open, *args, listen=False)
            else:
                r = await engine.simultaneous_open_async(*args, listen=False)
            r.sock.close()
            got.append({k: v for k, v in r.stats.as_dict().items()
                        if k not in ("local_port", "first_syn_delay_ns", "first_syn_at",
                                     "time_to_established_ns")})
        assert got[0] == got[1] == {**got[0], "attempts": 1, "syns_sent": 1, "rsts_seen": 0,
                                     "remote": target, "accepted": False}


def _same_error(blocking: BaseException, asynch: BaseException) -> None:
    assert type(blocking) is type(asynch)
    digits = re.compile(r"\d+")      # attempt and RST counts depend on timing
    assert digits.sub("N", str(blocking)) == digits.sub("N", str(asynch))
    if isinstance(blocking, PunchError):
        assert isinstance(asynch, PunchError) and asynch.stats is not None


BAD_SIMOPEN: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
    ((("::1", 0), (B_IP, 9), None, 1.0), {}),
    (((A_IP, 0), (B_IP, 0), None, 1.0), {}),
    (((A_IP, 0), (B_IP, 9), None, -1.0), {}),
    (((A_IP, 0), (B_IP, 9), time.time() - 60, 1.0), {}),
    (((A_IP, 0), (B_IP, 9), None, 1.0), {"syn_ttl": 0}),
    (((A_IP, 0), (B_IP, 9), None, 1.0), {"interval": 0}),
]
BAD_SWEEP: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
    (([], None, 1.0), {}),
    (([(0, (B_IP, 9))], None, 1.0), {"max_inflight": 0}),
    (([(0, (B_IP, 9))], None, 1.0), {"rate": -1}),
    (([(70000, (B_IP, 9))], None, 1.0), {}),
]


@pytest.mark.asyncio
@pytest.mark.parametrize("case", range(len(BAD_SIMOPEN) + len(BAD_SWEEP)))
async def test_async_argument_errors_equal_blocking(engine: Engine, case: int) -> None:
    if case < len(BAD_SIMOPEN):
        args, kw = BAD_SIMOPEN[case]
        blocking, asynch = engine.simultaneous_open, engine.simultaneous_open_async
    else:
        args, kw = BAD_SWEEP[case - len(BAD_SIMOPEN)]
        blocking, asynch = engine.sweep, engine.sweep_async     # type: ignore[assignment]
    with pytest.raises(ValueError) as want:
        blocking(*args, **kw)
    with pytest.raises(ValueError) as got:
        await asynch(*args, **kw)
    _same_error(want.value, got.value)


@pytest.mark.asyncio
async def test_async_outcome_errors_equal_blocking(engine: Engine, fam: Family) -> None:
    """A refused simultaneous open times out, an all-refused sweep runs out of pairs, a
    sweep that finds the listener wins it: as the blocking calls; nothing is left open."""
    fds = open_fds()
    refused = closed_ports(8, low=21000)
    with fam.sock() as lst:
        lst.bind((fam.b, 0))
        lst.listen(4)
        target = lst.getsockname()[:2]
        found = [(0, (fam.b, p)) for p in refused] + [(0, target)]
        calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = [
            ("simultaneous_open", ((fam.a, 0), (fam.b, refused[0]), None, 0.2),
             {"listen": False}),
            ("sweep", ([(0, (fam.b, p)) for p in refused], None, 2.0), {"local_ip": fam.a}),
            ("sweep", (found, None, 2.0), {"local_ip": fam.a}),
        ]
        for name, args, kw in calls:
            outcomes: list[PunchResult | BaseException] = []
            for fn in (getattr(engine, name), getattr(engine, name + "_async")):
                try:
                    r = fn(*args, **kw)
                    outcomes.append(await r if asyncio.iscoroutine(r) else r)
                except (PunchError, OSError) as exc:
                    outcomes.append(exc)
            want, got = outcomes
            if isinstance(want, PunchResult):
                assert isinstance(got, PunchResult)
                assert want.stats.remote == got.stats.remote == target
                want.sock.close()
                got.sock.close()
            else:
                assert isinstance(want, PunchTimeout if name == "simultaneous_open" else PunchError)
                assert isinstance(got, BaseException)
                _same_error(want, got)
    assert await settle(lambda: open_fds() == fds), open_fds() ^ fds


# --- volume ------------------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_thousand_concurrent_calls_all_connect(engine: Engine) -> None:
    """1,000 concurrent simultaneous_open_async calls, 500 loopback pairs, one common start_at:
    every pair connects (each side's socket is the other's peer)."""
    need_fds(1000 * 4)
    ports = pair_ports(500)
    results = await punch_pairs(engine, ports, time.time() + 1.0)
    check_all_connected(results, ports)


@pytest.mark.asyncio
async def test_cancelling_a_thousand_in_flight_leaves_nothing(engine: Engine) -> None:
    """1,000 punches at a port that drops every SYN, cancelled while their SYNs are out: each
    await ends in CancelledError with its sockets already closed; then no fd and no thread
    of the engine's is left."""
    need_fds(1000 * 4)
    fds, sockets, threads = len(open_fds()), socket_fds(), os_threads()
    with silent_port(B_IP) as port:
        fds, sockets = fds + 4, sockets + 4      # the silent port's listener and fillers
        start = time.time() + 1.0
        tasks = [asyncio.ensure_future(engine.simultaneous_open_async(
            (A_IP, 0), (B_IP, port), start, 60.0, listen=i % 2 == 0)) for i in range(1000)]
        await asyncio.sleep(start + 0.3 - time.time())
        assert not any(t.done() for t in tasks)
        assert socket_fds() >= sockets + 1000                   # SYNs in flight
        assert os_threads() - threads <= HANDFUL[engine.name]   # scheduler threads
        for t in tasks:
            t.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, asyncio.CancelledError) for r in results)
        assert socket_fds() == sockets                          # closed before the awaits ended
        assert await settle(lambda: len(open_fds()) == fds and os_threads() == threads), \
            (len(open_fds()) - fds, os_threads() - threads)


@pytest.mark.asyncio
async def test_cancelling_a_sweep_closes_its_sockets(engine: Engine) -> None:
    """A sweep of 256 SYNs into silence, cancelled: every socket closed when the await ends."""
    sockets = socket_fds()
    with silent_port(B_IP) as port:
        sockets += 4
        task = asyncio.ensure_future(engine.sweep_async(
            [(0, (B_IP, port))] * 256, time.time() + 0.2, 30.0, local_ip=A_IP))
        await asyncio.sleep(0.5)
        assert not task.done() and socket_fds() >= sockets + 256
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert socket_fds() == sockets


@pytest.mark.asyncio
async def test_five_thousand_concurrent_calls(engine: Engine) -> None:
    """5,000 concurrent calls (2,500 loopback pairs) all connect within their timeout, on a
    handful of threads at most (native: one scheduler per CPU, at most 4; pure: none)."""
    need_fds(5000 * 3 + 256)
    threads = os_threads()
    ports = pair_ports(2500)
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, os_threads())
            await asyncio.sleep(0.01)

    watcher = asyncio.ensure_future(watch())
    try:
        # Every call is validated and (pure) opens its sockets before start_at: under load
        # that takes a while for 5,000, and a start_at 0.5 s past is an error.
        results = await punch_pairs(engine, ports, time.time() + 3.0, timeout=20.0)
    finally:
        watcher.cancel()
    check_all_connected(results, ports)
    assert peak - threads <= HANDFUL[engine.name], f"{peak - threads} extra threads"
