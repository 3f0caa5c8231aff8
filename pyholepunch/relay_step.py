"""Two peers through a TURN server (RFC 6062): the peer's ``--relay turn:HOST:PORT`` step.

The initiator holds the allocation: Allocate (TCP), CreatePermission for the responder's
public IPs (from PUNCH), then ``relay`` with ``relayed`` over signaling; the server forwards
it to the responder as RELAY_GRANT via "turn" and echoes it back as the acknowledgement. The
responder dials the relayed address with plain TCP, so it needs no TURN
credentials (nor even ``--relay turn``: any grant is honoured by what it says). Both return
asyncio streams for ``security.secure_stream``: end-to-end TLS runs on top, so the TURN server
only ever carries ciphertext.

The allocation must outlive the call: closing it would make coturn drop the data connection.
A small task keeps the TurnClient (control connection + refreshes) for exactly as long as the
data connection is open, and releases the allocation when it closes.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import replace

from .address import Address, parse_address
from .errors import AddressError, RelayError, SignalingError, TransactionError
from .relay.builtin import open_builtin_relay
from .relay.turn import TurnClient, TurnCredentials, accept_relayed, connect_relayed, offer_relayed
from .signal.client import PunchInstruction, RelayInstruction, SignalClient
from .strategy.candidates import family_name

log = logging.getLogger(__name__)

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]

_holders: set[asyncio.Task[None]] = set()

__all__ = ["active_allocations", "hold_allocation", "parse_turn_relay", "peer_turn_relay", "turn_credentials",
           "turn_relay"]


def parse_turn_relay(spec: str) -> Address:
    """``"turn:HOST:PORT"`` (IPv6 as ``turn:[::1]:PORT``) -> ``(host, port)``; AddressError
    (a ValueError) naming the expected form."""
    try:
        if not spec.startswith("turn:"):
            raise AddressError("no turn: scheme")
        return parse_address(spec[5:])
    except AddressError as exc:
        raise AddressError(f"a TURN relay is turn:HOST:PORT, got {spec!r} ({exc})") from None


def turn_credentials(user: str | None, password: str | None, secret: str | None, *,
                     now: float) -> TurnCredentials:
    """Long-term ``user``/``password``, or coturn ``use-auth-secret`` credentials made from
    ``secret`` (``user`` then names the holder, optional). ``now``: wall-clock seconds."""
    if secret:
        return TurnCredentials.from_shared_secret(secret, user or "", now=now)
    if user and password:
        return TurnCredentials(user, password)
    raise RelayError("the TURN relay needs credentials: turn_user and turn_password, "
                     "or turn_secret")


def active_allocations() -> int:
    """TURN allocations still held for open relayed connections (for tests and metrics)."""
    return len(_holders)


async def turn_relay(signal: SignalClient, session: str, *, initiator: bool,
                     turn_server: Address | None = None,
                     credentials: TurnCredentials | None = None,
                     peer_ips: list[str] | None = None,
                     grant: asyncio.Future[RelayInstruction] | None = None,
                     timeout: float = 10.0) -> Streams:
    """A byte stream to the session's other peer through a TURN relay (see module doc).

    Initiator: ``turn_server``, ``credentials`` and ``peer_ips`` (the responder's public
    addresses, all permitted) are required. Responder: ``grant`` resolves to the RELAY_GRANT
    the initiator caused; a built-in relay grant is joined too. Raises RelayError saying
    which stage failed (a TURN error response keeps its STUN code in the message: 401 wrong
    credentials, 441, 403...).
    """
    if initiator:
        if turn_server is None or credentials is None or not peer_ips:
            raise ValueError("the initiator needs turn_server, credentials and peer_ips")
        return await _offer_and_accept(signal, session, turn_server, credentials, peer_ips,
                                       timeout)
    if grant is None:
        raise ValueError("the responder needs the grant future")
    return await _join(grant, timeout)


async def peer_relay(signal: SignalClient, instr: PunchInstruction, *, initiator: bool, relay: str,
                     turn: tuple[str | None, str | None, str | None],
                     grants: dict[str, asyncio.Future[RelayInstruction]], server: Address,
                     timeout: float) -> Streams:
    """Streams to the peer through a relay. The initiator picks it (built-in: asks the server,
    which it reaches at ``server``; TURN: allocates and offers it); the responder joins
    whatever its grant names."""
    if initiator and not relay.startswith("turn:"):
        try:
            grant = await signal.request_relay(instr.session, timeout=timeout)
        finally:
            grants.pop(instr.session, None)
        grant = reachable_grant(grant, server)
        return await open_builtin_relay(grant.relay, grant.token, timeout=timeout)
    return await peer_turn_relay(signal, instr, initiator=initiator, relay=relay, turn=turn,
                                 grants=grants, timeout=timeout)


def reachable_grant(grant: RelayInstruction, server: Address) -> RelayInstruction:
    """A built-in relay grant names the server's address in the initiator's family; a peer of
    the other family joins it at ``server``, the address it signals through (the relay shares
    the server's port set in every family)."""
    if grant.via == "builtin" and family_name(grant.relay[0]) != family_name(server[0]):
        return replace(grant, relay=server)
    return grant


async def peer_turn_relay(signal: SignalClient, instr: PunchInstruction, *, initiator: bool,
                          relay: str, turn: tuple[str | None, str | None, str | None],
                          grants: dict[str, asyncio.Future[RelayInstruction]],
                          timeout: float) -> Streams:
    """``peer_relay`` for ``relay="turn:HOST:PORT"``; ``turn`` is (user, password, secret),
    ``grants`` the peer's per-session RELAY_GRANT futures (this session's is consumed)."""
    session = instr.session
    try:
        if not initiator:
            grant = grants.setdefault(session, asyncio.get_running_loop().create_future())
            return await turn_relay(signal, session, initiator=False, grant=grant,
                                    timeout=timeout)
        try:
            server = parse_turn_relay(relay)
        except ValueError as exc:
            raise RelayError(str(exc)) from None
        if not instr.peer.candidates:
            raise RelayError(f"no public address known for {instr.peer.name}: "
                             "nothing to permit on the TURN relay")
        return await turn_relay(signal, session, initiator=True, turn_server=server,
                                credentials=turn_credentials(*turn, now=time.time()),
                                peer_ips=[c.ip for c in instr.peer.candidates],
                                timeout=timeout)
    finally:
        grants.pop(session, None)


async def _offer_and_accept(signal: SignalClient, session: str, server: Address,
                            credentials: TurnCredentials, peer_ips: list[str],
                            timeout: float) -> Streams:
    where = f"TURN relay {server[0]}:{server[1]}"
    client = TurnClient(server, credentials, timeout=min(timeout, 10.0))
    stage = "allocation"
    try:
        async with asyncio.timeout(timeout):
            relayed = await offer_relayed(client, *peer_ips)
            stage = "offer"
            await signal.offer_relay(session, relayed, timeout=timeout)
            log.info("[%s] TURN allocation %s:%d offered to the peer (permitted %s)", session,
                     *relayed, ", ".join(peer_ips))
            stage = "accept"
            peer, (reader, writer) = await accept_relayed(client, timeout=timeout)
    except BaseException as exc:
        await _close_quietly(client)
        if isinstance(exc, RelayError):
            raise RelayError(f"{where}: {exc}") from exc
        if isinstance(exc, TransactionError):      # carries the STUN code (401, 441, 486...)
            raise RelayError(f"{where}: {exc}") from exc
        if isinstance(exc, (SignalingError, ConnectionError)):
            raise RelayError(f"{where}: the rendezvous server did not pass our relayed "
                             f"address on: {exc}") from exc
        if isinstance(exc, TimeoutError):
            what = ("the peer did not connect to our relayed address" if stage == "accept"
                    else f"{stage} did not complete")
            raise RelayError(f"{where}: {what} within {timeout:g} s") from exc
        raise
    log.info("[%s] peer %s:%d joined the TURN allocation", session, *peer)
    hold_allocation(client, writer, session)
    return reader, writer


def hold_allocation(client: TurnClient, writer: asyncio.StreamWriter, session: str) -> None:
    """Keep ``client``'s allocation (control connection + refreshes) for exactly as long as
    the relayed data connection of ``writer`` is open; release it when that closes."""
    task = asyncio.get_running_loop().create_task(_hold(client, writer, session))
    _holders.add(task)
    task.add_done_callback(_holders.discard)


async def _hold(client: TurnClient, writer: asyncio.StreamWriter, session: str) -> None:
    """Keep the allocation refreshed while the data connection lives; then release it."""
    try:
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    finally:
        log.debug("[%s] relayed connection closed: releasing the TURN allocation", session)
        await _close_quietly(client)


async def _close_quietly(client: TurnClient) -> None:
    try:
        await client.close()
    except Exception as exc:       # closing must not mask why we are closing
        log.debug("closing the TURN client: %s", exc)


async def _join(grant: asyncio.Future[RelayInstruction], timeout: float) -> Streams:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        instr = await asyncio.wait_for(asyncio.shield(grant), timeout)
    except TimeoutError:
        raise RelayError(f"the peer offered no relay within {timeout:g} s") from None
    left = max(0.1, deadline - loop.time())
    if instr.via == "turn":
        return await connect_relayed(instr.relay, timeout=left)
    return await open_builtin_relay(instr.relay, instr.token, timeout=left)
