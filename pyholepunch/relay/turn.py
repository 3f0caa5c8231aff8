"""asyncio TURN client for TCP allocations (RFC 6062) — a thin driver of turn_proto.

    async with TurnClient(("turn.example", 3478), TurnCredentials("u", "p")) as turn:
        relayed = await turn.allocate()                 # our relayed transport address
        await turn.create_permission("203.0.113.7")
        reader, writer = await turn.connect(("203.0.113.7", 4000))   # outgoing via the relay
        peer, reader, writer = await turn.accept()      # a peer connected to `relayed`

Each data connection is a fresh TCP connection to the server, bound with ConnectionBind; it
carries raw bytes afterwards and belongs to the caller. Speak first on an accepted
connection: coturn drops bytes a peer sends before the ConnectionBind completes (coturn issue
#495), so the plain-TCP side must wait to hear from the TURN side (e.g. make the TURN side
the TLS client, or send a ready byte). Closing a data connection is seen by the other end as
a reset, not a FIN: coturn does not forward half-closes. Failures: TransactionFailed (with the
STUN ``code``: 401 wrong credentials, 437 allocation mismatch, 447 peer unreachable, ...),
TransactionTimeout, RelayError (server unreachable, control connection lost, allocation
expired).
"""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import struct
from typing import Any

from ..address import Address
from ..errors import (
    ProtocolError,
    RelayError,
    TransactionFailed,
    TransactionTimeout,
)
from ..stun.codec import ERROR_REASONS, HEADER_SIZE, MAX_MESSAGE_SIZE, StunMessage
from ._sockio import recv_exactly
from .turn_proto import (
    DEFAULT_LIFETIME,
    Allocated,
    AllocationExpired,
    ConnectionAttempted,
    PeerConnected,
    PermissionCreated,
    Refreshed,
    RequestFailed,
    State,
    TurnClientProtocol,
    TurnCredentials,
)

log = logging.getLogger(__name__)

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]

MAX_PENDING_ATTEMPTS = 128
ATTEMPT_BIND_WINDOW = 30.0      # RFC 6062 §5.3: the server waits 30 s for the ConnectionBind

__all__ = ["TurnClient", "TurnCredentials", "accept_relayed", "connect_relayed", "offer_relayed"]


