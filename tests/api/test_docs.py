"""docs/api.md: every ```sh example runs, in order, against alice's API (bob echoes)."""
from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest

from .conftest import TOKEN, Side

DOC = Path(__file__).parents[2] / "docs" / "api.md"
ROUTES = ["/version", "/ifs", "/addr", "/open/", "/info/", "/send/", "/recv/", "/binary/",
          "/tunnel/", "/close/", "/sub/", "/accept", "/nat", "/connections", "/report",
          "/events", "/metrics"]


def examples() -> list[str]:
    return re.findall(r"```sh\n(.*?)```", DOC.read_text(), re.S)


def test_every_route_has_a_curl_example() -> None:
    text = "\n".join(examples())
    for route in ROUTES:
        assert f"$API{route}" in text or route in text, f"no curl example for {route}"
    assert all("curl" in block for block in examples())


@pytest.mark.asyncio
@pytest.mark.timeout(90)
async def test_the_examples_run(pair: tuple[Side, Side], tmp_path: Path) -> None:
    alice, bob = pair

    async def echo() -> None:              # bob's side: whatever arrives goes back
        while not bob.api.registry.items:
            await asyncio.sleep(0.02)
        conn = next(iter(bob.api.registry.items.values())).conn
        while data := await conn.recv():
            await conn.send(data)

    echoer = asyncio.create_task(echo())
    outputs: list[str] = []
    try:
        for block in examples():
            proc = await asyncio.create_subprocess_exec(
                "bash", "-euo", "pipefail", "-c", block, cwd=tmp_path,
                env={"API": alice.api.url, "TOKEN": TOKEN, "PATH": "/usr/bin:/bin"},
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(), 30)
            assert proc.returncode == 0, (block, err.decode())
            outputs.append(out.decode())
    finally:
        echoer.cancel()
    bodies = {}
    for block, out in zip(examples(), outputs, strict=True):
        path = re.search(r"\$API(/\S*)", block).group(1)  # type: ignore[union-attr]
        bodies[path] = json.loads(out) if out.startswith("{") else out
    assert bodies["/open/c1/bob"]["name"] == "c1"
    assert bodies["/recv/c1/timeout/5"]["data"] == "hello bob"
    assert (tmp_path / "received.bin").read_bytes() == b"any \0 bytes"
    assert bodies["/tunnel/c1"]["error"] == "upgrade_required"
    assert bodies["/sub/c1/name/all"]["error"] == "not_implemented"
    assert bodies["/accept/timeout/1"]["error"] == "timeout"
    assert bodies["/connections/c1/report"]["route"] == "direct"
    assert "event: classification" in bodies["/events"]
    assert "pyholepunch_peer_connections_total" in bodies["/metrics"]
    assert bodies["/close/c1"] == {"closed": "c1", "error": 0}
