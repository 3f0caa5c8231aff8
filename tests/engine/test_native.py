"""Facts only the native engine has: the GIL is released, C error codes map to clear Python
exceptions, and the C packet builder matches the pure one byte for byte."""
from __future__ import annotations

import asyncio
import errno
import os
import resource
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from pyholepunch import engine as engine_mod
from pyholepunch.errors import PunchTimeout

from .helpers import A_IP, B_IP, closed_ports, free_port, ticks_during

pytestmark = pytest.mark.skipif(
    not engine_mod.native_available() and not os.environ.get("CI"),
    reason="native engine not built",
)


@pytest.fixture
def native() -> engine_mod.Engine:
    return engine_mod.get("native")


@pytest.fixture
def _native_mod() -> object:
    from pyholepunch.engine import _native

    return _native


class _Counter(threading.Thread):
    """Counts as fast as it can: it only advances while it holds the GIL."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.n = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.n += 1


@pytest.fixture
def counter() -> Iterator[_Counter]:
    c = _Counter()
    c.start()
    try:
        yield c
    finally:
        c.stop.set()
        c.join(5)


def test_gil_released_during_a_punch(native: engine_mod.Engine, counter: _Counter) -> None:
    """A Python thread keeps running through a 1 s native punch that times out."""
    time.sleep(0.05)
    before = counter.n
    t0 = time.monotonic()
    with pytest.raises(PunchTimeout):
        native.simultaneous_open((A_IP, 0), (B_IP, free_port(B_IP)), None, 1.0, interval=0.05)
    elapsed = time.monotonic() - t0
    during = counter.n - before
    assert elapsed >= 1.0
    # Holding the GIL for the whole call would leave the counter where it was.
    assert during > 100_000, f"counter advanced only {during} times in {elapsed:.2f} s"


def test_gil_released_during_a_relay(native: engine_mod.Engine, counter: _Counter) -> None:
    a1, a2 = socket.socketpair()
    b1, b2 = socket.socketpair()
    try:
        before = counter.n
        stats = native.relay_pump(a2.fileno(), b2.fileno(), idle_timeout=0.5)
        assert stats.reason == "idle"
        assert counter.n - before > 50_000
    finally:
        for s in (a1, a2, b1, b2):
            s.close()


@pytest.mark.asyncio
async def test_event_loop_runs_during_a_native_sweep(native: engine_mod.Engine) -> None:
    async def sweep() -> None:
        pairs = [(0, (B_IP, p)) for p in closed_ports(4)]
        with pytest.raises(PunchTimeout):
            await asyncio.to_thread(native.sweep, pairs, None, 0.5, interval=0.05)

    assert await ticks_during(sweep()) >= 20


def test_timeout_is_punch_timeout_with_c_stats(native: engine_mod.Engine) -> None:
    remote = (B_IP, free_port(B_IP))
    with pytest.raises(PunchTimeout) as info:
        native.simultaneous_open((A_IP, 0), remote, time.time() + 0.05, 0.3, interval=0.03)
    exc = info.value
    assert isinstance(exc, TimeoutError)
    st = exc.stats
    assert st is not None
    assert st.rsts_seen >= 3 and st.attempts == st.syns_sent == st.rsts_seen
    assert st.first_syn_delay_ns is not None and 0 <= st.first_syn_delay_ns < 50_000_000
    assert st.first_syn_at is not None and abs(st.first_syn_at - time.time()) < 5
    assert st.time_to_established_ns is None and st.local_port is None and st.remote is None
    assert f"{st.attempts} attempts" in str(exc)


def test_out_of_descriptors_is_a_clear_oserror(native: engine_mod.Engine) -> None:
    """Fewer free fds than the cap needs: the C EMFILE becomes a clear OSError, nothing leaks."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fillers: list[int] = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        before = set(os.listdir("/proc/self/fd"))
        try:
            while True:
                fillers.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            pass
        for fd in fillers[-30:]:   # 30 free fds: the budget check (200 - 16) passes for 100
            os.close(fd)
        del fillers[-30:]
        pairs = [(0, (B_IP, p)) for p in closed_ports(200)]
        with pytest.raises(OSError) as info:
            native.sweep(pairs, None, 2.0, max_inflight=100)
        assert info.value.errno == errno.EMFILE
        assert "file descriptors" in str(info.value)
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert set(os.listdir("/proc/self/fd")) == before