class TurnClient:
    """One TCP allocation on a TURN server; see the module docstring."""

    def __init__(self, server: Address, credentials: TurnCredentials, *,
                 lifetime: int = DEFAULT_LIFETIME, timeout: float = 10.0,
                 auto_refresh: bool = True, software: str | None = "pyholepunch") -> None:
        self.server = server
        self.timeout = timeout
        self.proto = TurnClientProtocol(credentials, lifetime=lifetime,
                                        transaction_timeout=timeout, auto_refresh=auto_refresh,
                                        software=software)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._read_task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._waiters: dict[bytes, asyncio.Future[Any]] = {}
        # (arrival time, attempt); bounded: unaccepted peers must not grow memory.
        self._attempts: asyncio.Queue[tuple[float, ConnectionAttempted]] = \
            asyncio.Queue(MAX_PENDING_ATTEMPTS)
        self._dead: RelayError | None = None
        self._dead_event = asyncio.Event()

    # --- public API ----------------------------------------------------------------------

    @property
    def relayed_address(self) -> Address:
        if self.proto.relayed is None:
            raise RelayError("no TURN allocation yet")
        return self.proto.relayed

    @property
    def mapped_address(self) -> Address | None:
        return self.proto.mapped

    async def allocate(self) -> Address:
        """Open the control connection and allocate a TCP relayed address."""
        if self._writer is None:
            try:
                self._reader, self._writer = await asyncio.wait_for(
                    asyncio.open_connection(*self.server), self.timeout)
            except (OSError, TimeoutError) as exc:
                raise RelayError(f"TURN server {self.server[0]}:{self.server[1]} "
                                 f"unreachable: {exc or 'timeout'}") from exc
            self._read_task = asyncio.ensure_future(self._read_loop())
        event = await self._call(self.proto.allocate(self._now()), "Allocate")
        assert isinstance(event, Allocated)
        log.info("TURN allocation on %s:%d: relayed %s:%d, lifetime %d s", *self.server,
                 *event.relayed, event.lifetime)
        return event.relayed

    async def create_permission(self, *peer_ips: str) -> None:
        """Let these peer IPs reach us (incoming) and be reached (Connect); kept refreshed."""
        event = await self._call(self._start(self.proto.create_permission, list(peer_ips)),
                                 "CreatePermission")
        assert isinstance(event, PermissionCreated)

    async def refresh(self, lifetime: int | None = None) -> int:
        event = await self._call(
            self._start(self.proto.refresh, self.proto.lifetime if lifetime is None else lifetime),
            "Refresh")
        assert isinstance(event, Refreshed)
        return event.lifetime

    async def connect(self, peer: Address) -> Streams:
        """Have the server connect to ``peer`` (needs a permission for its IP); return the
        bound data connection's streams."""
        return await _streams(await self.connect_socket(peer))

    async def connect_socket(self, peer: Address) -> socket.socket:
        """As ``connect`` but return the bound data connection as a non-blocking socket
        (for the engine's relay pump or a TLS layer of one's own)."""
        event = await self._call(self._start(self.proto.connect, peer), "Connect")
        assert isinstance(event, PeerConnected)
        return await self._bind(event.connection_id)

    async def accept(self, timeout: float | None = None) -> tuple[Address, Streams]:
        """Wait for a peer to connect to the relayed address; bind and return its streams."""
        peer, sock = await self.accept_socket(timeout)
        return peer, await _streams(sock)

    async def accept_socket(self, timeout: float | None = None) -> tuple[Address, socket.socket]:
        """As ``accept`` but return the bound data connection as a non-blocking socket."""
        self._check_alive()
        if self.proto.state is not State.ALLOCATED:
            raise RelayError(f"accept needs an allocation (state {self.proto.state.value})")
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            get = asyncio.ensure_future(self._attempts.get())
            dead = asyncio.ensure_future(self._dead_event.wait())
            left = None if deadline is None else max(0.0, deadline - loop.time())
            try:
                done, _ = await asyncio.wait({get, dead}, timeout=left,
                                             return_when=asyncio.FIRST_COMPLETED)
            finally:
                for f in (get, dead):
                    f.cancel()
            if get not in done or get.cancelled():
                self._check_alive()
                raise TimeoutError(
                    f"no peer connected to the TURN relayed address within {timeout} s")
            arrived, attempt = get.result()
            if loop.time() - arrived < ATTEMPT_BIND_WINDOW:
                return attempt.peer, await self._bind(attempt.connection_id)
            log.info("TURN: skipping connection attempt from %s:%d, too old to bind",
                     *attempt.peer)

    async def close(self) -> None:
        """Release the allocation (best effort, bounded) and close the control connection."""
        if self._writer is not None and self._dead is None \
                and self.proto.state is State.ALLOCATED:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._call(self._start(self.proto.refresh, 0), "Refresh"),
                                       min(self.timeout, 2.0))
        self._die(RelayError("TURN client closed"))
        if self._read_task is not None:
            self._read_task.cancel()
            await asyncio.gather(self._read_task, return_exceptions=True)
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()

    async def __aenter__(self) -> TurnClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- driver internals ----------------------------------------------------------------

    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()

    def _start(self, fn: Any, arg: Any) -> bytes:
        self._check_alive()
        try:
            return bytes(fn(arg, self._now()))
        except ProtocolError as exc:
            raise RelayError(str(exc)) from exc

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise self._dead
        if self._writer is None:
            raise RelayError("no TURN allocation yet: call allocate() first")

    async def _call(self, request_id: bytes, what: str) -> Any:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiters[request_id] = fut
        self._flush()
        try:
            event = await fut
        finally:
            self._waiters.pop(request_id, None)
        if isinstance(event, RequestFailed):
            if event.code is None:
                if "no response" in event.reason:
                    raise TransactionTimeout(f"TURN {what}: {event.reason}")
                raise RelayError(f"TURN {what} failed: {event.reason}")
            hint = {401: " (wrong credentials?)", 437: " (allocation gone)"}.get(event.code, "")
            raise TransactionFailed(
                f"TURN {what} failed: {event.code} {event.reason or ERROR_REASONS.get(event.code, '')}"
                f"{hint}", event.response, code=event.code)
        return event

    def _flush(self) -> None:
        data = self.proto.data_to_send()
        if data and self._writer is not None and not self._writer.is_closing():
            self._writer.write(data)
        self._dispatch()
        self._arm_timer()

    def _dispatch(self) -> None:
        while (event := self.proto.next_event()) is not None:
            if isinstance(event, ConnectionAttempted):
                log.info("TURN: peer %s:%d connecting (connection id %d)", *event.peer,
                         event.connection_id)
                try:
                    self._attempts.put_nowait((self._now(), event))
                except asyncio.QueueFull:
                    log.warning("TURN: %d connection attempts waiting, dropping one from %s:%d",
                                MAX_PENDING_ATTEMPTS, *event.peer)
            elif isinstance(event, AllocationExpired):
                log.warning("TURN allocation on %s:%d ended: %s", *self.server, event.reason)
                self._die(RelayError(f"TURN allocation ended: {event.reason}"))
            else:
                fut = self._waiters.get(event.request_id)
                if fut is not None and not fut.done():
                    fut.set_result(event)

    def _arm_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        when = self.proto.get_timer()
        if when is not None and self._dead is None:
            self._timer = asyncio.get_running_loop().call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.proto.handle_timer(self._now())
        self._flush()

    async def _read_loop(self) -> None:
        assert self._reader is not None
        reason = "TURN server closed the control connection"
        try:
            while True:
                data = await self._reader.read(65536)
                if not data:
                    break
                self.proto.receive_data(data, self._now())
                self._flush()
        except ProtocolError as exc:
            reason = f"TURN server sent bad bytes: {exc}"
        except OSError as exc:
            reason = f"TURN control connection failed: {exc}"
        self.proto.connection_lost(reason)
        self._flush()
        self._die(RelayError(reason))

    def _die(self, exc: RelayError) -> None:
        if self._dead is None:
            self._dead = exc
            self._dead_event.set()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(self._dead)

    async def _bind(self, connection_id: int) -> socket.socket:
        """Open a data connection and ConnectionBind it; one retry on a stale nonce."""
        loop = asyncio.get_running_loop()
        for attempt in range(2):
            tid, request = self.proto.connection_bind(connection_id)
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                try:
                    await asyncio.wait_for(loop.sock_connect(sock, self.server), self.timeout)
                except (OSError, TimeoutError) as exc:
                    raise RelayError(f"TURN data connection to {self.server[0]}:{self.server[1]} "
                                     f"failed: {exc or 'timeout'}") from exc
                try:
                    await loop.sock_sendall(sock, request)
                    response = await asyncio.wait_for(_read_message(loop, sock), self.timeout)
                except TimeoutError:
                    raise TransactionTimeout(
                        f"TURN ConnectionBind: no response within {self.timeout:g} s") from None
                except (OSError, ProtocolError) as exc:
                    raise RelayError(f"TURN ConnectionBind failed: {exc}") from exc
                failure = self.proto.connection_bind_result(tid, response)
            except BaseException:
                sock.close()
                raise
            if failure is None:
                return sock
            sock.close()
            if failure.code == 438 and attempt == 0:
                continue
            raise TransactionFailed(f"TURN ConnectionBind failed: {failure.code} {failure.reason}",
                                    failure.response, code=failure.code)
        raise AssertionError("unreachable")


