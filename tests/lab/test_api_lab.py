"""Two peers behind two NATs, driven through the HTTP API alone by real curl inside the lab:
open -> send -> recv -> close, a 10 MB binary round trip with matching sha256, and a tunnel
carrying a byte stream both ways."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyholepunch._process import OutputLines, stop_processes
from pyholepunch.cli.demo import PORT
from pyholepunch.lab import Lab

pytestmark = [pytest.mark.lab, pytest.mark.timeout(180)]
TOKEN = "lab-api-token-0123456789abcdef"
API = "http://127.0.0.1:12333"
TEN_MB = 10 * 1024 * 1024


def _cli(*argv: str) -> list[str]:
    return [sys.executable, "-m", "pyholepunch", *argv]


def curl(lab: Lab, node: str, path: str, *args: str, timeout: float = 60) -> tuple[int, str]:
    proc = lab.run(node, ["curl", "-sS", "--max-time", str(timeout), "-H",
                          f"Authorization: Bearer {TOKEN}", *args, "-w", "\n%{http_code}", API + path],
                   timeout=timeout + 10)
    body, _, code = proc.stdout.rpartition("\n")
    assert code.isdigit(), proc.stderr
    return int(code), body


def curl_bg(lab: Lab, node: str, path: str, *args: str) -> subprocess.Popen[bytes]:
    return lab.spawn(node, ["curl", "-sS", "--max-time", "60", "-H", f"Authorization: Bearer {TOKEN}",
                            *args, "-w", "\n%{http_code}", API + path],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finished(proc: subprocess.Popen[bytes]) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=70)
    body, _, code = out.decode().rpartition("\n")
    return int(code), body


@pytest.fixture(scope="module")
def lab_apis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, Path]]:
    work = tmp_path_factory.mktemp("api-lab")
    token_file = work / "token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    procs: list[subprocess.Popen[bytes]] = []
    with Lab(a="port-restricted", b="port-restricted", rtt_ms=20) as lab:
        try:
            server = f"{lab.server_ip}:{PORT}"
            srv = lab.spawn("server", _cli("serve", "--listen", server, "--alt-ip", lab.server_alt_ip,
                                           "--state-dir", str(work / "server")),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            procs.append(srv)
            fingerprint = OutputLines(srv, "stdout", "the server").wait_for("fingerprint", 30).split()[-1]
            for node, name in (("a", "alice"), ("b", "bob")):
                p = lab.spawn(node, _cli("api", "--server", server, "--server-fingerprint", fingerprint,
                                         "--name", name, "--config-dir", str(work / name),
                                         "--token-file", str(token_file)),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                procs.append(p)
                OutputLines(p, "stderr", f"api {name}").wait_for("pyholepunch api on", 30)
            yield lab, work
        finally:
            stop_processes(*procs)
            for p in procs:
                for stream in (p.stdout, p.stderr):
                    if stream is not None:
                        stream.close()


def test_open_send_recv_close_and_10mb_round_trip(lab_apis: tuple[Lab, Path]) -> None:
    lab, work = lab_apis
    accept = curl_bg(lab, "b", "/accept/timeout/40")
    status, body = curl(lab, "a", "/open/c1/bob", timeout=40)
    assert status == 201, body
    assert '"route": "direct"' in body
    status, body = finished(accept)
    assert status == 200 and '"name": "alice"' in body

    assert curl(lab, "a", "/send/c1/hello%20through%20two%20NATs")[0] == 200
    status, body = curl(lab, "b", "/recv/alice/timeout/10")
    assert status == 200 and '"data": "hello through two NATs"' in body
    assert curl(lab, "b", "/send/alice/and%20back")[0] == 200
    assert '"data": "and back"' in curl(lab, "a", "/recv/c1/timeout/10")[1]

    blob = os.urandom(TEN_MB)
    (work / "up.bin").write_bytes(blob)
    t = time.monotonic()
    down = curl_bg(lab, "b", f"/binary/alice/timeout/20?size={TEN_MB}", "-o", str(work / "at-b.bin"))
    status, body = curl(lab, "a", "/binary/c1", "--data-binary", f"@{work / 'up.bin'}")
    assert status == 200 and f'"sent": {TEN_MB}' in body
    assert finished(down)[0] == 200
    back = curl_bg(lab, "a", f"/binary/c1/timeout/20?size={TEN_MB}", "-o", str(work / "at-a.bin"))
    assert curl(lab, "b", "/binary/alice", "--data-binary", f"@{work / 'at-b.bin'}")[0] == 200
    assert finished(back)[0] == 200
    elapsed = time.monotonic() - t
    digest = hashlib.sha256(blob).hexdigest()
    assert hashlib.sha256((work / "at-b.bin").read_bytes()).hexdigest() == digest
    assert hashlib.sha256((work / "at-a.bin").read_bytes()).hexdigest() == digest
    print(f"10 MB there and back through the API in {elapsed:.2f} s")

    status, body = curl(lab, "a", "/close/c1")
    assert status == 200 and '"closed": "c1"' in body
    status, body = curl(lab, "b", "/recv/alice/timeout/10")
    assert status == 410 and "connection_closed" in body


def _tunnel(lab: Lab, node: str, con: str):  # type: ignore[no-untyped-def]
    s = lab.socket(node)
    s.settimeout(20)
    s.connect(("127.0.0.1", 12333))
    s.sendall(f"GET /tunnel/{con} HTTP/1.1\r\nHost: 127.0.0.1:12333\r\nAuthorization: Bearer "
              f"{TOKEN}\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(1)
        assert chunk, head
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return s


def _read(s, n: int) -> bytes:  # type: ignore[no-untyped-def]
    got = bytearray()
    while len(got) < n:
        chunk = s.recv(n - len(got))
        assert chunk, f"EOF after {len(got)} of {n} bytes"
        got += chunk
    return bytes(got)


def test_tunnel_carries_a_byte_stream_both_ways(lab_apis: tuple[Lab, Path]) -> None:
    lab, _ = lab_apis
    accept = curl_bg(lab, "b", "/accept/timeout/40")
    assert curl(lab, "a", "/open/t1/bob", timeout=40)[0] == 201
    status, body = finished(accept)
    assert status == 200
    incoming = body.split('"name": "')[1].split('"')[0]
    sa, sb = _tunnel(lab, "a", "t1"), _tunnel(lab, "b", incoming)
    try:
        there, back = os.urandom(512 << 10), os.urandom(300 << 10)
        sa.sendall(there)
        assert _read(sb, len(there)) == there
        sb.sendall(back)
        assert _read(sa, len(back)) == back
        sa.close()                             # one end closes: the other sees EOF
        assert sb.recv(1) == b""
    finally:
        sa.close()
        sb.close()
    assert curl(lab, "a", "/info/t1")[0] == 404
