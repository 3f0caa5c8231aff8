"""Connection.upgrade() (#19): a relayed connection's initiator asks for a direct one, as a new
session with the direct step kinds only. Here on loopback the two peers share no address family, so
the relayed connection cannot upgrade, and says why; the successful move is the lab's
(tests/lab/test_relay_race.py)."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pyholepunch.errors import StateError, StrategyError
from pyholepunch.peer import Peer
from pyholepunch.serve import Rendezvous
from pyholepunch.signal.server import ServerConfig
from pyholepunch.strategy import NO_COMMON_FAMILY

CFG = ServerConfig(sync_pings=2, keepalive=3600)


@pytest.mark.asyncio
async def test_upgrade_without_a_direct_path_says_why(tmp_path: Path) -> None:
    async with Rendezvous([("127.0.0.1", 0), ("::1", 0)], config=CFG) as app:
        def peer(name: str, server: tuple[str, int], family: str) -> Peer:
            return Peer(server, name=name, config_dir=tmp_path / name, families=[family],
                        server_fingerprint=app.fingerprint)
        async with peer("alice", app.addresses[1], "ipv6") as alice, \
                peer("bob", app.addresses[0], "ipv4") as bob:
            conn = await alice.connect("bob", timeout=20)
            incoming = await asyncio.wait_for(bob.accept(), 10)
            async with conn, incoming:
                assert conn.route == "relay" and not conn.direct_seen
                with pytest.raises(StrategyError, match="none of the chosen steps") as err:
                    await conn.upgrade()          # the plan has no direct step
                assert NO_COMMON_FAMILY in str(err.value)
                assert alice.last_report is not None
                assert alice.last_report.failed_step == "plan"
                assert "allow the relay" in alice.last_report.advice
                with pytest.raises(StateError, match="only the connecting side"):
                    await incoming.upgrade()
                # the relayed connection is untouched by the failed upgrade
                await conn.send(b"still relayed")
                assert await asyncio.wait_for(incoming.recv(), 5) == b"still relayed"
