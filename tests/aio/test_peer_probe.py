"""The punch-port probe (STUN over TCP from the punch port, against the real server) survives
a broken connection, as on a lossy path, and gives up with the cause when it keeps failing."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pyholepunch import punchport
from pyholepunch.errors import StartFailed, StartTimeout, TransactionTimeout
from pyholepunch.peer import Peer
from pyholepunch.serve import Rendezvous

pytestmark = pytest.mark.timeout(30)


def failing_first(times: int, exc: BaseException) -> tuple[Any, list[int]]:
    """A punchport.probe_once that fails ``times`` times with ``exc``, then probes for real."""
    real = punchport.probe_once
    calls: list[int] = []

    async def probe_once(server: Any, local_ip: str, port: int, **kw: Any) -> Any:
        calls.append(port)
        if len(calls) <= times:
            raise exc
        return await real(server, local_ip, port, **kw)
    return probe_once, calls


@pytest.mark.asyncio
async def test_start_survives_a_reset_probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    probe_once, calls = failing_first(2, ConnectionResetError("203.0.113.10:3478 closed the "
                                                              "connection"))
    monkeypatch.setattr(punchport, "probe_once", probe_once)
    async with Rendezvous(("127.0.0.1", 0)) as app:
        alice = Peer(app.address, name="alice", config_dir=tmp_path / "alice",
                     server_fingerprint=app.fingerprint)
        await alice.start()
        try:
            # Two failures, then the answer, from the same punch port (then the re-announce).
            assert len(calls) >= 3 and len(set(calls[:3])) == 1
            assert alice.announced == ("127.0.0.1", alice.local_port)
        finally:
            await alice.close()


# A broken connection is asked again; a timeout is not: it waited its whole timeout already,
# and a connect() may be waiting for this probe.
@pytest.mark.parametrize(("exc", "attempts"), [
    (ConnectionResetError("closed the connection"), punchport.PROBE_ATTEMPTS),
    (TransactionTimeout("TCP connect timed out"), 1)], ids=["reset", "timeout"])
@pytest.mark.asyncio
async def test_start_fails_with_the_cause(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          exc: BaseException, attempts: int) -> None:
    probe_once, calls = failing_first(99, exc)
    monkeypatch.setattr(punchport, "probe_once", probe_once)
    async with Rendezvous(("127.0.0.1", 0)) as app:
        alice = Peer(app.address, name="alice", config_dir=tmp_path / "alice",
                     server_fingerprint=app.fingerprint)
        try:
            # named by step, its cause kept (StartTimeout for a timeout: exit code 4)
            failed = StartTimeout if isinstance(exc, TimeoutError) else StartFailed
            with pytest.raises(failed, match=f"at step 'announce' .*{exc}") as info:
                await alice.start()
            assert isinstance(info.value.__cause__, type(exc))
        finally:
            await alice.close()
    assert len(calls) == attempts
