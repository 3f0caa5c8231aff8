"""Helpers for every part of the suite."""
from __future__ import annotations

import socket

from pyholepunch.address import family_of


def free_port(ip: str = "127.0.0.1") -> int:
    """A TCP port nothing is bound to on ``ip`` right now (bound then released); IPv4 or IPv6."""
    with socket.socket(family_of(ip)) as s:
        s.bind((ip, 0))
        return int(s.getsockname()[1])
