"""Argument checks live in one place (_base) and both engines give the same error, word for word."""
from __future__ import annotations

import ast
import math
import socket
from pathlib import Path
from typing import Any

import pytest

from pyholepunch import engine as engine_mod
from pyholepunch.engine import _base

from .helpers import A_IP, B_IP

ENGINE_DIR = Path(engine_mod.__file__).parent


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            names.add(node.module or "")
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_native_engine_does_not_borrow_from_the_pure_engine() -> None:
    mods = _imported_modules(ENGINE_DIR / "native.py")
    assert not {m for m in mods if m.startswith("_pure") or ".pure" in m}, mods


def _messages(call: Any) -> dict[str, str]:
    """engine name -> 'ExceptionType: message' for the same bad call on each engine."""
    out = {}
    for name in ("native", "pure"):
        with pytest.raises(Exception) as info:
            call(engine_mod.get(name))
        out[name] = f"{type(info.value).__name__}: {info.value}"
    return out


BAD_CALLS: list[tuple[str, Any]] = [
    ("simopen local", lambda e: e.simultaneous_open(("x", 1), (B_IP, 9), None, 1.0)),
    ("simopen interval", lambda e: e.simultaneous_open((A_IP, 0), (B_IP, 9), None, 1.0,
                                                       interval=-1)),
    ("simopen ttl_syns", lambda e: e.simultaneous_open((A_IP, 0), (B_IP, 9), None, 1.0,
                                                       ttl_syns=1.5)),
    ("sweep empty", lambda e: e.sweep([], None, 1.0)),
    ("sweep pair", lambda e: e.sweep([(0, (B_IP, 9)), (70000, (B_IP, 9))], None, 1.0)),
    ("sweep host", lambda e: e.sweep([(0, ("0.0.0.0", 9))], None, 1.0)),
    ("sweep inflight", lambda e: e.sweep([(0, (B_IP, 9))], None, 1.0, max_inflight=0)),
    ("sweep rate", lambda e: e.sweep([(0, (B_IP, 9))], None, 1.0, rate=math.nan)),
    ("simopen mixed", lambda e: e.simultaneous_open(("::1", 0), (B_IP, 9), None, 1.0)),
    ("simopen scope", lambda e: e.simultaneous_open(("::", 0), ("fe80::9", 9), None, 1.0)),
    ("simopen brackets", lambda e: e.simultaneous_open(("::", 0), ("[::1]", 9), None, 1.0)),
    ("sweep mixed", lambda e: e.sweep([(0, ("::1", 9)), (0, (B_IP, 9))], None, 1.0)),
    ("sweep local family", lambda e: e.sweep([(0, ("::1", 9))], None, 1.0, local_ip=A_IP)),
    ("raw mixed", lambda e: e.raw_syn(("::1", 1), (B_IP, 2))),
    ("raw count", lambda e: e.raw_syn((A_IP, 1), (B_IP, 2), count=_base.MAX_RAW_COUNT + 1)),
    ("raw ttl", lambda e: e.raw_syn((A_IP, 1), (B_IP, 2), ttl=None)),
    ("relay fd", lambda e: e.relay_pump(-1, 5)),
    ("relay same", lambda e: e.relay_pump(5, 5)),
    ("relay idle", lambda e: e.relay_pump(5, 6, idle_timeout=-1)),
    ("relay limit", lambda e: e.relay_pump(5, 6, max_bytes=1.5)),
]


@pytest.mark.parametrize("what,call", BAD_CALLS, ids=[w for w, _ in BAD_CALLS])
def test_both_engines_give_the_same_error(what: str, call: Any) -> None:
    if "native" not in engine_mod.available():
        pytest.skip("native engine not built")
    got = _messages(call)
    assert got["native"] == got["pure"], got
    assert got["pure"].startswith("ValueError: "), got


@pytest.mark.parametrize("fd,words", [(-1, "fd_a must be a non-negative"),
                                      (True, "fd_a must be a non-negative"),
                                      ("3", "fd_a must be a non-negative")])
def test_relay_fd_check_names_the_argument(fd: object, words: str) -> None:
    with socket.socket() as s, pytest.raises(ValueError, match=words):
        _base.check_relay_args(fd, s.fileno(), 1.0, 0)

