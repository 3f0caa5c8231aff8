"""The built-in relay's wire protocol and its client (the hub is in ``builtin``).

On the server's one TCP port, recognised by its first four bytes:

    client -> hub   b"HPR1" + 16-byte token           (the token came over signaling)
               or   b"HPM1" + a token the client minted (``minted``: no rendezvous server)
    hub -> client   b"\\x00"                            both sides are here: bytes flow now
               or   status byte (1..255) + 1-byte length + ASCII reason, then close

A client must not send payload before it has read the OK byte.
"""
from __future__ import annotations

import asyncio
import contextlib

from ..address import Address
from ..errors import RelayError

MAGIC = b"HPR1"
TOKEN_LEN = 16
PREAMBLE_LEN = len(MAGIC) + TOKEN_LEN
OK = 0

# Status codes of a refusal; the reason text travels with it.
ERR_BAD_PREAMBLE, ERR_UNKNOWN, ERR_EXPIRED, ERR_REUSED, ERR_NO_PEER, ERR_CLOSING = 1, 2, 3, 4, 5, 6
ERR_EARLY_DATA, ERR_FULL = 7, 8
ERR_FORGED, ERR_NOT_MINTING, ERR_QUOTA, ERR_TOO_LONG = 9, 10, 11, 12
REASONS = {
    ERR_BAD_PREAMBLE: "bad preamble",
    ERR_UNKNOWN: "unknown token",
    ERR_EXPIRED: "expired token",
    ERR_REUSED: "token already used",
    ERR_NO_PEER: "peer did not arrive",
    ERR_CLOSING: "relay shutting down",
    ERR_EARLY_DATA: "data before pairing",
    ERR_FULL: "relay at capacity",
    ERR_FORGED: "bad token (not minted with this relay's secret)",
    ERR_NOT_MINTING: "this relay takes no minted tokens (it has no secret)",
    ERR_QUOTA: "relay quota reached",
    ERR_TOO_LONG: "token expires too far ahead",
}
# The same refusals as short fixed words: the relay's metrics count by these (a Prometheus
# label value), while a person reads the reason text.
LABELS = {
    ERR_BAD_PREAMBLE: "bad_preamble", ERR_UNKNOWN: "unknown_token", ERR_EXPIRED: "expired",
    ERR_REUSED: "reused", ERR_NO_PEER: "no_peer", ERR_CLOSING: "closing",
    ERR_EARLY_DATA: "early_data", ERR_FULL: "full", ERR_FORGED: "forged",
    ERR_NOT_MINTING: "not_minting", ERR_QUOTA: "quota", ERR_TOO_LONG: "too_long",
}


async def open_builtin_relay(
    server: Address, token: bytes, *, timeout: float = 30.0
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Join a relay session at ``server`` with ``token``; return streams once paired.

    ``timeout`` covers connecting and waiting for the peer. Raises RelayError naming the
    hub's reason (unknown/expired/reused token, peer did not arrive, unreachable, timeout).
    """
    if not isinstance(token, bytes) or len(token) != TOKEN_LEN:
        raise ValueError(f"relay token must be {TOKEN_LEN} bytes")
    return await join_relay(server, MAGIC + token, timeout=timeout)


async def join_relay(
    server: Address, preamble: bytes, *, timeout: float = 30.0
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """``open_builtin_relay`` with the whole ``preamble`` given (an issued or minted token)."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            try:
                reader, writer = await asyncio.open_connection(server[0], server[1])
            except OSError as exc:
                raise RelayError(f"relay {server[0]}:{server[1]} unreachable: {exc}") from exc
            writer.write(preamble)
            await writer.drain()
            status = await reader.read(1)
            if not status:
                raise RelayError(f"relay {server[0]}:{server[1]} closed the connection")
            if status[0] != OK:
                reason = REASONS.get(status[0], f"status {status[0]}")
                with contextlib.suppress(asyncio.IncompleteReadError, OSError):
                    length = (await reader.readexactly(1))[0]
                    reason = (await reader.readexactly(length)).decode("ascii", "replace")
                raise RelayError(f"relay refused: {reason}")
            return reader, writer
    except TimeoutError:
        if writer is not None:
            writer.close()
        raise RelayError(f"relay {server[0]}:{server[1]}: no pairing within {timeout} s") from None
    except BaseException:
        if writer is not None:
            writer.close()
        raise
