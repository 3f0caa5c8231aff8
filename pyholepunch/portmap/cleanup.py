"""Mappings are never left behind: the ones alive when the process ends are deleted.

``PortMapper.close`` deletes its mappings; this module is the safety net for when it does
not run: at interpreter exit (atexit) and on SIGTERM (a handler installed with the first
mapping, if the process had none: it deletes every live mapping with blocking sends, then
dies of SIGTERM as the default action would). Each mapping keeps its delete request ready as
bytes (``Release``), so this needs no event loop.
"""
from __future__ import annotations

import atexit
import logging
import os
import signal
import socket
import threading
from dataclasses import dataclass
from types import FrameType

log = logging.getLogger(__name__)

UDP_WAIT_S = 0.3
TCP_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class Release:
    """How to delete one mapping without an event loop: bytes to ``dest`` from ``source``."""

    kind: str                   # "udp" (PCP/NAT-PMP) or "tcp" (a UPnP SOAP request)
    source: str                 # local IP to send from (the router checks it)
    dest: tuple[str, int]
    payload: bytes


_live: dict[int, Release] = {}
_lock = threading.Lock()
_installed = False


def track(key: int, release: Release) -> None:
    with _lock:
        _live[key] = release
    _install()


def untrack(key: int) -> None:
    with _lock:
        _live.pop(key, None)


def pending() -> int:
    with _lock:
        return len(_live)


def send_release(r: Release) -> None:
    """Blocking, bounded: one datagram (waiting briefly for the answer) or one HTTP request."""
    if r.kind == "udp":
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((r.source, 0))
            s.settimeout(UDP_WAIT_S)
            s.sendto(r.payload, r.dest)
            try:
                s.recv(1100)
            except TimeoutError:
                pass
        return
    with socket.create_connection(r.dest, timeout=TCP_TIMEOUT_S,
                                  source_address=(r.source, 0)) as s:
        s.sendall(r.payload)
        s.shutdown(socket.SHUT_WR)
        while s.recv(4096):
            pass


def release_all() -> int:
    """Delete every mapping still tracked; returns how many were attempted."""
    with _lock:
        items = list(_live.items())
        _live.clear()
    for _, r in items:
        try:
            send_release(r)
        except OSError as exc:
            log.warning("could not delete a port mapping at %s:%d: %s", *r.dest, exc)
    return len(items)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    release_all()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def _install() -> None:
    global _installed
    if _installed:
        return
    _installed = True
    atexit.register(release_all)
    if threading.current_thread() is threading.main_thread() \
            and signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, _on_sigterm)
