"""Who may use the API and what bad input gets: 401 without or with a wrong token, 403 for a
foreign Host or Origin (DNS rebinding), a non-loopback --listen without a token file refused
at start; unknown names, malformed paths, 1 GB bodies, slow clients -> clear 4xx, no crash, no
leaked connection or fd."""
from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from pyholepunch.api.auth import load_or_create_token

from .conftest import TOKEN, Side, curl

pytestmark = pytest.mark.timeout(60)


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.asyncio
async def test_token_host_and_origin_are_checked(pair: tuple[Side, Side]) -> None:
    alice, _ = pair
    url = alice.api.url + "/version"
    for reply in (await curl(url, token=None), await curl(url, token="wrong-token-0123456789")):
        assert reply.status == 401 and reply.json()["error"] == "unauthorized"
    evil_host = await curl(url, "-H", "Host: evil.example")
    assert evil_host.status == 403 and evil_host.json()["error"] == "bad_host"
    evil_origin = await curl(url, "-H", "Origin: http://evil.example")
    assert evil_origin.status == 403 and evil_origin.json()["error"] == "bad_origin"
    assert (await curl(url, "-H", "Origin: null")).status == 403
    # our own origin and the loopback names are fine
    port = alice.api.address[1]
    assert (await curl(url, "-H", f"Origin: http://localhost:{port}")).status == 200
    assert (await curl(url, "-H", f"Host: localhost:{port}")).status == 200
    assert (await curl(url, "-H", f"Host: [::1]:{port}")).status == 200
    assert (await curl(url, "-H", "Host: 127.0.0.1:1")).status == 403        # another port
    assert (await curl(url, "-H", f"Host: evil.example:{port}")).status == 403
    assert (await curl(url, "-H", f"Origin: http://evil.example:{port}")).status == 403
    # unauthenticated requests learn nothing about routes or connections
    assert (await curl(alice.api.url + "/info/nope", token=None)).status == 401


def test_token_file_is_created_private_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "state" / "api-token"
    token = load_or_create_token(path, create=True)
    assert len(token) >= 40 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_token(path, create=False) == token
    path.chmod(0o644)
    with pytest.raises(Exception, match="readable by others"):
        load_or_create_token(path, create=False)


def test_non_loopback_listen_without_token_file_refuses_to_start(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "pyholepunch", "api", "--listen", "0.0.0.0:0",
           "--server", "127.0.0.1:9", "--name", "alice", "--config-dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    assert proc.returncode == 2
    assert "not a loopback address" in proc.stderr and "--token-file" in proc.stderr
    assert not (tmp_path / "api-token").exists()


@pytest.mark.asyncio
async def test_bad_input_gets_clear_4xx(pair: tuple[Side, Side]) -> None:
    alice, _ = pair
    before = fds()
    cases = [("/info/nope", 404, "unknown_connection"), ("/recv/nope", 404, "unknown_connection"),
             ("/close/nope", 404, "unknown_connection"), ("/send/nope/x", 404, "unknown_connection"),
             ("/open/bad%20name/bob", 400, "bad_name"), ("/open/c1/-bad-", 400, "bad_peer"),
             ("/open/c1/nobody", 404, "signaling"), ("/accept/timeout/abc", 400, "bad_timeout"),
             ("/accept/timeout/99999", 400, "bad_timeout"), ("/open", 404, "not_found"),
             ("/no/such/route", 404, "not_found"), ("/binary/nope?size=0", 404, "unknown_connection"),
             ("/sub/c1/name/x", 501, "not_implemented"), ("/open/c1/self", 400, "bad_peer"),
             ("/open/c1/alice", 400, "bad_peer"), ("/binary/c1?size=abc", 404, "unknown_connection")]
    for path, status, code in cases:
        reply = await alice.get(path)
        assert (reply.status, reply.json()["error"]) == (status, code), (path, reply)
        assert reply.json()["message"]
    for garbage in (b"GARBAGE\r\n\r\n", b"GET /info/" + b"x" * 9000 + b" HTTP/1.1\r\n\r\n"):
        answer = await _raw(alice, garbage)      # aiohttp cannot parse it: still our JSON 400
        assert answer.split(b"\r\n")[0].endswith(b"400 Bad Request")
        assert b'"error": "bad_request"' in answer
    wrong_method = await alice.get("/version", "-X", "DELETE")
    assert wrong_method.status == 405 and wrong_method.json()["error"] == "method_not_allowed"
    await asyncio.sleep(0.1)
    assert fds() <= before + 1


async def _raw(side: Side, data: bytes, *, read_timeout: float = 10.0) -> bytes:
    r, w = await asyncio.open_connection(*side.api.address)
    try:
        w.write(data)
        return await asyncio.wait_for(r.read(), read_timeout)
    finally:
        w.close()


@pytest.mark.asyncio
async def test_huge_bodies_and_slow_clients(pair: tuple[Side, Side]) -> None:
    alice, bob = pair
    accepted = asyncio.create_task(bob.get("/accept/timeout/20"))
    assert (await alice.get("/open/c1/bob")).status == 201
    await accepted
    before = fds()
    host = f"Host: 127.0.0.1:{alice.api.address[1]}\r\nAuthorization: Bearer {TOKEN}\r\n"
    gig = f"POST /binary/c1 HTTP/1.1\r\n{host}Content-Length: {1 << 30}\r\n".encode()
    # declared 1 GB with Expect: refused before any body is sent
    answer = await _raw(alice, gig + b"Expect: 100-continue\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413") and b"body_too_large" in answer
    # declared 1 GB without Expect: refused without reading it
    answer = await _raw(alice, gig + b"\r\n" + b"x" * 65536)
    assert answer.startswith(b"HTTP/1.1 413")
    # a body that stalls: 408 after body_timeout (1 s here)
    stall = f"POST /binary/c1 HTTP/1.1\r\n{host}Content-Length: 100\r\n\r\n".encode() + b"x" * 10
    answer = await _raw(alice, stall)
    assert answer.startswith(b"HTTP/1.1 408") and b"slow_body" in answer
    # headers that never end: 408 after header_timeout (2 s here), connection closed
    answer = await _raw(alice, b"GET /version HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    assert answer.startswith(b"HTTP/1.1 408")
    # the connection still works and nothing leaked
    assert (await alice.get("/send/c1/still%20fine")).status == 200
    assert (await bob.get("/recv/alice/timeout/5")).json()["data"].endswith("still fine")
    await asyncio.sleep(0.2)
    assert fds() <= before + 1


@pytest.mark.asyncio
async def test_connection_count_is_bounded(pair: tuple[Side, Side]) -> None:
    alice, bob = pair                      # max_connections=4 in the fixture
    for i in range(4):
        assert (await alice.get(f"/open/c{i}/bob")).status == 201
    full = await alice.get("/open/c9/bob")
    assert full.status == 429 and full.json()["error"] == "too_many_connections"
    taken = await alice.get("/open/c0/bob")
    assert taken.status == 409 and taken.json()["error"] == "name_taken"
    assert len((await alice.get("/connections")).json()["connections"]) == 4
