"""The relays of a ``Punch`` session (backend.py): which one two offers agree on, and how
each side joins it.

- ``relay="hp:HOST:PORT"`` with ``relay_secret``: the built-in relay of a ``pyholepunch serve
  --relay-secret SECRET`` run by the app's operator. No rendezvous server issues tokens: each
  side mints its own (relay/minted.py) for the session id both derive from the two offers'
  nonces, side 0 the initiator, side 1 the responder. Used when both offers say they can
  mint for a relay with the same secret (its key id); the relay pairs the two.
- ``relay="turn:HOST:PORT"`` with TURN credentials: the allocation of the side that has one
  (the initiator's, else the responder's); the other side dials its relayed address.

When both offers name a built-in relay with the same key id it is used (no allocation to
make); else a TURN allocation if either offer has one; else no relay.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from .address import Address, format_address, parse_address
from .errors import AddressError, RelayError
from .offer import Offer
from .relay.builtin_wire import join_relay
from .relay.minted import MINT_TTL, key_id, mint, secret_bytes
from .relay.turn import TurnClient, connect_relayed
from .relay_step import parse_turn_relay
from .security import Streams

log = logging.getLogger(__name__)

HUB_SCHEME = "hp:"
FORMS = ("turn:HOST:PORT (a TURN server) or hp:HOST:PORT (the built-in relay of "
         "`pyholepunch serve --relay-secret`)")
DIAL_RETRY = 0.2            # s between a responder's dials of the TURN relayed address


@dataclass(frozen=True)
class HubRelay:
    """Our built-in relay: where it listens and the secret we mint with."""

    address: Address
    secret: bytes

    @property
    def kid(self) -> bytes:
        return key_id(self.secret)

    @property
    def at(self) -> str:
        return format_address(self.address)


def parse_relay(relay: str | None, secret: str | bytes | None) -> HubRelay | None:
    """Check ``Punch``'s ``relay``/``relay_secret``: the built-in relay to mint for, or None
    (a TURN relay, or none). AddressError or ValueError naming the forms."""
    if relay is None:
        if secret is not None:
            raise ValueError("relay_secret is for relay='hp:HOST:PORT' (the built-in relay)")
        return None
    if not isinstance(relay, str):
        raise AddressError(f"a relay is {FORMS}, got {relay!r:.80}")
    if relay.startswith(HUB_SCHEME):
        try:
            address = parse_address(relay[len(HUB_SCHEME):])
        except AddressError as exc:
            raise AddressError(f"a relay is {FORMS}, got {relay!r:.80} ({exc})") from None
        if secret is None:
            raise ValueError(f"relay={relay!r:.80} needs relay_secret: the secret the relay "
                             "was started with (serve --relay-secret)")
        return HubRelay(address, secret_bytes(secret))
    if secret is not None:
        raise ValueError("relay_secret is for relay='hp:HOST:PORT' (the built-in relay), not "
                         f"{relay!r:.80}")
    try:
        parse_turn_relay(relay)
    except AddressError:
        raise AddressError(f"a relay is {FORMS}, got {relay!r:.80}") from None
    return None


def shared_hub(ours: HubRelay | None, initiator: Offer, responder: Offer,
               session: str) -> HubRelay | None:
    """Our built-in relay when both offers can mint for it with the same secret."""
    hubs = [o.hub for o in (initiator, responder)]
    if ours is None or hubs[0] is None or hubs[1] is None:
        if ours is not None or any(hubs):
            log.info("[%s] the built-in relay needs both sides to bring one (relay='hp:...'): "
                     "not used", session)
        return None
    if hubs[0][1] != hubs[1][1]:
        log.warning("[%s] the two sides' relay secrets differ (key ids %s / %s): the built-in "
                    "relay is not used", session, hubs[0][1].hex(), hubs[1][1].hex())
        return None
    if hubs[0][0] != hubs[1][0]:
        log.info("[%s] the two sides name the built-in relay %s and %s (same secret): each "
                 "joins the one it knows", session, hubs[0][0], hubs[1][0])
    return ours


async def join_hub(hub: HubRelay, session: bytes, initiator: bool, *, now: float,
                   timeout: float) -> Streams:
    """Streams to the peer through the built-in relay, with a token we mint now (``now``: our
    wall clock) for ``session`` and our side. RelayError names the relay's refusal."""
    preamble = mint(hub.secret, session, 0 if initiator else 1, now=now, ttl=MINT_TTL)
    try:
        return await join_relay(hub.address, preamble, timeout=timeout)
    except RelayError as exc:
        raise RelayError(f"built-in relay {hub.at}: {exc}") from exc


async def dial_relayed(relayed: Address, timeout: float) -> Streams:
    """The relay through the peer's TURN allocation: dial its relayed address until its
    permission is there (the peer creates it when its connect() begins)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await connect_relayed(relayed, timeout=max(0.1, deadline - time.monotonic()))
        except RelayError:
            if time.monotonic() + DIAL_RETRY >= deadline:
                raise
            await asyncio.sleep(DIAL_RETRY)


async def close_quietly(client: TurnClient) -> None:
    try:
        await client.close()
    except Exception as exc:       # closing must not mask why we are closing
        log.debug("closing the TURN client: %s", exc)
