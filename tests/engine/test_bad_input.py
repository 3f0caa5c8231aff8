"""Bad input gets a clear Python exception naming the mistake: no crash, no leaked fd."""
from __future__ import annotations

import math
import socket
import time
from typing import Any

import pytest

from pyholepunch.engine import Engine

from .helpers import A_IP, B_IP, free_port

GOOD_LOCAL = (A_IP, 0)
GOOD_REMOTE = (B_IP, 9)

SIMOPEN_BAD: list[tuple[dict[str, Any], str]] = [
    (dict(local=("not-an-ip", 1000)), "local host"),
    (dict(local=("300.1.1.1", 1000)), "local host"),
    (dict(local=("::1", 1000)), "mixed address families: local ::1 is IPv6 but remote"),
    (dict(local=("::", 0), remote=("fe80::1", 80)), "link-local address 'fe80::1' needs a scope"),
    (dict(local=("fe80::1", 0), remote=("::1", 80)), "local: link-local .* needs a scope id"),
    (dict(local=("::", 0), remote=("[::1]", 80)), "no brackets around an IPv6 address"),
    (dict(local=("::", 0), remote=("::ffff:127.0.0.3", 80)), "IPv4-mapped IPv6 address"),
    (dict(local=("::", 0), remote=("fe80::1%nosuchif9", 80)), "no interface 'nosuchif9'"),
    (dict(local=("::", 0), remote=("::", 80)), "unspecified"),
    (dict(local=("::", 0), remote=(B_IP, 80)), "mixed address families"),
    (dict(local=(A_IP, 65536)), "out of range"),
    (dict(local=(A_IP, -1)), "out of range"),
    (dict(local=(A_IP, "80")), "not an integer"),
    (dict(local="127.0.0.2:80"), "tuple"),
    (dict(local=(A_IP, 1, 2)), "tuple"),
    (dict(remote=(B_IP, 0)), "out of range"),
    (dict(remote=(B_IP, 70000)), "out of range"),
    (dict(remote=("0.0.0.0", 80)), "unspecified"),
    (dict(remote=("example.com", 80)), "not an IP address"),
    (dict(remote=("2001:db8::1:80",)), "tuple"),
    (dict(start_at=-10.0), "in the past"),
    (dict(start_at="soon"), "start_at"),
    (dict(start_at=math.nan), "start_at"),
    (dict(timeout=0), "timeout"),
    (dict(timeout=-1.0), "timeout"),
    (dict(timeout=math.inf), "timeout"),
    (dict(timeout=math.nan), "timeout"),
    (dict(timeout=1e9), "timeout"),
    (dict(interval=0), "interval"),
    (dict(interval=-0.5), "interval"),
    (dict(syn_ttl=0), "syn_ttl"),
    (dict(syn_ttl=256), "syn_ttl"),
    (dict(ttl_syns=-1), "ttl_syns"),
]


@pytest.mark.parametrize("bad,words", SIMOPEN_BAD, ids=[str(b) for b, _ in SIMOPEN_BAD])
def test_simultaneous_open_bad_input(engine: Engine, bad: dict[str, Any], words: str,
                                     no_fd_leak: None) -> None:
    args: dict[str, Any] = dict(local=GOOD_LOCAL, remote=GOOD_REMOTE, start_at=None, timeout=1.0)
    args.update(bad)
    if args["start_at"] == -10.0:
        args["start_at"] = time.time() - 10
    kw = {k: args.pop(k) for k in ("interval", "syn_ttl", "ttl_syns") if k in args}
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=words):
        engine.simultaneous_open(args["local"], args["remote"], args["start_at"], args["timeout"], **kw)
    assert time.monotonic() - t0 < 0.5         # refused up front, nothing sent


def test_start_at_slightly_late_starts_at_once(engine: Engine, no_fd_leak: None) -> None:
    """Within the tolerance a late start_at is not an error: the punch starts right away."""
    from pyholepunch.errors import PunchTimeout

    with pytest.raises(PunchTimeout) as info:
        engine.simultaneous_open((A_IP, free_port(A_IP)), (B_IP, free_port(B_IP)),
                                 time.time() - 0.1, 0.15, interval=0.05)
    assert info.value.stats is not None and info.value.stats.attempts >= 1


