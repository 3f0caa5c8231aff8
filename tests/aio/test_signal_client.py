"""Signaling client: server pinning and TOFU, reconnect with re-registration, restart with state."""
from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pyholepunch.errors import AuthenticationError, SignalingError
from pyholepunch.identity import Identity
from pyholepunch.signal.client import SignalClient
from pyholepunch.signal.protocol import ErrorCode
from pyholepunch.signal.server import ServerConfig, SignalServer
from pyholepunch.signal.store import MemoryStore
from pyholepunch.signal.tls import (
    FINGERPRINT_FILE,
    format_fingerprint,
    generate_credentials,
    load_or_create_credentials,
    parse_fingerprint,
)

CFG = ServerConfig(sync_pings=2, keepalive=3600)


async def start_server(creds=None, port: int = 0, state_dir: Path | None = None) -> SignalServer:  # type: ignore[no-untyped-def]
    srv = SignalServer(creds or load_or_create_credentials(state_dir), MemoryStore(state_dir), CFG)
    await srv.start()
    await srv.listen("127.0.0.1", port)
    return srv


def port_of(srv: SignalServer) -> int:
    return int(srv._servers[0].sockets[0].getsockname()[1])


async def wait_for(cond, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, "condition not reached"
        await asyncio.sleep(0.02)


@pytest.mark.asyncio
async def test_pinned_fingerprint_mismatch_is_refused() -> None:
    srv = await start_server(generate_credentials())
    try:
        wrong = format_fingerprint(generate_credentials().fingerprint)
        c = SignalClient(("127.0.0.1", port_of(srv)), Identity.generate(), name="a",
                         server_fingerprint=wrong, reconnect=False)
        with pytest.raises(AuthenticationError, match="does not match the pinned"):
            await c.start()
        ok = SignalClient(("127.0.0.1", port_of(srv)), Identity.generate(), name="a",
                          server_fingerprint="sha256:" + format_fingerprint(srv.server_id).upper())
        async with ok:
            assert ok.server_id == srv.server_id
    finally:
        await srv.close()
    with pytest.raises(AuthenticationError, match="need 32 bytes"):
        parse_fingerprint("abcd")


@pytest.mark.asyncio
async def test_trust_on_first_use_then_detect_change(tmp_path: Path) -> None:
    known = tmp_path / "known_servers"
    srv = await start_server(generate_credentials())
    port = port_of(srv)
    try:
        async with SignalClient(("127.0.0.1", port), Identity.generate(), name="a",
                                known_hosts=known):
            pass
        assert known.read_text().split() == [f"127.0.0.1:{port}", format_fingerprint(srv.server_id)]
        async with SignalClient(("127.0.0.1", port), Identity.generate(), name="b",
                                known_hosts=known):
            pass
    finally:
        await srv.close()
    impostor = await start_server(generate_credentials(), port=port)
    try:
        c = SignalClient(("127.0.0.1", port), Identity.generate(), name="c", known_hosts=known)
        with pytest.raises(AuthenticationError, match="changed its certificate"):
            await c.start()
    finally:
        await impostor.close()


@pytest.mark.asyncio
async def test_reconnects_and_reregisters_after_restart(tmp_path: Path) -> None:
    state = tmp_path / "state"
    srv = await start_server(state_dir=state)
    port = port_of(srv)
    fp = (state / FINGERPRINT_FILE).read_text().strip()
    a = SignalClient(("127.0.0.1", port), Identity.generate(), name="alice", server_fingerprint=fp,
                     backoff=(0.05, 0.2))
    b = SignalClient(("127.0.0.1", port), Identity.generate(), name="bob", server_fingerprint=fp,
                     backoff=(0.05, 0.2))
    await a.start()
    await b.start()
    try:
        await srv.close()
        await wait_for(lambda: not a.connected.is_set() and not b.connected.is_set())
        with pytest.raises(ConnectionError):
            await a.connect("bob")
        srv = await start_server(state_dir=state, port=port)     # same identity from the state dir
        await wait_for(lambda: a.registrations == 2 and b.registrations == 2)
        p = await a.connect("bob")
        assert (await b.next_event(5)).session == p.session
    finally:
        await a.close()
        await b.close()
        await srv.close()


@pytest.mark.asyncio
async def test_name_binding_survives_restart_with_state_dir(tmp_path: Path) -> None:
    state = tmp_path / "state"
    owner = Identity.generate()
    srv = await start_server(state_dir=state)
    port = port_of(srv)
    try:
        async with SignalClient(("127.0.0.1", port), owner, name="dave",
                                server_fingerprint=srv.server_id):
            pass
    finally:
        await srv.close()
    srv = await start_server(state_dir=state, port=port)
    try:
        thief = SignalClient(("127.0.0.1", port), Identity.generate(), name="dave",
                             server_fingerprint=srv.server_id, reconnect=False)
        with pytest.raises(SignalingError) as e:
            await thief.start()
        assert e.value.code == ErrorCode.NAME_TAKEN
        async with SignalClient(("127.0.0.1", port), owner, name="dave",
                                server_fingerprint=srv.server_id) as again:
            assert again.registrations == 1
    finally:
        await srv.close()
    # a torn last line (crash mid-append) loses nothing else
    with open(state / "names.jsonl", "a") as f:
        f.write('{"name": "half')
    assert await MemoryStore(state).key_of("dave") == owner.public_key


@pytest.mark.asyncio
async def test_silent_server_is_detected_and_reconnected() -> None:
    """TCP stays up but nothing arrives (server keepalive far beyond the client's patience)."""
    srv = await start_server(generate_credentials())
    try:
        c = SignalClient(("127.0.0.1", port_of(srv)), Identity.generate(), name="a",
                         server_fingerprint=srv.server_id, idle_timeout=0.3, backoff=(0.02, 0.05))
        async with c:
            await wait_for(lambda: c.registrations >= 2, timeout=5)
    finally:
        await srv.close()


@pytest.mark.asyncio
async def test_the_checked_connection_registers() -> None:
    """check_server's connection (TLS and HELLO done while the peer classifies) carries the
    registration: a lossy start does not pay TCP and TLS twice (#19). Too late, or closed
    by the server meanwhile, a fresh connection registers instead."""
    srv = await start_server(generate_credentials())
    pin = format_fingerprint(srv.server_id)
    try:
        c = SignalClient(("127.0.0.1", port_of(srv)), Identity.generate(), name="a",
                         server_fingerprint=pin, reconnect=False)
        await c.check_server()
        checked = c._checked
        assert checked is not None
        async with c:
            assert c._writer is checked.writer and c.registrations == 1
        assert c._checked is None

        late = SignalClient(("127.0.0.1", port_of(srv)), Identity.generate(), name="b",
                            server_fingerprint=pin, reconnect=False)
        await late.check_server()
        gone = late._checked
        assert gone is not None
        gone.writer.transport.abort()         # the server's handshake timeout, say
        async with late:
            assert late._writer is not gone.writer and late.registrations == 1
    finally:
        await srv.close()


@contextlib.asynccontextmanager
async def _flaky_front(upstream: int, first: str) -> AsyncIterator[tuple[int, list[int]]]:
    """A TCP relay in front of the server whose first connection fails the way a lossy path
    made it fail (#19): ``reset`` when the ClientHello comes, or ``mute``: the server's
    handshake flight passes, nothing after it (HELLO) does. Yields its port and a count."""
    seen = [0]
    pumps: set[asyncio.Task[None]] = set()

    async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, chunks: int) -> None:
        with contextlib.suppress(OSError):
            while data := await src.read(65536):
                if chunks:
                    chunks -= 1
                    dst.write(data)
        dst.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen[0] += 1
        broken = seen[0] == 1
        if broken and first == "reset":
            await reader.read(65536)
            writer.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()                        # RST
            return
        ur, uw = await asyncio.open_connection("127.0.0.1", upstream)
        for task in (pump(reader, uw, -1), pump(ur, writer, 1 if broken else -1)):
            pumps.add(asyncio.ensure_future(task))

    front = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield front.sockets[0].getsockname()[1], seen
    finally:
        front.close()
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)


@pytest.mark.asyncio
@pytest.mark.parametrize("first", ["reset", "mute"])
async def test_check_server_tries_a_broken_connection_once_more(first: str) -> None:
    """Our server behind a path that broke the check's first connection is still our server:
    one more connection, not "not a pyholepunch rendezvous server"."""
    srv = await start_server(generate_credentials())
    try:
        async with _flaky_front(port_of(srv), first) as (port, seen):
            c = SignalClient(("127.0.0.1", port), Identity.generate(), name="a",
                             server_fingerprint=format_fingerprint(srv.server_id),
                             reconnect=False)
            await c.check_server(floor=0.2)
            assert c._checked is not None and seen[0] == 2
            c._drop_checked()
    finally:
        await srv.close()
