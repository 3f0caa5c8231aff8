"""The built-in relay with tokens the two sides mint themselves (relay/minted.py), on
loopback: a pair relays; forged, expired, too long-lived, replayed and wrong-side tokens and
quotas are refused by name, and a refusal leaves nothing behind; ``serve`` routes them."""
from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pyholepunch import engine as engine_mod
from pyholepunch.errors import RelayError
from pyholepunch.relay.builtin import RelayHub, RelayServer
from pyholepunch.relay.builtin_wire import LABELS, REASONS, join_relay
from pyholepunch.relay.minted import mint, secret_bytes, session_key
from pyholepunch.serve import Rendezvous

from .helpers import closed, fds, settled

PURE = engine_mod.get("pure")     # these tests pump with the pure engine (the tokens are the point)

pytestmark = [pytest.mark.timeout(20), pytest.mark.asyncio]

SECRET = "operator-secret-0123456789"
KEY = secret_bytes(SECRET)


def _session(n: int = 0) -> bytes:
    return session_key((bytes([n]) * 16, b"\xff" * 16))


class Wall:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def _join(srv: RelayServer | Rendezvous, session: bytes, side: int, *, secret: bytes = KEY,
          now: float = 1_800_000_000.0, ttl: float = 60, timeout: float = 5) -> Any:
    """Join ``session`` as ``side`` with a token minted at ``now`` (the Wall's time)."""
    return join_relay(srv.address, mint(secret, session, side, now=now, ttl=ttl),
                      timeout=timeout)


def _empty(hub: RelayHub) -> bool:
    """No live session and no quota counted."""
    return not hub._owned and all(s.expires_at <= hub._clock() or not s.owners
                                  for s in hub._sessions.values())


async def test_two_minted_sides_pair_and_relay(make_server: Callable[..., Any]) -> None:
    before = fds()
    srv = await make_server(engine=PURE, secret=SECRET, wall=Wall())
    (ra, wa), (rb, wb) = await asyncio.gather(_join(srv, _session(), 0), _join(srv, _session(), 1))
    payload = os.urandom(100_000)
    wa.write(payload)
    await wa.drain()
    assert await asyncio.wait_for(rb.readexactly(len(payload)), 5) == payload
    wb.write(b"back")
    await wb.drain()
    assert await asyncio.wait_for(ra.readexactly(4), 5) == b"back"
    assert srv.hub._owned["minted"] == 1 and srv.hub._owned["source:127.0.0.1"] == 1
    await closed(wa, wb)
    for _ in range(100):
        if srv.hub.metrics.active_relays == 0:
            break
        await asyncio.sleep(0.02)
    assert srv.hub.metrics.relays_total == 1 and _empty(srv.hub)
    await srv.close()
    assert await settled(before) == set()


async def test_forged_expired_and_too_long_tokens_are_refused(
        make_server: Callable[..., Any]) -> None:
    wall = Wall()
    srv = await make_server(engine=PURE, secret=SECRET, wall=wall, minted_max_ttl=120)
    with pytest.raises(RelayError, match=r"bad token \(not minted with this relay's secret\)"):
        await _join(srv, _session(), 0, secret=secret_bytes("another-secret-0123456789"))
    with pytest.raises(RelayError, match="expired token"):
        await _join(srv, _session(), 0, now=wall.now - 61)
    with pytest.raises(RelayError, match="token expires too far ahead"):
        await _join(srv, _session(), 0, ttl=3600)
    # A clock 30 s off still gets in (the token lives 60 s) ...
    joined = asyncio.ensure_future(_join(srv, _session(), 0, now=wall.now - 30))
    # ... and none of the refused ones used up the session side it named, nor any quota.
    (ra, wa), (rb, wb) = await asyncio.gather(joined, _join(srv, _session(), 1))
    await closed(wa, wb)
    assert srv.hub.metrics.refused == {"forged": 1, "expired": 1, "too_long": 1}
    # counted by a short fixed word per status (a metrics label), never by the reason text
    assert set(LABELS) == set(REASONS)
    assert all(re.fullmatch(r"[a-z_]{1,16}", word) for word in LABELS.values())


