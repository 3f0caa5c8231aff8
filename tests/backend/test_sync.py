"""``pyholepunch.sync.connect``: two blocking programs (threads here) connect through a STUN
server alone, their offers passed through queues, and talk over plain blocking sockets."""
from __future__ import annotations

import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import pyholepunch
import pyholepunch.sync
from pyholepunch._process import OutputLines, stop_processes

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def stun() -> Iterator[str]:
    proc = subprocess.Popen([sys.executable, "-m", "pyholepunch.stun", "--listen", "127.0.0.1:0",
                             "--alt-ip", "127.0.0.2"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        line = OutputLines(proc, "stdout", "the STUN server").wait_for("ready", 20)
        yield line.split()[1]
    finally:
        stop_processes(proc, grace=3.0)


def _channel() -> tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]:
    """Two ends of the apps' own signaling: each sends its offer and gets the other's."""
    ab: queue.Queue[bytes] = queue.Queue()
    ba: queue.Queue[bytes] = queue.Queue()

    def a(mine: bytes) -> bytes:
        ab.put(mine)
        return ba.get(timeout=10)

    def b(mine: bytes) -> bytes:
        ba.put(mine)
        return ab.get(timeout=10)
    return a, b


def test_two_blocking_programs_connect(stun: str) -> None:
    ex_a, ex_b = _channel()
    results: dict[str, Any] = {}

    def bob() -> None:
        try:
            with pyholepunch.sync.connect(stun, ex_b, name="bob", lead=0.3) as conn:
                data = b""
                while len(data) < 100_000:
                    data += conn.sock.recv(65536)
                conn.sock.sendall(b"got %d" % len(data))
                results["bob"] = (conn.route, conn.report.role, len(data))
                assert conn.sock.recv(1) == b""        # alice closed
        except BaseException as exc:   # noqa: BLE001 - re-raised by the test
            results["bob_error"] = exc

    thread = threading.Thread(target=bob)
    thread.start()
    with pyholepunch.sync.connect(stun, ex_a, name="alice", lead=0.3) as conn:
        assert conn.route == "direct" and conn.peer_id
        conn.sock.sendall(b"x" * 100_000)
        assert conn.sock.recv(100) == b"got 100000"
    thread.join(20)
    assert not thread.is_alive()
    assert "bob_error" not in results, results.get("bob_error")
    assert results["bob"][0] == "direct" and results["bob"][2] == 100_000


def test_a_bad_offer_raises_in_the_caller_and_stops_the_loop_thread(stun: str) -> None:
    before = threading.active_count()
    with pytest.raises(pyholepunch.OfferError, match="truncated"):
        pyholepunch.sync.connect(stun, lambda mine: mine[:-30], lead=0.3)
    assert threading.active_count() == before, [t.name for t in threading.enumerate()]


def test_an_answering_program_agrees_the_start_without_trusting_clocks(stun: str) -> None:
    """bob answers alice's offer (sync.answer) with a clock 2 s behind: the start is his,
    converted into alice's clock with the offset measured over the exchange."""
    ab: queue.Queue[bytes] = queue.Queue()
    ba: queue.Queue[bytes] = queue.Queue()
    results: dict[str, Any] = {}

    def bob() -> None:
        try:
            theirs = ab.get(timeout=10)        # bob's NAT is classified after it arrives
            with pyholepunch.sync.answer(stun, theirs, ba.put, name="bob", lead=0.3,
                                         clock=lambda: time.time() - 2.0) as conn:
                conn.sock.sendall(conn.sock.recv(100).upper())
                results["bob"] = (conn.route, conn.report.start_sync, conn.report.started)
                assert conn.sock.recv(1) == b""
        except BaseException as exc:   # noqa: BLE001 - re-raised by the test
            results["bob_error"] = exc

    def exchange(mine: bytes) -> bytes:
        ab.put(mine)
        return ba.get(timeout=10)

    thread = threading.Thread(target=bob)
    thread.start()
    with pyholepunch.sync.connect(stun, exchange, name="alice", lead=0.3) as conn:
        conn.sock.sendall(b"hello")
        assert conn.sock.recv(100) == b"HELLO"
        sync, started = conn.report.start_sync, conn.report.started
        assert conn.route == "direct" and sync is not None and sync["method"] == "answer"
    thread.join(20)
    assert "bob_error" not in results, results.get("bob_error")
    assert results["bob"][0] == "direct" and results["bob"][1]["method"] == "answered"
    assert abs(sync["offset_s"] + 2.0) < 0.05, sync      # bob's clock minus alice's
    assert abs(results["bob"][2] - started) < 0.05
