"""What a stranger meets first in the Python API: a wrong server, address forms, two peers in
one process, cancelling the TLS of a connect. Real servers on loopback, in-process.

(Cancelling connect() during its punch still leaves the engine call running in a thread until
its step budget ends; the engine's async entry points (issue #20) make that cancellable.)"""
from __future__ import annotations

import asyncio
import gc
import logging
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

import pyholepunch
from pyholepunch.report import Route
from pyholepunch.security import Streams, certificate_for, secure_stream
from pyholepunch.serve import Rendezvous

from .helpers import cli, run

pytestmark = pytest.mark.timeout(60)


@pytest_asyncio.fixture
async def rendezvous(tmp_path: Path) -> AsyncIterator[Rendezvous]:
    async with Rendezvous(("127.0.0.1", 0), state_dir=str(tmp_path / "server")) as app:
        yield app


def _peer(app: Rendezvous, tmp: Path, name: str, **kw: object) -> pyholepunch.Peer:
    return pyholepunch.Peer(app.address, name=name, config_dir=tmp / name,
                            server_fingerprint=app.fingerprint, **kw)  # type: ignore[arg-type]


# --- a server that is not ours -------------------------------------------------------------

@pytest.fixture(params=["silent", "http", "closes"])
def foreign_server(request: pytest.FixtureRequest) -> Iterator[str]:
    """A TCP server of another kind on loopback: says nothing, answers HTTP, or hangs up."""
    ls = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = ls.accept()
            except OSError:
                return
            if request.param == "silent":
                held.append(conn)
                continue
            if request.param == "http":
                conn.recv(4096)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{ls.getsockname()[1]}"
    finally:
        stop.set()
        ls.shutdown(socket.SHUT_RDWR)    # wakes the blocked accept(); close() alone does not
        ls.close()
        thread.join(5)
        for c in held:
            c.close()


@pytest.mark.asyncio
async def test_a_foreign_server_is_named_within_an_rtt_bound(foreign_server: str, tmp_path: Path) -> None:
    t = time.monotonic()
    with pytest.raises(pyholepunch.SignalingError,
                       match="is not a pyholepunch rendezvous server") as err:
        async with pyholepunch.Peer(foreign_server, name="x", config_dir=tmp_path / "x"):
            pass
    took = time.monotonic() - t
    assert foreign_server in str(err.value)
    assert took < 2.5, took          # the check's bound: 1 s + 8 RTTs (loopback), not 18 s


def test_a_foreign_server_from_the_command_line(foreign_server: str, tmp_path: Path) -> None:
    r = run(cli("connect", "--server", foreign_server, "--config-dir", str(tmp_path / "c"), "bob"),
            stdin=subprocess.DEVNULL, timeout=30)
    assert r.returncode == 1
    assert b"is not a pyholepunch rendezvous server" in r.stderr.splitlines()[-1]


# --- one parser ----------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_classify_nat_takes_the_address_forms_peer_takes(rendezvous: Rendezvous) -> None:
    host, port = rendezvous.address
    for server in (f"{host}:{port}", (host, port)):
        profile = await pyholepunch.classify_nat(server, transport="tcp", local_ip="127.0.0.1")
        assert profile.nat_type == "open", profile.not_learned
    for bad in ("127.0.0.1:99999", "2001:db8::1:3478", "[::1", ("h", "p")):
        with pytest.raises(pyholepunch.AddressError):
            await pyholepunch.classify_nat(bad)  # type: ignore[arg-type]


# --- two peers, one process ----------------------------------------------------------------

@pytest.mark.asyncio
async def test_a_second_peer_on_one_config_dir_is_refused(rendezvous: Rendezvous, tmp_path: Path) -> None:
    async with _peer(rendezvous, tmp_path, "bob") as bob:
        twin = pyholepunch.Peer(rendezvous.address, name="bob-again", config_dir=tmp_path / "bob",
                                server_fingerprint=rendezvous.fingerprint)
        with pytest.raises(pyholepunch.ConfigDirInUse, match="give each peer its own config_dir"):
            async with twin:
                pass
        async with _peer(rendezvous, tmp_path, "alice") as alice:   # bob is still the one online
            accepted = asyncio.ensure_future(bob.accept())
            conn = await alice.connect("bob")
            async with conn, await accepted as theirs:
                await conn.send(b"ping")
                assert await theirs.recv() == b"ping"
    async with twin:                 # once bob is closed, the directory is free again
        assert twin.peer_id == bob.peer_id


@pytest.mark.asyncio
async def test_async_for_accepts(rendezvous: Rendezvous, tmp_path: Path) -> None:
    async with _peer(rendezvous, tmp_path, "bob") as bob, _peer(rendezvous, tmp_path, "alice") as alice:
        async def serve_one() -> bytes:
            async for conn in bob:
                async with conn:
                    return await conn.recv()
            raise AssertionError("not reached")
        served = asyncio.ensure_future(serve_one())
        async with await alice.connect("bob") as conn:
            await conn.send(b"hello")
            assert await served == b"hello"