def test_local_port_taken_without_reuseport(engine: Engine, no_fd_leak: None) -> None:
    """A local port held by a socket without SO_REUSEPORT is a clear OSError, not a hang."""
    with socket.socket() as holder:
        holder.bind((A_IP, 0))
        holder.listen(1)
        with pytest.raises(OSError) as info:
            engine.simultaneous_open(holder.getsockname(), (B_IP, 9), None, 0.5)
    assert info.value.errno == 98    # EADDRINUSE


SWEEP_BAD: list[tuple[dict[str, Any], str]] = [
    (dict(pairs=[]), "at least one"),
    (dict(pairs="abc"), "pairs"),
    (dict(pairs=[(0, (B_IP, 80), 1)]), "pairs\\[0\\]"),
    (dict(pairs=[(0, (B_IP, 80)), (70000, (B_IP, 80))]), "pairs\\[1\\].*out of range"),
    (dict(pairs=[(0, (B_IP, 80)), (0, (B_IP, 0))]), "pairs\\[1\\].*out of range"),
    (dict(pairs=[(0, ("nope", 80))]), "pairs\\[0\\]"),
    (dict(pairs=[(0, ("0.0.0.0", 80))]), "unspecified"),
    (dict(pairs=[(-1, (B_IP, 80))]), "out of range"),
    (dict(local_ip="localhost"), "local_ip"),
    (dict(pairs=[(0, (B_IP, 80)), (0, ("::1", 80))]),
     "mixed address families: pairs\\[1\\] remote ::1 is IPv6 but pairs\\[0\\]"),
    (dict(pairs=[(0, ("::1", 80))], local_ip=A_IP), "mixed address families: local_ip"),
    (dict(pairs=[(0, ("::1", 80))], local_ip="::ffff:1.2.3.4"), "IPv4-mapped"),
    (dict(pairs=[(0, ("fe80::2", 80))]), "needs a scope id"),
    (dict(max_inflight=0), "max_inflight"),
    (dict(rate=-1.0), "rate"),
    (dict(rate=math.nan), "rate"),
    (dict(interval=-1.0), "interval"),
    (dict(syn_ttl=300), "syn_ttl"),
    (dict(timeout=0), "timeout"),
    (dict(start_at=1.0), "in the past"),
]


@pytest.mark.parametrize("bad,words", SWEEP_BAD, ids=[str(b) for b, _ in SWEEP_BAD])
def test_sweep_bad_input(engine: Engine, bad: dict[str, Any], words: str, no_fd_leak: None) -> None:
    args: dict[str, Any] = dict(pairs=[(0, (B_IP, 9))], start_at=None, timeout=1.0)
    args.update(bad)
    pairs, start_at, timeout = args.pop("pairs"), args.pop("start_at"), args.pop("timeout")
    with pytest.raises(ValueError, match=words):
        engine.sweep(pairs, start_at, timeout, **args)


RAW_BAD: list[tuple[dict[str, Any], str]] = [
    (dict(src=("bad", 1)), "src"),
    (dict(src=(A_IP, 0)), "src"),
    (dict(dst=(B_IP, 0)), "dst"),
    (dict(dst=(B_IP, 65536)), "dst"),
    (dict(dst=("::1", 40001)), "mixed address families: src 127.0.0.2 is IPv4 but dst ::1"),
    (dict(src=("::1", 40000), dst=("fe80::1", 1)), "dst: link-local"),
    (dict(ttl=0), "ttl"),
    (dict(ttl=256), "ttl"),
    (dict(count=0), "count"),
    (dict(spacing=-0.1), "spacing"),
    (dict(spacing=math.inf), "spacing"),
    (dict(start_at=time.time() - 3600), "in the past"),
]


@pytest.mark.parametrize("bad,words", RAW_BAD, ids=[str(b) for b, _ in RAW_BAD])
def test_raw_syn_bad_input(engine: Engine, bad: dict[str, Any], words: str, no_fd_leak: None) -> None:
    args: dict[str, Any] = dict(src=(A_IP, 40000), dst=(B_IP, 40001))
    args.update(bad)
    with pytest.raises(ValueError, match=words):
        engine.raw_syn(args.pop("src"), args.pop("dst"), **args)