def test_raw_syn_without_cap_net_raw_names_it(native: engine_mod.Engine) -> None:
    """In a child that gave up root, EPERM from the raw socket is a PermissionError."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                  # child: drop to nobody, try, report
        os.close(r)
        try:
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            native.raw_syn((A_IP, 40000), (B_IP, 40001))
            msg = "no error"
        except PermissionError as exc:
            msg = f"PermissionError {exc.errno} {exc}"
        except BaseException as exc:              # report anything else to the parent
            msg = f"{type(exc).__name__} {exc}"
        os.write(w, msg.encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        msg = f.read().decode()
    os.waitpid(pid, 0)
    assert msg.startswith("PermissionError"), msg
    assert "CAP_NET_RAW" in msg


def test_c_argument_errors_are_value_errors(_native_mod: object) -> None:
    """The binding refuses what C calls EINVAL with a ValueError, even without native.py."""
    n = _native_mod
    now = time.time()
    with pytest.raises(ValueError, match="EINVAL"):
        n.simultaneous_open(A_IP, 0, B_IP, 9, now, 0.0, 0.01, 0, 1, False)  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="EINVAL"):
        n.simultaneous_open(A_IP, 0, B_IP, 0, now, 1.0, 0.01, 0, 1, False)  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="not an IP address"):
        n.simultaneous_open("nope", 0, B_IP, 9, now, 1.0, 0.01, 0, 1, False)  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="EINVAL"):    # mixed families reach C: refused there too
        n.simultaneous_open("::1", 0, B_IP, 9, now, 1.0, 0.01, 0, 1, False)  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="no such interface"):
        n.simultaneous_open("fe80::1%nosuchif9", 0, "fe80::2%nosuchif9", 9, now, 1.0, 0.01, 0, 1,  # type: ignore[attr-defined]
                            False)
    with pytest.raises(ValueError, match="EINVAL"):
        n.sweep([(0, (B_IP, 9))], "0.0.0.0", now, 1.0, 0.0, 0, 0.0, 0)  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="EINVAL"):
        n.raw_syn(A_IP, 1, B_IP, 2, 0, 1, 0.0, 0.0)  # type: ignore[attr-defined]


def test_relay_errno_mapping(native: engine_mod.Engine) -> None:
    r, w = os.pipe()
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s1, s2 = socket.socketpair()
    try:
        with pytest.raises(OSError) as info:
            native.relay_pump(r, w)
        assert info.value.errno == errno.ENOTSOCK
        with pytest.raises(ValueError, match="stream"):
            native.relay_pump(u.fileno(), s1.fileno())
        closed = os.dup(r)
        os.close(closed)
        with pytest.raises(OSError) as info:
            native.relay_pump(closed, s1.fileno())
        assert info.value.errno == errno.EBADF
    finally:
        for fd in (r, w):
            os.close(fd)
        for s in (u, s1, s2):
            s.close()


def test_relay_restores_socket_modes(native: engine_mod.Engine) -> None:
    """The pump makes the fds non-blocking for splice(2) and puts every flag back."""
    a1, a2 = socket.socketpair()
    b1, b2 = socket.socketpair()
    a2.settimeout(None)
    b2.settimeout(2.5)       # Python keeps O_NONBLOCK set for sockets with a timeout
    try:
        a1.sendall(b"x" * 1000)
        a1.shutdown(socket.SHUT_WR)
        b1.shutdown(socket.SHUT_WR)
        stats = native.relay_pump(a2.fileno(), b2.fileno(), idle_timeout=2.0)
        assert (stats.reason, stats.bytes_a_to_b, stats.bytes_b_to_a) == ("eof", 1000, 0)
        assert a2.getblocking() and a2.gettimeout() is None
        assert b2.gettimeout() == 2.5
        assert os.get_blocking(a2.fileno()) and not os.get_blocking(b2.fileno())
        assert b1.recv(2000) == b"x" * 1000
    finally:
        for s in (a1, a2, b1, b2):
            s.close()


def test_c_syn_matches_the_pure_builder(_native_mod: object) -> None:
    from pyholepunch.engine._pure_raw import build_syn

    for src, dst, ttl, seq, ip_id in [
        (("192.0.2.1", 40000), ("203.0.113.7", 443), 3, 0x01020304, 77),
        (("10.0.0.1", 1), ("10.255.255.254", 65535), 255, 0xFFFFFFFF, 0xFFFF),
        (("127.0.0.2", 5555), ("127.0.0.3", 6666), 1, 0, 0),
        (("2001:db8::1", 40000), ("2001:db8:1::7", 443), 9, 0x01020304, 0),
        (("fd00::1:2", 1), ("fe80::ffff:1%lo", 65535), 255, 0xFFFFFFFF, 0),
    ]:
        c = _native_mod.build_syn(src[0], src[1], dst[0], dst[1], ttl, seq, ip_id)  # type: ignore[attr-defined]
        assert c == build_syn(src, dst, ttl=ttl, seq=seq, ip_id=ip_id)
