"""A quota refusal (430) is final for the signaling client: at start it raises at once with a
message that says so, and a re-registration refused with 430 stops the client instead of
retrying with backoff for ever."""
from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from pyholepunch.errors import SignalingError
from pyholepunch.identity import Identity
from pyholepunch.signal.client import SignalClient
from pyholepunch.signal.protocol import ErrorCode
from pyholepunch.signal.server import ServerConfig, SignalServer
from pyholepunch.signal.store import NameLimits
from pyholepunch.signal.tls import generate_credentials

pytestmark = pytest.mark.timeout(30)

CREDS = generate_credentials()
OPEN = ServerConfig(sync_pings=2, keepalive=3600)
# No name may be bound: every registration of a name not yet known is over the quota.
FULL = replace(OPEN, names=NameLimits(per_key=0, per_source=0, exempt_loopback=False))


async def serve(cfg: ServerConfig, port: int = 0) -> SignalServer:
    srv = SignalServer(CREDS, None, cfg)
    await srv.start()
    await srv.listen("127.0.0.1", port)
    return srv


def client(srv: SignalServer, port: int) -> SignalClient:
    return SignalClient(("127.0.0.1", port), Identity.generate(), name="alice",
                        server_fingerprint=srv.server_id, backoff=(0.02, 0.05))


def port_of(srv: SignalServer) -> int:
    return int(srv._servers[0].sockets[0].getsockname()[1])


@pytest.mark.asyncio
async def test_start_refused_for_quota_says_it_is_final() -> None:
    srv = await serve(FULL)
    try:
        c = client(srv, port_of(srv))
        with pytest.raises(SignalingError, match="registration refused: .*430: a quota of "
                                                 "this server is used up.*not retried") as info:
            await c.start()
        assert info.value.code == ErrorCode.QUOTA_EXCEEDED
        await c.close()
        assert srv.metrics["refused"] == 1
    finally:
        await srv.close()


@pytest.mark.asyncio
async def test_reregistration_refused_for_quota_is_not_retried() -> None:
    srv = await serve(OPEN)
    port = port_of(srv)
    c = client(srv, port)
    await c.start()
    try:
        await srv.close()                   # the same identity and port, now with no room
        srv = await serve(FULL, port)
        loop = asyncio.get_running_loop()
        end = loop.time() + 10
        while c.failure is None:
            assert loop.time() < end, "the client neither stopped nor re-registered"
            await asyncio.sleep(0.02)
        assert isinstance(c.failure, SignalingError)
        assert c.failure.code == ErrorCode.QUOTA_EXCEEDED and "not retried" in str(c.failure)
        await asyncio.sleep(0.5)            # ten times the longest backoff: no second attempt
        assert srv.metrics["refused"] == 1 and c.registrations == 1
    finally:
        await c.close()
        await srv.close()
