"""relay_pump: bytes both ways, half-close, idle timeout, max_bytes; the caller's fds stay open."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pyholepunch import engine as engine_mod
from pyholepunch.engine import Engine, RelayStats
from tests.conftest import ENGINE_NAMES

from .helpers import Family


@pytest.fixture(params=[*ENGINE_NAMES, "native-splice"])
def engine(request: pytest.FixtureRequest) -> Engine:
    """Both engines, and the native one moving bytes with splice(2) instead of its default
    recv/send copy (both movers are kept: bench/bench_relay.py compares them)."""
    name, _, mover = str(request.param).partition("-")
    try:
        base = engine_mod.get(name)
    except ImportError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"the native engine is not usable under CI: {exc}")
        pytest.skip(f"native engine not built: {exc}")
    if not mover:
        return base
    variant = type(base)()
    variant.relay_mover = mover                    # type: ignore[attr-defined]
    return variant


def tcp_pair(ip: str = "127.0.0.1") -> tuple[socket.socket, socket.socket]:
    with socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET) as lst:
        lst.bind((ip, 0))
        lst.listen(1)
        c = socket.create_connection(lst.getsockname()[:2])
        s, _ = lst.accept()
    return c, s


@contextlib.contextmanager
def relayed(
    engine: Engine, ip_a: str = "127.0.0.1", ip_b: str = "127.0.0.1", **kw: Any
) -> Iterator[tuple[socket.socket, socket.socket, Callable[[], RelayStats]]]:
    """client_a <-> [a_side ==pump== b_side] <-> client_b; yields the two clients."""
    client_a, a_side = tcp_pair(ip_a)
    client_b, b_side = tcp_pair(ip_b)
    flags = [fcntl.fcntl(s.fileno(), fcntl.F_GETFL) for s in (a_side, b_side)]
    out: dict[str, Any] = {}

    def pump() -> None:
        try:
            out["stats"] = engine.relay_pump(a_side.fileno(), b_side.fileno(), **kw)
        except BaseException as exc:  # surfaced by result()
            out["error"] = exc

    t = threading.Thread(target=pump, daemon=True)
    t.start()

    def result() -> RelayStats:
        t.join(10)
        assert not t.is_alive(), "relay_pump did not return"
        if "error" in out:
            raise out["error"]
        return out["stats"]

    try:
        yield client_a, client_b, result
        result()
        # The pump borrowed the fds: they are still open and still sockets.
        assert os.fstat(a_side.fileno()) and os.fstat(b_side.fileno())
        a_side.getsockname(), b_side.getsockname()
        # ... with their file status flags (O_NONBLOCK) as the caller left them.
        assert [fcntl.fcntl(s.fileno(), fcntl.F_GETFL) for s in (a_side, b_side)] == flags
    finally:
        for s in (client_a, client_b):
            s.close()
        t.join(10)
        a_side.close()
        b_side.close()


def recv_all(s: socket.socket) -> bytes:
    chunks = []
    while chunk := s.recv(1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def test_bytes_both_ways_and_eof(engine: Engine, fam: Family) -> None:
    data_a, data_b = os.urandom(3 << 20), os.urandom(5 << 20) + b"end"
    with relayed(engine, fam.a, fam.b, idle_timeout=10) as (ca, cb, result):
        got: dict[str, bytes] = {}

        def side(me: socket.socket, data: bytes, key: str) -> None:
            sender = threading.Thread(target=lambda: (me.sendall(data), me.shutdown(socket.SHUT_WR)))
            sender.start()
            got[key] = recv_all(me)
            sender.join()

        ts = [threading.Thread(target=side, args=(ca, data_a, "a")),
              threading.Thread(target=side, args=(cb, data_b, "b"))]
        for t in ts:
            t.start()
        for t in ts:
            t.join(20)
        stats = result()
    assert hashlib.sha256(got["b"]).digest() == hashlib.sha256(data_a).digest()
    assert hashlib.sha256(got["a"]).digest() == hashlib.sha256(data_b).digest()
    assert stats.bytes_a_to_b == len(data_a) and stats.bytes_b_to_a == len(data_b)
    assert stats.reason == "eof"


def test_half_close_is_propagated(engine: Engine, fam: Family) -> None:
    """Also across families: an IPv4 peer relayed to a peer of ``fam``."""
    with relayed(engine, "127.0.0.1", fam.b, idle_timeout=10) as (ca, cb, result):
        ca.sendall(b"request")
        ca.shutdown(socket.SHUT_WR)                 # a is done talking, still listening
        assert recv_all(cb) == b"request"           # b sees a's FIN after the data
        cb.sendall(b"response after the half-close")
        cb.shutdown(socket.SHUT_WR)
        assert recv_all(ca) == b"response after the half-close"
        stats = result()
    assert stats.reason == "eof"
    assert (stats.bytes_a_to_b, stats.bytes_b_to_a) == (7, 29)


def test_idle_timeout(engine: Engine) -> None:
    with relayed(engine, idle_timeout=0.3) as (ca, cb, result):
        ca.sendall(b"ping")
        assert cb.recv(4) == b"ping"
        t0 = time.monotonic()
        stats = result()
        waited = time.monotonic() - t0
    assert stats.reason == "idle"
    assert stats.bytes_a_to_b == 4 and stats.bytes_b_to_a == 0
    assert 0.2 <= waited < 5


def test_max_bytes(engine: Engine) -> None:
    with relayed(engine, idle_timeout=5, max_bytes=100_000) as (ca, cb, result):
        sender = threading.Thread(target=ca.sendall, args=(os.urandom(300_000),), daemon=True)
        sender.start()
        stats = result()
        cb.settimeout(2)
        got = b""
        with contextlib.suppress(TimeoutError):
            while len(got) < 300_000 and (chunk := cb.recv(65536)):
                got += chunk
                if len(got) >= 100_000:
                    cb.settimeout(0.2)
    assert stats.reason == "limit"
    assert stats.bytes_a_to_b + stats.bytes_b_to_a == 100_000 == len(got)


def test_reset_ends_the_pump(engine: Engine) -> None:
    with relayed(engine, idle_timeout=5) as (ca, cb, result):
        ca.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        ca.close()                                  # RST towards the pump's a side
        stats = result()
    assert stats.reason.startswith("error"), stats


@pytest.mark.parametrize("bad,words", [
    (dict(fd_a=-1), "fd_a must be a non-negative file descriptor"),
    (dict(fd_a="3"), "fd_a must be a non-negative file descriptor"),
    (dict(fd_a=True), "fd_a must be a non-negative file descriptor"),
    (dict(same=True), "same descriptor"),
    (dict(idle_timeout=-1.0), "idle_timeout"), (dict(idle_timeout=float("nan")), "idle_timeout"),
    (dict(max_bytes=-1), "max_bytes"), (dict(max_bytes=1.5), "max_bytes"),
])
def test_bad_relay_arguments(engine: Engine, bad: dict[str, Any], words: str,
                             no_fd_leak: None) -> None:
    a, b = tcp_pair()
    with a, b:
        fd_a = bad.get("fd_a", a.fileno())
        fd_b = fd_a if bad.get("same") else b.fileno()
        kw = {k: v for k, v in bad.items() if k in ("idle_timeout", "max_bytes")}
        with pytest.raises(ValueError, match=words):
            engine.relay_pump(fd_a, fd_b, **kw)
        a.getsockname(), b.getsockname()        # still open


def test_relay_not_a_socket(engine: Engine, no_fd_leak: None) -> None:
    r, w = os.pipe()
    a, b = tcp_pair()
    try:
        with pytest.raises((OSError, ValueError)):
            engine.relay_pump(r, a.fileno(), idle_timeout=0.2)
        os.fstat(r)                                 # the caller's fd was not closed
        closed = os.dup(b.fileno())
        os.close(closed)
        with pytest.raises(OSError):
            engine.relay_pump(closed, a.fileno(), idle_timeout=0.2)
    finally:
        os.close(r)
        os.close(w)
        a.close()
        b.close()
