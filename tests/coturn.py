"""Run Debian's coturn (``turnserver``) as a TCP relay for tests, benchmarks and the lab.

Only builds the command line and supervises the process: everything lives in a private
work directory (log, pid file, SQLite user db), so several instances never collide.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pyholepunch._process import stop_processes
from pyholepunch.address import Address
from tests.helpers import free_port

log = logging.getLogger(__name__)


@dataclass
class CoturnConfig:
    """What one coturn instance serves. ``secret`` selects use-auth-secret (time-limited
    credentials); ``users`` static long-term ``user -> password`` pairs (lt-cred-mech)."""

    listen_ip: str = "127.0.0.1"
    port: int = 0                       # 0: pick a free one
    realm: str = "pyholepunch"
    secret: str | None = None
    users: dict[str, str] = field(default_factory=dict)
    relay_ports: tuple[int, int] | None = None    # None: a random private range of 200
    max_allocate_lifetime: int | None = None
    stale_nonce: int | None = None
    extra: Sequence[str] = ()

    def argv(self, workdir: Path) -> list[str]:
        if self.port == 0:
            raise ValueError("resolve the port first (CoturnConfig.port is 0)")
        lo, hi = self.relay_ports or _random_range()
        args = [
            shutil.which("turnserver") or "turnserver", "-n",
            "--listening-ip", self.listen_ip, "--relay-ip", self.listen_ip,
            "--listening-port", str(self.port), "--min-port", str(lo), "--max-port", str(hi),
            "--realm", self.realm, "--no-cli", "--no-tls", "--no-dtls", "--no-udp-relay",
            "--allow-loopback-peers", "--no-stdout-log", "--simple-log",
            "--log-file", str(workdir / "turn.log"), "--pidfile", str(workdir / "turn.pid"),
            "--userdb", str(workdir / "turndb"),
        ]
        if self.secret is not None:
            args += ["--use-auth-secret", "--static-auth-secret", self.secret]
        if self.users:
            args += ["--lt-cred-mech"]
            for user, password in self.users.items():
                args += ["--user", f"{user}:{password}"]
        if self.max_allocate_lifetime is not None:
            args += ["--max-allocate-lifetime", str(self.max_allocate_lifetime)]
        if self.stale_nonce is not None:
            args += [f"--stale-nonce={self.stale_nonce}"]
        return args + list(self.extra)


def _random_range() -> tuple[int, int]:
    # 200 ports below the usual ephemeral range (32768+), so relays don't race connect()s.
    lo = 20000 + int.from_bytes(os.urandom(2), "big") % 60 * 200
    return lo, lo + 199


class Coturn:
    """``with Coturn(CoturnConfig(secret="S")) as turn: turn.address``; stopped on exit."""

    def __init__(self, config: CoturnConfig, *, start_timeout: float = 10.0) -> None:
        self.config = config
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.workdir: Path | None = None

    @property
    def address(self) -> Address:
        return (self.config.listen_ip, self.config.port)

    @property
    def log_text(self) -> str:
        if self.workdir is None:
            return ""
        logs = sorted(self.workdir.glob("turn*.log"))
        return "".join(p.read_text(errors="replace") for p in logs)

    def start(self) -> None:
        if shutil.which("turnserver") is None:
            raise FileNotFoundError("coturn is not installed (apt-get install coturn)")
        if self.config.port == 0:
            self.config.port = free_port(self.config.listen_ip)
        self._tmp = tempfile.TemporaryDirectory(prefix="hp-coturn-")
        self.workdir = Path(self._tmp.name)
        argv = self.config.argv(self.workdir)
        log.debug("starting coturn: %s", " ".join(argv))
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        try:
            wait_listening(self.address, self.start_timeout, self.proc)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc is not None:
            stop_processes(self.proc, grace=3.0)
        self.proc = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> Coturn:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_listening(address: Address, timeout: float,
                   proc: subprocess.Popen[bytes] | None = None) -> None:
    """Poll until something accepts TCP at ``address`` (bounded), or the process died."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"turnserver exited with status {proc.returncode} at startup")
        with contextlib.suppress(OSError), socket.create_connection(address, timeout=0.5):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"turnserver did not listen on {address[0]}:{address[1]} "
                               f"within {timeout} s")
        time.sleep(0.05)