async def test_replayed_and_wrong_side_tokens_are_refused(make_server: Callable[..., Any]) -> None:
    srv = await make_server(engine=PURE, secret=SECRET, wall=Wall(), pair_timeout=0.5)
    preamble = mint(KEY, _session(), 0, now=1_800_000_000.0)
    (ra, wa), (rb, wb) = await asyncio.gather(join_relay(srv.address, preamble, timeout=5),
                                              _join(srv, _session(), 1))
    # The same bytes replayed (an eavesdropper), or a fresh mint for a side already joined.
    with pytest.raises(RelayError, match="token already used"):
        await join_relay(srv.address, preamble, timeout=5)
    with pytest.raises(RelayError, match="token already used"):
        await _join(srv, _session(), 1, now=1_800_000_005.0)
    wa.write(b"untouched")                      # the live relay is not disturbed
    await wa.drain()
    assert await asyncio.wait_for(rb.readexactly(9), 5) == b"untouched"
    await closed(wa, wb)
    # Both sides claiming side 0: never a pair; the first waits in vain, the second is refused.
    first = asyncio.ensure_future(_join(srv, _session(1), 0))
    await asyncio.sleep(0.1)
    with pytest.raises(RelayError, match="token already used"):
        await _join(srv, _session(1), 0, now=1_800_000_001.0)
    with pytest.raises(RelayError, match="peer did not arrive"):
        await first
    # Tokens of two different sessions never pair either.
    results = await asyncio.gather(_join(srv, _session(2), 0), _join(srv, _session(3), 1),
                                   return_exceptions=True)
    assert all(isinstance(r, RelayError) and "peer did not arrive" in str(r) for r in results)
    assert srv.hub.metrics.relays_total == 1 and _empty(srv.hub)


async def test_quotas_count_minted_sessions_and_free_them(make_server: Callable[..., Any]) -> None:
    srv = await make_server(engine=PURE, secret=SECRET, wall=Wall(), minted_per_source=1, pair_timeout=5)
    waiting = asyncio.ensure_future(_join(srv, _session(0), 0, timeout=0.5))
    await asyncio.sleep(0.1)
    with pytest.raises(RelayError, match="relay quota reached"):
        await _join(srv, _session(1), 0)
    # The waiting side gives up (its own timeout): the session ends, its quota is free, and
    # its other side, coming late, hears that nobody is there to pair with.
    with pytest.raises(RelayError, match="no pairing within"):
        await waiting
    for _ in range(50):
        if _empty(srv.hub):
            break
        await asyncio.sleep(0.02)
    assert _empty(srv.hub)
    with pytest.raises(RelayError, match="peer did not arrive"):
        await _join(srv, _session(0), 1)
    a, b = await asyncio.gather(_join(srv, _session(1), 0), _join(srv, _session(1), 1))
    await closed(a[1], b[1])
    # In all: max_minted live sessions, whatever the source.
    srv2 = await make_server(engine=PURE, secret=SECRET, wall=Wall(), max_minted=1)
    held = asyncio.ensure_future(_join(srv2, _session(4), 0))
    await asyncio.sleep(0.1)
    with pytest.raises(RelayError, match="relay quota reached"):
        await _join(srv2, _session(5), 0)
    held.cancel()
    await asyncio.gather(held, return_exceptions=True)


async def test_a_hub_without_a_secret_takes_no_minted_tokens(
        make_server: Callable[..., Any]) -> None:
    srv = await make_server(engine=PURE)
    with pytest.raises(RelayError, match="takes no minted tokens"):
        await _join(srv, _session(), 0)
    with pytest.raises(ValueError, match="at least 16 bytes"):
        RelayHub(secret="short")
    # A truncated minted preamble: refused once the handshake time is up.
    srv2 = await make_server(engine=PURE, secret=SECRET, handshake_timeout=0.3)
    r, w = await asyncio.open_connection(*srv2.address)
    w.write(b"HPM1" + b"\x00" * 7)
    await w.drain()
    assert (await asyncio.wait_for(r.read(), 5))[2:] == b"bad preamble"
    await closed(w)


async def test_serve_routes_minted_tokens_to_its_hub(tmp_path: Path) -> None:
    async with Rendezvous(("127.0.0.1", 0), state_dir=str(tmp_path),
                          relay_options={"secret": SECRET}) as app:
        (ra, wa), (rb, wb) = await asyncio.gather(
            _join(app, _session(), 0, now=time.time()), _join(app, _session(), 1, now=time.time()))
        wa.write(b"through serve")
        await wa.drain()
        assert await asyncio.wait_for(rb.readexactly(13), 5) == b"through serve"
        await closed(wa, wb)
        assert app.demux["relay"] == 2
