"""A TCP connect whose SYN is lost sends a fresh one after ~3 RTTs, not the kernel's 1 s
(stun.client.connect_rearming: STUN probes on one port, the signaling client's connects
racing new ports, #19).

The loss is real, without a lab: a listener whose accept queue is full drops SYNs (Linux,
tcp_abort_on_overflow=0). The queue is freed 50 ms after the connect starts; the kernel's
own retransmission would come at 1 s, the re-armed SYN at 0.15 s."""
from __future__ import annotations

import asyncio
import socket
import time

import pytest

from pyholepunch.errors import TransactionTimeout
from pyholepunch.stun.client import connect_rearming, silence_rearm


@pytest.mark.asyncio
@pytest.mark.parametrize("any_port", [False, True], ids=["same-port", "racing-ports"])
async def test_a_dropped_syn_costs_a_re_arm_not_a_second(any_port: bool) -> None:
    with socket.create_server(("127.0.0.1", 0), backlog=0) as ls, \
            socket.create_connection(ls.getsockname()) as filler:  # the one queued place
        assert filler
        loop = asyncio.get_running_loop()
        freed: list[socket.socket] = []
        loop.call_later(0.05, lambda: freed.append(ls.accept()[0]))
        t = time.monotonic()
        sock, rtt, rearms = await connect_rearming(ls.getsockname(), timeout=3.0,
                                           rearm=silence_rearm(0.01), any_port=any_port)
        took = time.monotonic() - t
        sock.close()
        for s in freed:
            s.close()
    assert freed, "the queue was never freed"
    assert took < 0.7, took            # the kernel alone: >= 1 s
    assert rtt < took
    assert rearms >= 1                 # its first SYN was dropped


@pytest.mark.asyncio
async def test_silence_ends_in_a_timeout_naming_the_address() -> None:
    with socket.create_server(("127.0.0.1", 0), backlog=0) as ls, \
            socket.create_connection(ls.getsockname()):
        host, port = ls.getsockname()
        for any_port in (False, True):
            with pytest.raises(TransactionTimeout, match=f"{host}:{port} timed out after 0.50 s"):
                await connect_rearming((host, port), timeout=0.5, rearm=0.1, any_port=any_port)


@pytest.mark.asyncio
async def test_a_refusal_is_final_at_once() -> None:
    with socket.create_server(("127.0.0.1", 0)) as ls:
        addr = ls.getsockname()
    for any_port in (False, True):
        t = time.monotonic()
        with pytest.raises(ConnectionRefusedError):
            await connect_rearming(addr, timeout=2.0, rearm=0.1, any_port=any_port)
        assert time.monotonic() - t < 0.5


def test_the_re_arm_follows_the_rtt() -> None:
    assert silence_rearm(None) == 0.3
    assert silence_rearm(0.001) == 0.15          # loopback: the floor
    assert silence_rearm(0.2) == pytest.approx(0.6)
