"""Relay fallback in the NAT lab: two peers behind random symmetric NATs (no direct path)
meet through the built-in relay (both engines) and through coturn's TCP relay, both on the
lab's server host."""
from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from pyholepunch import engine as engine_mod
from pyholepunch._process import stop_processes
from pyholepunch.relay.builtin import RelayHub, RelayServer, open_builtin_relay
from pyholepunch.relay.turn import (
    TurnClient,
    TurnCredentials,
    accept_relayed,
    connect_relayed,
    offer_relayed,
)
from tests.coturn import CoturnConfig, wait_listening

pytestmark = [pytest.mark.lab, pytest.mark.timeout(60)]

NAT = "symmetric-random"
PAYLOAD = 1 << 20


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _builtin_peer(server: tuple[str, int], token: bytes, seed: int) -> tuple[str, int]:
    """In a peer's namespace: join the relay, send 1 MiB, half-close, read the other side's."""
    async def main() -> tuple[str, int]:
        r, w = await open_builtin_relay(server, token, timeout=15)
        try:
            w.write(_payload(seed))
            await w.drain()
            w.write_eof()
            data = await asyncio.wait_for(r.read(), 20)
        finally:
            w.close()
        return _digest(data), len(data)
    return asyncio.run(main())


def _payload(seed: int) -> bytes:
    block = hashlib.sha256(seed.to_bytes(4, "big")).digest()
    return (block * (PAYLOAD // len(block) + 1))[:PAYLOAD]


@pytest.fixture(params=["native", "pure"])
def relay_engine(request: pytest.FixtureRequest) -> engine_mod.Engine:
    try:
        return engine_mod.get(request.param)
    except ImportError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"the {request.param} engine is not available under CI: {exc}")
        pytest.skip(f"{request.param} engine unavailable: {exc}")


@pytest.mark.asyncio
async def test_builtin_relay_between_random_symmetric_nats(relay_engine: engine_mod.Engine) -> None:
    from pyholepunch.lab import Lab

    async with Lab(a=NAT, b=NAT, rtt_ms=10) as lab:
        listener = lab.socket("server")          # the hub runs here, listening in "server"
        listener.bind((lab.server_ip, 0))
        server = RelayServer(RelayHub(engine=relay_engine, pair_timeout=15), sock=listener)
        await server.start()
        try:
            ta, tb = server.hub.issue("lab")
            res_a, res_b = await asyncio.gather(
                lab.acall("a", _builtin_peer, server.address, ta, 1, timeout=40),
                lab.acall("b", _builtin_peer, server.address, tb, 2, timeout=40))
        finally:
            await server.close()
        assert res_a == (_digest(_payload(2)), PAYLOAD)
        assert res_b == (_digest(_payload(1)), PAYLOAD)
        m = server.hub.metrics
        assert m.relays_total == 1 and m.bytes_relayed == 2 * PAYLOAD and not m.refused


def _turn_acceptor(server: tuple[str, int], secret: str, realm: str, peer_ip: str,
                   handoff: str) -> tuple[str, tuple[str, int], str, int]:
    """Peer a: allocate on coturn, permit b's public IP, publish the relayed address, accept."""
    async def main() -> tuple[str, tuple[str, int], str, int]:
        creds = TurnCredentials.from_shared_secret(secret, "a", now=time.time())
        async with TurnClient(server, creds) as client:
            relayed = await offer_relayed(client, peer_ip)
            Path(handoff).write_text(f"{relayed[0]} {relayed[1]}")
            peer, (r, w) = await accept_relayed(client, timeout=20)
            try:
                data = await asyncio.wait_for(r.readexactly(PAYLOAD), 20)
                w.write(_payload(1))
                await w.drain()
                await asyncio.wait_for(r.readexactly(3), 20)   # b's "bye": it got everything
            finally:
                w.close()
            return _digest(data), peer, f"{relayed[0]}:{relayed[1]}", len(data)
    return asyncio.run(main())


def _plain_dialer(handoff: str) -> tuple[str, int]:
    """Peer b: plain TCP to a's relayed address (no TURN on this side)."""
    deadline = time.monotonic() + 20
    while not os.path.exists(handoff) or not Path(handoff).read_text().strip():
        if time.monotonic() > deadline:
            raise TimeoutError("peer a never published its relayed address")
        time.sleep(0.05)
    host, port = Path(handoff).read_text().split()

    async def main() -> tuple[str, int]:
        r, w = await connect_relayed((host, int(port)), timeout=20)
        try:
            w.write(_payload(2))
            await w.drain()
            got = await asyncio.wait_for(r.readexactly(PAYLOAD), 20)
            w.write(b"bye")
            await w.drain()
        finally:
            w.close()
        return _digest(got), len(got)
    return asyncio.run(main())


@pytest.mark.asyncio
@pytest.mark.skipif(shutil.which("turnserver") is None and not os.environ.get("CI"),
                    reason="coturn (turnserver) is not installed")
async def test_coturn_relay_between_random_symmetric_nats() -> None:
    from pyholepunch.lab import Lab

    workdir = Path(tempfile.mkdtemp(prefix="hp-lab-coturn-"))
    try:
        async with Lab(a=NAT, b=NAT, rtt_ms=10) as lab:
            cfg = CoturnConfig(listen_ip=lab.server_ip, port=3478, secret="lab-secret",
                               realm="lab.test")
            proc = lab.spawn("server", cfg.argv(workdir), stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                await lab.acall("a", wait_listening, (lab.server_ip, 3478), 10, timeout=15)
                handoff = str(workdir / "relayed")
                res_a, res_b = await asyncio.gather(
                    lab.acall("a", _turn_acceptor, (lab.server_ip, 3478), "lab-secret",
                              "lab.test", lab.public_ip("b"), handoff, timeout=45),
                    lab.acall("b", _plain_dialer, handoff, timeout=45))
            finally:
                stop_processes(proc)
            digest_a, peer, relayed, n = res_a
            assert (digest_a, n) == (_digest(_payload(2)), PAYLOAD)
            assert res_b == (_digest(_payload(1)), PAYLOAD)
            # coturn saw b's NAT's public address, and relayed on the server host.
            assert peer[0] == lab.public_ip("b")
            assert relayed.startswith(lab.server_ip + ":")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
