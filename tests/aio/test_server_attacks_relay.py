"""The rendezvous server under attack (issue #11), the built-in relay: one user's peers held
every relay slot (4 pairs, 256 slots in 8.8 s) and idle relays lived 300 s. Now relay
sessions are counted per asking peer and per source address, and a paired relay in which
nobody sends a byte ends after ``first_byte_timeout``."""
from __future__ import annotations

import asyncio
import os
import socket
import time
from dataclasses import replace

import pytest

from pyholepunch.identity import Identity
from pyholepunch.relay.builtin import MAGIC, OK, open_builtin_relay
from pyholepunch.serve import Rendezvous
from pyholepunch.signal.client import SignalClient
from pyholepunch.signal.protocol import Connect, Error, ErrorCode, Relay, RelayGrant
from pyholepunch.signal.server import ServerConfig
from tests.aio.attack_tools import RawPeer, coordinate, idle_time, within_twice

pytestmark = pytest.mark.timeout(60)
CFG = ServerConfig(sync_pings=2, keepalive=3600)
SLOTS = 24


async def join(address: tuple[str, int], token: bytes, bind: str) -> socket.socket | None:
    """A raw relay client from ``bind``: the socket once paired (OK byte), else None."""
    loop = asyncio.get_running_loop()
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((bind, 0))
    s.setblocking(False)
    try:
        await loop.sock_connect(s, address)
        await loop.sock_sendall(s, MAGIC + token)
        status = await asyncio.wait_for(loop.sock_recv(s, 1), 5)
    except (OSError, TimeoutError):
        s.close()
        return None
    if status != bytes([OK]):
        s.close()
        return None
    return s


async def drain(peer: RawPeer, seconds: float) -> list[object]:
    got: list[object] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            got.append(await peer.recv(max(0.01, deadline - time.monotonic())))
        except TimeoutError:
            break
    return got


@pytest.mark.asyncio
async def test_one_user_cannot_fill_the_relay() -> None:
    async with Rendezvous(("127.0.0.1", 0), config=replace(CFG), stun=False,
                          relay_options={"max_relays": SLOTS, "first_byte_timeout": 1.0}) as app:
        idle = await idle_time(app.address, app.fingerprint)
        pairs = []
        for i in range(4):                            # four pairs of one user's own peers
            a, b = RawPeer(app.address, app.fingerprint, f"fill-a{i}", bind="127.0.0.2"), \
                RawPeer(app.address, app.fingerprint, f"fill-b{i}", bind="127.0.0.2")
            await a.register()
            await b.register()
            pairs.append((a, b))
        for _ in range(8):
            for a, b in pairs:
                sid = os.urandom(8).hex()
                a.send(Connect(session=sid, target=b.name))
                a.send(Relay(session=sid))
                sid2 = os.urandom(8).hex()
                b.send(Connect(session=sid2, target=a.name))
                b.send(Relay(session=sid2))
        tokens: dict[str, list[bytes]] = {}
        refusals = set()
        for a, b in pairs:
            for msg in await drain(a, 0.5) + await drain(b, 0.5):
                if isinstance(msg, RelayGrant):
                    tokens.setdefault(msg.session, []).append(msg.token)
                elif isinstance(msg, Error):
                    refusals.add(msg.code)
        granted = [t for t in tokens.values() if len(t) == 2]
        assert len(granted) <= app.signal.config.relays_per_source
        assert ErrorCode.QUOTA_EXCEEDED in refusals
        joined = await asyncio.gather(*(join(app.address, tok, "127.0.0.2")
                                        for pair in granted for tok in pair))
        held = [s for s in joined if s is not None]
        assert app.relay_hub.metrics.active_relays <= app.signal.config.relays_per_source
        # A legitimate pair from another address still gets a relay, at once.
        started = time.monotonic()
        alice = SignalClient(app.address, Identity.generate(), name="alice", reconnect=False,
                             server_fingerprint=app.fingerprint)
        bob = SignalClient(app.address, Identity.generate(), name="bob", reconnect=False,
                           server_fingerprint=app.fingerprint)
        async with alice, bob:
            p = await alice.connect("bob")
            await bob.next_event(5)
            ga = await alice.request_relay(p.session)
            gb = await bob.next_event(5)
            (ra, wa), (rb, wb) = await asyncio.gather(
                open_builtin_relay(ga.relay, ga.token, timeout=5),
                open_builtin_relay(gb.relay, gb.token, timeout=5))   # type: ignore[union-attr]
            wa.write(b"ping")
            assert await asyncio.wait_for(rb.readexactly(4), 5) == b"ping"
            assert time.monotonic() - started < 2 * idle + 1.0
            # The attacker's relays never carried a byte: gone after first_byte_timeout.
            await asyncio.sleep(1.5)
            assert app.relay_hub.metrics.active_relays == 1
            assert app.relay_hub.metrics.ended.get("idle", 0) == len(held) // 2
            wa.close()
            wb.close()
        for s in held:
            s.close()
        for a, b in pairs:
            await a.close()
            await b.close()
        assert within_twice(await coordinate(app.address, app.fingerprint), idle)
