"""Helpers shared by the asyncio tests (their fixtures are in conftest.py)."""
from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from pyholepunch import relay_step
from pyholepunch.identity import Identity
from pyholepunch.nat.profile import Allocation, Filtering, Mapping, NatProfile
from pyholepunch.peer import Peer
from pyholepunch.serve import Rendezvous
from pyholepunch.signal.client import SignalClient
from pyholepunch.signal.server import SignalServer
from pyholepunch.signal.tls import generate_credentials

CREDS = generate_credentials()      # both redis nodes present one identity, as a cluster would
needs_coturn = pytest.mark.skipif(shutil.which("turnserver") is None and not os.environ.get("CI"),
                                  reason="coturn (turnserver) is not installed")

USER, PASSWORD = "alice", "correct horse"
# Random symmetric on both sides: the server's plan is relay only, as behind two such NATs.
RANDOM_SYMMETRIC = NatProfile(mapping=Mapping.ADDRESS_AND_PORT_DEPENDENT,
                              filtering=Filtering.ADDRESS_AND_PORT_DEPENDENT,
                              allocation=Allocation.RANDOM)


@contextlib.asynccontextmanager
async def listening(srv: SignalServer) -> AsyncIterator[SignalServer]:
    """``srv`` started and listening on loopback; closed after (its relay hub too)."""
    try:
        await srv.start()
        await srv.listen()
        yield srv
    finally:
        await srv.close()
        if srv.relay_hub is not None:
            await srv.relay_hub.close()


def node_client(srv: SignalServer, name: str, **kw) -> SignalClient:  # type: ignore[no-untyped-def]
    port = srv._servers[0].sockets[0].getsockname()[1]
    return SignalClient(("127.0.0.1", port), kw.pop("identity", None) or Identity.generate(),
                        name=name, server_fingerprint=srv.server_id, **kw)


def rendezvous_client(app: Rendezvous, name: str) -> SignalClient:
    return SignalClient(app.address, Identity.generate(), name=name,
                        server_fingerprint=app.fingerprint, reconnect=False)


def fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


async def closed(*writers: asyncio.StreamWriter) -> None:
    """Close each writer and wait until it is (a reset peer's OSError is no failure here)."""
    for w in writers:
        w.close()
        try:
            await w.wait_closed()
        except OSError:
            pass


async def settled(before: set[str], deadline: float = 5.0) -> set[str]:
    """Our fds once released-allocation tasks and closing transports have run."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if relay_step.active_allocations() == 0 and fds() <= before:
            break
        await asyncio.sleep(0.05)
    return fds() - before


async def relay_only(peer: Peer) -> None:
    """Present the peer to the server as behind a random symmetric NAT (see RANDOM_SYMMETRIC):
    the plan the server hands out then has no direct step, like behind two such NATs."""
    peer.profiles["tcp"] = RANDOM_SYMMETRIC
    await peer._signal.update(profiles=list(peer.profiles.values()))


async def peers(app: Rendezvous, tmp: Path, relay: str,
                **alice_turn: str | None) -> tuple[Peer, Peer]:
    def make(name: str, **kw: Any) -> Peer:
        return Peer(app.address, name=name, config_dir=tmp / name,
                    server_fingerprint=app.fingerprint, relay=relay, **kw)

    alice, bob = make("alice", **alice_turn), make("bob")   # bob holds no TURN credentials
    await alice.start()
    try:
        await bob.start()
        for p in (alice, bob):
            await relay_only(p)
        # UPDATE has no answer and bob's travels on another connection than alice's CONNECT:
        # wait until the server holds bob's new profile, or it may plan with the old one.
        wanted = RANDOM_SYMMETRIC.to_dict()["mapping"]
        for _ in range(100):
            rec = await app.signal.store.find("bob")
            if rec is not None and any(p.get("mapping") == wanted for p in rec.profiles):
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the server never applied bob's profile update")
    except BaseException:
        await asyncio.gather(alice.close(), bob.close())
        raise
    return alice, bob


async def session_between(a: SignalClient, b: SignalClient) -> str:
    punch = await a.connect(b.name)
    await b.next_event(5)
    return punch.session
