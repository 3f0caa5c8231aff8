"""Fixtures for the HTTP API: a real rendezvous server (with Prometheus metrics), real peers,
real ApiServers on loopback, and real curl as the client."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from pyholepunch.api.app import ApiServer
from pyholepunch.peer import Peer
from pyholepunch.serve import Rendezvous
from pyholepunch.signal.server import ServerConfig

TOKEN = "test-token-0123456789abcdef"
CFG = ServerConfig(sync_pings=2, keepalive=3600)

if shutil.which("curl") is None and not os.environ.get("CI"):   # CI installs it (.ci/setup)
    pytest.skip("curl is not installed", allow_module_level=True)


@dataclass
class Reply:
    status: int
    body: bytes
    headers: str = ""

    def json(self) -> Any:
        return json.loads(self.body)


async def curl(url: str, *args: str, token: str | None = TOKEN, timeout: float = 30.0,
               out: Path | None = None) -> Reply:
    """Real curl: (status, body). ``out``: write the body there instead (big downloads)."""
    auth = ["-H", f"Authorization: Bearer {token}"] if token is not None else []
    target = ["-o", str(out)] if out is not None else []
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--max-time", str(timeout), *auth, *args, *target,
        "-w", "\n%{http_code}", url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await proc.communicate()
    body, _, code = stdout.rpartition(b"\n")
    if not code.strip().isdigit():
        raise AssertionError(f"curl {url} failed: {stderr.decode(errors='replace')}")
    return Reply(int(code), body)


@dataclass
class Side:
    peer: Peer
    api: ApiServer

    async def get(self, path: str, *args: str, **kw: Any) -> Reply:
        return await curl(self.api.url + path, *args, **kw)


@pytest_asyncio.fixture
async def rendezvous(tmp_path: Path) -> AsyncIterator[Rendezvous]:
    async with Rendezvous(("127.0.0.1", 0), state_dir=str(tmp_path / "server"), config=CFG,
                          metrics=("127.0.0.1", 0)) as app:
        yield app


async def _side(app: Rendezvous, tmp_path: Path, name: str, **api_kw: Any) -> Side:
    peer = Peer(app.address, name=name, config_dir=tmp_path / name,
                server_fingerprint=app.fingerprint)
    await peer.start()
    api = ApiServer(peer, listen=("127.0.0.1", 0), token=TOKEN, **api_kw)
    await api.start()
    return Side(peer, api)


@pytest_asyncio.fixture
async def pair(rendezvous: Rendezvous, tmp_path: Path) -> AsyncIterator[tuple[Side, Side]]:
    sides: list[Side] = []
    try:
        for name in ("alice", "bob"):
            sides.append(await _side(rendezvous, tmp_path, name, header_timeout=2.0,
                                     body_timeout=1.0, max_body=16 << 20, max_connections=4))
        yield sides[0], sides[1]
    finally:
        for s in sides:
            await s.api.close()
            await s.peer.close()


def lines(reply: Reply) -> Sequence[str]:
    return reply.body.decode().splitlines()