def _tls_tasks() -> set[asyncio.Task[Any]]:
    """Pending tasks running the TLS layer's code (security.py, signal/tlsproto.py)."""
    out = set()
    for t in asyncio.all_tasks():
        code = getattr(t.get_coro(), "cr_code", None)
        if not t.done() and code is not None and \
                code.co_filename.endswith(("security.py", "tlsproto.py")):
            out.add(t)
    return out


# --- cancellation --------------------------------------------------------------------------

async def _handshake_pair(a: socket.socket, b: socket.socket) -> tuple[
        asyncio.Task[Streams], asyncio.Task[Streams]]:
    ia, ib = pyholepunch.Identity.generate(), pyholepunch.Identity.generate()
    client = asyncio.ensure_future(secure_stream(a, identity=ia, peer_id=ib.peer_id,
                                                 peer_cert=certificate_for(ib), initiator=True))
    server = asyncio.ensure_future(secure_stream(b, identity=ib, peer_id=ia.peer_id,
                                                 peer_cert=certificate_for(ia), initiator=False))
    return client, server


@pytest.mark.asyncio
async def test_cancelled_tls_leaves_nothing_pending(caplog: pytest.LogCaptureFixture) -> None:
    """Cancel the initiator's TLS at every loop turn of its handshake and confirmation: each
    time its socket is closed, the responder ends with an error (no hang), no TLS task stays
    pending or is destroyed pending, and the next handshake is as quick as the first."""
    caplog.set_level(logging.ERROR, logger="asyncio")
    loop = asyncio.get_running_loop()
    a, b = socket.socketpair()
    t = loop.time()
    client, server = await _handshake_pair(a, b)
    for _, w in await asyncio.gather(client, server):
        w.close()
    first = loop.time() - t
    turns = 1    # (cancelled before its first step, a coroutine runs no code at all)
    while True:
        a, b = socket.socketpair()
        client, server = await _handshake_pair(a, b)
        for _ in range(turns):
            await asyncio.sleep(0)
        if client.done():
            for _, w in await asyncio.gather(client, server):
                w.close()
            break                                  # past the last point to cancel at
        client.cancel()
        with pytest.raises(asyncio.CancelledError):
            await client
        assert a.fileno() == -1                    # our socket is closed at once
        async with asyncio.timeout(5):             # the responder learns it, never hangs
            outcome = await asyncio.gather(server, return_exceptions=True)
        if not isinstance(outcome[0], BaseException):
            outcome[0][1].close()
        turns += 1
    assert turns >= 5
    t = loop.time()
    a, b = socket.socketpair()
    client, server = await _handshake_pair(a, b)
    for _, w in await asyncio.gather(client, server):
        w.close()
    assert loop.time() - t < max(0.5, 5 * first)
    for _ in range(100):                # cancelled tasks end within a few loop turns
        if not _tls_tasks():
            break
        await asyncio.sleep(0.01)
    assert not _tls_tasks()
    gc.collect()
    await asyncio.sleep(0)
    assert not [r for r in caplog.records if "destroyed but it is pending" in r.getMessage()]


@pytest.mark.asyncio
async def test_cancelled_connects_cost_the_next_one_nothing(rendezvous: Rendezvous, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """connect() cancelled at a dozen points (signaling, punch, TLS, confirmation): the next
    connect succeeds as quickly as the first, directly, and no TLS task is left pending.

    (The next one used to go through the relay now and then: the initiator reused the port
    its given-up CONNECT had announced, and the responder's aborted session kept punching
    there -- its relay race left the punch running, and an abandoned step group left its
    engine calls running -- so the new connection met the old session's sockets.)"""
    caplog.set_level(logging.ERROR, logger="asyncio")
    async with _peer(rendezvous, tmp_path, "bob") as bob, _peer(rendezvous, tmp_path, "alice") as alice:
        async def drain() -> None:
            async for conn in bob:
                await conn.close()
        acceptor = asyncio.ensure_future(drain())
        t = time.monotonic()
        await (await alice.connect("bob")).close()
        first = time.monotonic() - t
        cancelled = 0
        for i in range(12):
            try:
                conn = await asyncio.wait_for(alice.connect("bob"), first * (i + 1) / 10)
            except TimeoutError:
                cancelled += 1
            else:
                await conn.close()
            t = time.monotonic()
            conn = await alice.connect("bob", timeout=5)
            took = time.monotonic() - t
            await conn.close()
            assert took < max(0.5, 5 * first), (i, conn.route, took, first)
            assert conn.route is Route.DIRECT, (i, conn.report.relay_reason)
        assert cancelled >= 3
        acceptor.cancel()
        await asyncio.gather(acceptor, return_exceptions=True)
    for _ in range(100):
        if not _tls_tasks():
            break
        await asyncio.sleep(0.01)
    assert not _tls_tasks()
    gc.collect()
    assert not [r for r in caplog.records if "destroyed but it is pending" in r.getMessage()]
