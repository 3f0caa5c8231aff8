"""Real processes for the CLI tests: a `pyholepunch serve` on loopback, peers, a plain copy.

Everything talks to 127.0.0.1 only; every process started here is stopped (by PID) before the
helper returns or the fixture ends.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from pyholepunch._process import stop_processes

CLI = [sys.executable, "-m", "pyholepunch"]


def cli(*argv: str) -> list[str]:
    return [*CLI, *argv]


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    address: str
    fingerprint: str

    def peer_args(self, name: str, home: Path, *extra: str) -> list[str]:
        return ["--server", self.address, "--server-fingerprint", self.fingerprint, "--name", name,
                "--config-dir", str(home / name), *extra]


@contextlib.contextmanager
def running_server(tmp: Path, *extra: str) -> Iterator[Server]:
    proc = subprocess.Popen(cli("serve", "--listen", "127.0.0.1:0", "--json", "-q",
                                "--state-dir", str(tmp / "server"), *extra),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"serve did not start: {proc.stderr.read() if proc.stderr else ''!r}")
        doc = json.loads(line)
        yield Server(proc, doc["listen"], doc["fingerprint"])
    finally:
        stop_processes(proc)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def wait_line(stream: IO[bytes], needle: bytes, timeout: float, proc: subprocess.Popen[bytes]) -> bytes:
    """Read ``stream`` line by line until one contains ``needle`` (bounded by ``timeout``)."""
    deadline = time.monotonic() + timeout
    seen: list[bytes] = []
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return line
    raise AssertionError(f"no {needle!r} within {timeout} s (exit {proc.poll()}): {b''.join(seen)!r}")


@contextlib.contextmanager
def listener(server: Server, home: Path, *args: str, stdin: Any = subprocess.DEVNULL,
             stdout: Any = subprocess.DEVNULL, name: str = "bob") -> Iterator[subprocess.Popen[bytes]]:
    """`pyholepunch listen`, returned once it is registered (its stderr is a pipe)."""
    proc = subprocess.Popen(cli("listen", *server.peer_args(name, home), *args),
                            stdin=stdin, stdout=stdout, stderr=subprocess.PIPE)
    try:
        assert proc.stderr is not None
        wait_line(proc.stderr, b"listening", 30, proc)
        yield proc
    finally:
        stop_processes(proc)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def make_file(path: Path, size: int) -> str:
    """``size`` pseudo-random bytes (fast: a repeated 1 MiB random block with a counter)."""
    block = os.urandom(1 << 20)
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for i in range(0, size, 1 << 20):
            chunk = (i.to_bytes(8, "big") + block)[: min(1 << 20, size - i)]
            f.write(chunk)
            h.update(chunk)
    return h.hexdigest()


def json_lines(text: bytes) -> list[dict[str, Any]]:
    """Every line of ``text`` parsed as JSON (a line that is not JSON fails the test)."""
    return [json.loads(line) for line in text.decode().splitlines() if line.strip()]


def transfer_of(stderr: bytes) -> dict[str, Any]:
    docs = [d["transfer"] for d in json_lines(stderr) if "transfer" in d]
    assert docs, stderr
    return docs[-1]


PLAIN_COPY = r"""
import os, socket, sys, time
if sys.argv[1] == "recv":
    ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(1)
    print(ls.getsockname()[1], flush=True)
    s, _ = ls.accept(); t = time.monotonic()
    out = int(sys.argv[2])
    while d := s.recv(262144):
        mv = memoryview(d)
        while mv:
            mv = mv[os.write(out, mv):]
    s.sendall(b"k"); s.close()
    print(f"{time.monotonic() - t:.6f}", flush=True)
else:
    s = socket.create_connection(("127.0.0.1", int(sys.argv[2])))
    while d := os.read(0, 262144):
        s.sendall(d)
    s.shutdown(socket.SHUT_WR); s.recv(1)
"""


def plain_copy_seconds(src: Path, dst: Path) -> float:
    """A plain TCP copy of ``src`` into ``dst`` between two processes (what nc does), timed
    from the receiver's accept to its end, the acknowledgement included."""
    with open(dst, "wb") as out:
        recv = subprocess.Popen([sys.executable, "-c", PLAIN_COPY, "recv", str(out.fileno())],
                                stdout=subprocess.PIPE, pass_fds=(out.fileno(),))
        try:
            assert recv.stdout is not None
            port = recv.stdout.readline().strip().decode()
            with open(src, "rb") as f:
                subprocess.run([sys.executable, "-c", PLAIN_COPY, "send", port], stdin=f,
                               check=True, timeout=120)
            seconds = float(recv.stdout.readline())
            recv.wait(30)
        finally:
            stop_processes(recv)
            if recv.stdout is not None:
                recv.stdout.close()
    return seconds


PLAIN_TLS_COPY = r"""
import os, socket, sys, time
from pyholepunch.identity import Identity
from pyholepunch.security import certificate_for, tls_context
a, b = Identity.generate(), Identity.generate()
client = tls_context(a, certificate_for(b), server_side=False)
server = tls_context(b, certificate_for(a), server_side=True)
ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(1)
port, size = ls.getsockname()[1], os.path.getsize(sys.argv[1])
pid = os.fork()
if pid == 0:
    s = client.wrap_socket(socket.create_connection(("127.0.0.1", port)))
    fd = os.open(sys.argv[1], os.O_RDONLY)
    while d := os.read(fd, 1 << 20):
        s.sendall(d)
    s.recv(1)
    os._exit(0)
s = server.wrap_socket(ls.accept()[0], server_side=True)
out = os.open(sys.argv[2], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
n, t = 0, time.monotonic()
while n < size:
    d = s.recv(1 << 20)
    n += len(d)
    os.write(out, d)
s.sendall(b"k")
print(f"{time.monotonic() - t:.6f}", flush=True)
os.waitpid(pid, 0)
"""


def plain_tls_copy_seconds(src: Path, dst: Path) -> float:
    """The same bytes through plain blocking TLS 1.3 sockets (our certificates and cipher)
    between two processes into ``dst``, timed from the handshake's end to the acknowledgement."""
    r = subprocess.run([sys.executable, "-c", PLAIN_TLS_COPY, str(src), str(dst)],
                       capture_output=True, timeout=120, check=True)
    return float(r.stdout)


def run(argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[bytes]:
    kw.setdefault("capture_output", True)
    kw.setdefault("timeout", 120)
    return subprocess.run(list(argv), **kw)


def interrupt(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGINT)


def first_match(pattern: str, text: str) -> str:
    m = re.search(pattern, text)
    assert m, (pattern, text)
    return m.group(1)