# --- peer-to-peer over a TURN TCP allocation ------------------------------------------------
# One peer holds the allocation and accepts; the other dials the relayed address with plain
# TCP. The TURN side speaks first (one READY byte) because coturn drops what a peer sends
# before the ConnectionBind completes; the dialer waits for it before sending anything.

READY = b"\x01"


async def offer_relayed(client: TurnClient, *peer_ips: str) -> Address:
    """Allocate (if not yet) and permit every one of ``peer_ips`` of the allocation's address
    family in one CreatePermission (the peer may dial out from any of its public addresses);
    return the relayed address to hand to the peer through signaling."""
    if client.proto.state is State.IDLE:
        await client.allocate()
    relayed = client.relayed_address
    family = ipaddress.ip_address(relayed[0]).version
    usable = list(dict.fromkeys(ip for ip in peer_ips if ipaddress.ip_address(ip).version == family))
    if not usable:
        raise RelayError(f"none of the peer's addresses {', '.join(peer_ips) or '(none)'} is "
                         f"IPv{family} like the relayed address {relayed[0]}: nothing to permit")
    await client.create_permission(*usable)
    return relayed


async def accept_relayed(client: TurnClient, *, timeout: float = 30.0) -> tuple[Address, Streams]:
    """Accept the peer's connection on the relayed address and tell it to go ahead."""
    peer, (reader, writer) = await client.accept(timeout=timeout)
    try:
        writer.write(READY)
        await asyncio.wait_for(writer.drain(), timeout)
    except BaseException:
        writer.close()
        raise
    return peer, (reader, writer)


async def connect_relayed(relayed: Address, *, timeout: float = 30.0) -> Streams:
    """Dial a peer's TURN relayed address with plain TCP; return once the peer is bound."""
    def refused(how: str) -> RelayError:
        # coturn refuses a dialer without permission either at connect or right after it:
        # one cause, one message.
        return RelayError(f"cannot connect to TURN relayed address {relayed[0]}:{relayed[1]} "
                          f"({how}): no permission for our address, or the allocation is gone")

    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            try:
                reader, writer = await asyncio.open_connection(*relayed)
            except OSError as exc:
                raise refused(str(exc.strerror or exc)) from exc
            try:
                first = await reader.readexactly(1)
            except (asyncio.IncompleteReadError, OSError) as exc:
                raise refused("closed before the peer answered") from exc
            if first != READY:
                raise RelayError(f"unexpected first byte {first!r} from the TURN peer")
            return reader, writer
    except TimeoutError:
        if writer is not None:
            writer.close()
        raise RelayError(f"TURN peer at {relayed[0]}:{relayed[1]} did not answer "
                         f"within {timeout} s") from None
    except BaseException:
        if writer is not None:
            writer.close()
        raise


async def _recv_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    data = await recv_exactly(loop, sock, n)
    if len(data) < n:
        raise RelayError("TURN server closed the data connection during ConnectionBind")
    return data


async def _read_message(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> StunMessage:
    """Exactly one STUN message off the socket; not a byte more (the rest is payload)."""
    header = await _recv_exactly(loop, sock, HEADER_SIZE)
    length = struct.unpack_from("!H", header, 2)[0]
    if HEADER_SIZE + length > MAX_MESSAGE_SIZE or header[0] & 0xC0:
        raise RelayError("TURN server answered ConnectionBind with a non-STUN message")
    return StunMessage.parse(header + await _recv_exactly(loop, sock, length))


async def _streams(sock: socket.socket) -> Streams:
    try:
        return await asyncio.open_connection(sock=sock)
    except BaseException:
        sock.close()
        raise
