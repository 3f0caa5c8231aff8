"""Steps of one parallel group run together; every connection but the one returned is
closed, also when the group is abandoned (cancelled) after its steps connected. Real engines,
a real listener on loopback standing in for the peer."""
from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import pytest

from pyholepunch import engine as engine_mod
from pyholepunch.punch import PunchRun, PunchTarget
from pyholepunch.report import ConnectionReport
from pyholepunch.strategy import Action, Plan, RoleInstruction, Step, StepKind

pytestmark = pytest.mark.timeout(20)
ENGINES = ["pure"] + (["native"] if engine_mod.native_available() else [])


def group_of_connects(n: int) -> Plan:
    """``n`` CONNECT steps in one parallel group: each dials the peer's announced port."""
    steps = tuple(Step(StepKind.DIRECT, 2.0, "test", RoleInstruction(Action.CONNECT),
                       RoleInstruction(Action.LISTEN), parallel=1) for _ in range(n))
    return Plan(steps, "test")


def accepted(listener: socket.socket, n: int) -> list[socket.socket]:
    listener.settimeout(5)
    return [listener.accept()[0] for _ in range(n)]


def accept_for(listener: socket.socket, seconds: float) -> list[socket.socket]:
    """Every connection that arrives within ``seconds``."""
    out: list[socket.socket] = []
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        listener.settimeout(left)
        try:
            out.append(listener.accept()[0])
        except TimeoutError:
            break
    return out


def closed_by_peer(sock: socket.socket) -> bool:
    sock.settimeout(2)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.asyncio
async def test_a_group_returns_one_connection_and_closes_the_others(engine: str) -> None:
    with socket.create_server(("127.0.0.1", 0), backlog=8) as listener:
        port = listener.getsockname()[1]
        punch = PunchRun(engine_mod.get(engine), group_of_connects(3), "initiator",
                      time.time() + 0.05, 0, PunchTarget("127.0.0.1", port),
                      ConnectionReport(role="initiator"), local_ip="127.0.0.1")
        result = await punch.run()
        try:
            theirs = await asyncio.to_thread(accepted, listener, 3)
            try:
                kept = [s for s in theirs if s.getpeername() == result.sock.getsockname()]
                assert len(kept) == 1
                others = [s for s in theirs if s is not kept[0]]
                assert all(await asyncio.gather(*(asyncio.to_thread(closed_by_peer, s)
                                                  for s in others)))
                result.sock.sendall(b"x")
                assert kept[0].recv(1) == b"x"              # the returned one is alive
            finally:
                for s in theirs:
                    s.close()
        finally:
            result.sock.close()


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.asyncio
async def test_an_abandoned_group_lets_go_of_its_sockets(engine: str) -> None:
    """Cancelled while its SYNs go unanswered (the session ended: the peer gave up, a
    timeout), the group cancels its engine calls and their sockets close before run()
    returns: nothing connects later (left running, they held the punch port and took the
    next session's connection, #12)."""
    listener = socket.socket()
    fillers: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(3):          # a full accept queue: further SYNs are dropped, no RST
            c = socket.socket()
            c.setblocking(False)
            c.connect_ex(("127.0.0.1", port))
            fillers.append(c)
        await asyncio.sleep(0.05)
        plan = Plan(tuple(Step(StepKind.DIRECT, 4.0, "test", RoleInstruction(Action.CONNECT),
                               RoleInstruction(Action.LISTEN), parallel=1) for _ in range(2)),
                    "test")
        punch = PunchRun(engine_mod.get(engine), plan, "initiator", time.time() + 0.05, 0,
                      PunchTarget("127.0.0.1", port), ConnectionReport(role="initiator"),
                      local_ip="127.0.0.1")
        task = asyncio.ensure_future(punch.run())
        await asyncio.sleep(0.3)                   # both SYNs are out, unanswered
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # Make room: a SYN retransmitted by a socket still open (1 s after the first) would
        # connect now; closed ones retransmit nothing.
        filler_addrs = {c.getsockname() for c in fillers}
        for c in fillers:
            c.close()
        theirs = await asyncio.to_thread(accept_for, listener, 2.0)
        try:
            late = [s for s in theirs if s.getpeername() not in filler_addrs]
            assert late == [], [s.getpeername() for s in late]
        finally:
            for s in theirs:
                s.close()
    finally:
        for c in fillers:
            c.close()
        listener.close()


@pytest.mark.asyncio
async def test_a_silent_simultaneous_open_re_arms_in_slices() -> None:
    """punch.rearmed: a slice that times out is retried with a fresh SYN until the deadline;
    the final error says how often it re-armed."""
    from pyholepunch.engine import PunchStats
    from pyholepunch.errors import PunchTimeout
    from pyholepunch.punch import rearmed, silence_rearm

    assert silence_rearm(0.04) == pytest.approx(0.15) and silence_rearm(0.1) == pytest.approx(0.3)
    assert silence_rearm(None) == pytest.approx(0.3)
    calls: list[float] = []

    async def silent(at: float, left: float) -> Any:
        calls.append(left)
        await asyncio.sleep(left)
        raise PunchTimeout("no answer", PunchStats())

    t0 = time.time()
    with pytest.raises(PunchTimeout, match=r"re-armed \d+x after 100 ms of silence"):
        await rearmed(silent, t0, 0.35, 0.1)
    assert 3 <= len(calls) <= 4 and all(c <= 0.1 + 1e-9 for c in calls)

    async def third_time_lucky(at: float, left: float) -> Any:
        calls.append(at)
        if len(calls) < 3:
            await asyncio.sleep(left)
            raise PunchTimeout("no answer", PunchStats())
        return "connected"

    calls.clear()
    assert await rearmed(third_time_lucky, time.time(), 1.0, 0.05) == "connected"
