"""The rendezvous server node: listeners, connection admission, routing between nodes.

One ``asyncio.Protocol`` per TLS connection (:mod:`.server_peer`, no task per idle peer, so
thousands of peers cost little). Policy lives there; framing and legal moves live in the
sans-IO layer. Shared state goes through a ``Store`` (memory or Redis).
"""
from __future__ import annotations

import asyncio
import functools
import logging
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import Refusal
from .admission import SourceBudget, source_key
from .auth import TokenBucket
from .plan import make_plan
from .protocol import DEFAULT_MAX_FRAME, ErrorCode, Message, Punch, encode_frame, parse_message
from .server_peer import PeerProtocol
from .store import MemoryStore, NameLimits, PeerRecord, Push, Store
from .tls import ServerCredentials
from .tlsproto import BufferedTls, TlsTransport

log = logging.getLogger(__name__)
REFERENCE_REFRESH = 30.0     # seconds between measurements of the store's reference clock
MAX_PUNCH_BUCKETS = 10_000   # per-target PUNCH limiters kept before idle ones are dropped


@dataclass
class ServerConfig:
    max_frame: int = DEFAULT_MAX_FRAME
    handshake_timeout: float = 10.0      # TLS + HELLO..REGISTERED
    idle_timeout: float = 75.0           # nothing heard from a peer for this long: drop it
    keepalive: float = 25.0              # server PING interval (refreshes RTT/offset)
    sync_pings: int = 5                  # ping/pong rounds before REGISTERED, at most;
    # fewer once sync_min_pings round trips came within sync_agree s of the best one (a lost
    # segment's retransmission adds >= 0.2 s, jitter less): a clean start costs 3 round
    # trips less, one loss 2 less, and the offset still comes from a clean sample (#19).
    sync_min_pings: int = 2
    sync_agree: float = 0.1
    max_peers: int = 100_000
    # Connections still in TLS/registration at once, in all and from one source address
    # (IPv4 or IPv6 /64): a stranger holds at most its share, never the whole budget.
    max_unregistered: int = 2048
    max_unregistered_per_source: int = 32
    rate: float = 50.0                   # messages/s per peer, sustained
    burst: float = 100.0
    # PUNCHes delivered to one target, whoever sends them (a victim is not flooded by many).
    punch_rate: float = 20.0
    punch_burst: float = 40.0
    max_rtt: float = 3.0                 # a ping round trip longer than this is no sample
    # Loopback candidates: None = accepted only from peers connected over loopback (the
    # server's own host: tests, the loopback demo); False/True = never/always.
    loopback_candidates: bool | None = None
    relays_per_peer: int = 4             # built-in relay sessions one peer may hold at once
    relays_per_source: int = 16          # ... and all peers of one source address together
    names: NameLimits = field(default_factory=NameLimits)
    # Added to the common start: absorbs delivery jitter (a PUNCH a few tens of ms late on a
    # busy path), so both peers still start on time; it costs as much connect time.
    margin: float = 0.01                 # the floor; plus the peers' RTT spread (common_start)
    token: str | None = None
    max_write_buffer: int = 1 << 20      # a peer that does not read is dropped


class SignalServer:
    def __init__(self, credentials: ServerCredentials, store: Store | None = None,
                 config: ServerConfig | None = None, *, relay_hub: Any = None,
                 clock: Callable[[], float] = time.time, node_id: str | None = None) -> None:
        self.credentials = credentials
        self.server_id = credentials.fingerprint
        self.ssl_context = credentials.ssl_context()
        self.config = config or ServerConfig()
        self.store = store or MemoryStore(names=self.config.names)
        # Its methods never wait: a peer's messages are handled at once in data_received, no
        # task each (eager.run_eager; a Redis store's need a task: asyncio.timeout).
        self.eager = type(self.store) is MemoryStore
        self.relay_hub = relay_hub
        self.clock = clock
        self.node_id = node_id or uuid.uuid4().hex[:12]
        self.peers: dict[str, PeerProtocol] = {}     # registered here, by peer_id
        # One factory shared by every connection (a lambda each would cost every peer ~400 B).
        self.peer_factory: Callable[[], PeerProtocol] = functools.partial(PeerProtocol, self)
        self.connections: set[PeerProtocol] = set()
        self.metrics: dict[str, int] = dict.fromkeys(
            ("registrations", "punches", "successes", "failures", "relayed", "relays",
             "turn_offers", "refused", "frames_in", "frames_out"), 0)
        # Who wants to hear about events the counters above cannot carry (metrics.py):
        # observer(event, fields) for "coordination", "result", "refused", "tls_failed".
        self.observers: list[Callable[[str, dict[str, Any]], None]] = []
        self._servers: list[asyncio.Server] = []
        self._tls: set[TlsTransport] = set()      # every live connection, registered or not
        self.unregistered = SourceBudget(self.config.max_unregistered,
                                         self.config.max_unregistered_per_source)
        self._unregistered: dict[TlsTransport, str] = {}   # connection -> its source key
        self._punch_buckets: dict[str, TokenBucket] = {}
        self.ended_connections = 0
        self.reference_offset = 0.0      # the store's reference clock minus ours
        self._reference_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.store.start(self.node_id, self._on_push)
        self.reference_offset = await self.store.reference_offset(self.clock)
        self._reference_task = asyncio.get_running_loop().create_task(self._follow_reference())

    async def _follow_reference(self) -> None:
        """Node clocks drift and step: re-measure the reference every REFERENCE_REFRESH s."""
        while True:
            await asyncio.sleep(REFERENCE_REFRESH)
            try:
                self.reference_offset = await self.store.reference_offset(self.clock)
            except Exception as exc:    # the store's own errors surface where it is used
                log.warning("could not measure the store's reference clock: %s", exc)

    async def listen(self, host: str = "127.0.0.1", port: int = 0) -> asyncio.Server:
        """A standalone TLS listener (serve.py instead demuxes one port and calls accept)."""
        server = await asyncio.get_running_loop().create_server(
            self.protocol_factory, host, port, backlog=4096)
        self._servers.append(server)
        return server

    async def accept(self, sock: socket.socket) -> None:
        """Take over an accepted TCP socket whose first byte said TLS."""
        await asyncio.get_running_loop().connect_accepted_socket(self.protocol_factory, sock)

    def protocol_factory(self) -> asyncio.Protocol:
        """TLS (our MemoryBIO layer, see tlsproto) carrying one PeerProtocol; admitted in
        ``connection_made`` against the unregistered budget of its source address."""
        return _AdmittedTls(self)

    def admit(self, tls: TlsTransport, peername: Any) -> bool:
        """Count a new connection against the unregistered budget until it registers."""
        source = source_key(str(peername[0])) if isinstance(peername, tuple) and peername else "?"
        if not self.unregistered.acquire(source):
            self.refuse("UNREGISTERED_LIMIT")   # a connection flood must not grow memory
            return False
        self._unregistered[tls] = source
        self._tls.add(tls)
        return True

    def registered(self, tls: TlsTransport | None) -> None:
        """Its peer has registered: the connection leaves the unregistered budget."""
        source = self._unregistered.pop(tls, None) if tls is not None else None
        if source is not None:
            self.unregistered.release(source)


    def punch_allowed(self, target_id: str) -> bool:
        """Per-target PUNCH rate: however many senders, a target gets at most punch_rate/s."""
        now = self.clock()
        bucket = self._punch_buckets.get(target_id)
        if bucket is None:
            if len(self._punch_buckets) >= MAX_PUNCH_BUCKETS:
                for key in [k for k, b in self._punch_buckets.items() if b.is_full(now)]:
                    del self._punch_buckets[key]
            bucket = TokenBucket(self.config.punch_rate, self.config.punch_burst, now)
            self._punch_buckets[target_id] = bucket
        return bucket.take(now)

    def _tls_lost(self, tls: TlsTransport) -> None:
        self.ended_connections += 1
        self._tls.discard(tls)
        self.registered(tls)
        ssl_object = tls.get_extra_info("ssl_object")
        if ssl_object is not None and ssl_object.version() is None:   # never got through
            self.emit("tls_failed")

    def emit(self, event: str, **fields: Any) -> None:
        """Tell the observers; an observer's bug never breaks the server."""
        for observer in self.observers:
            try:
                observer(event, fields)
            except Exception:
                log.exception("metrics observer failed on %s", event)

    def refuse(self, reason: str) -> None:
        """Count one refusal (``reason``: an ErrorCode name or another fixed word)."""
        self.metrics["refused"] += 1
        self.emit("refused", reason=reason)

    async def close(self) -> None:
        if self._reference_task is not None:
            self._reference_task.cancel()
        for server in self._servers:
            server.close()
        for proto in list(self.connections):
            proto.close()
        for tls in list(self._tls):
            tls.abort()
        for server in self._servers:
            await server.wait_closed()
        await self.store.close()

    def snapshot(self) -> dict[str, Any]:
        return {**self.metrics, "peers": len(self.peers), "connections": len(self.connections),
                "node": self.node_id}

    # -- routing ---------------------------------------------------------------------------
    async def push(self, record: PeerRecord, kind: str, msg: Message) -> bool:
        """Deliver ``msg`` to the peer's connection, here or on its node; False if that node is
        gone. To another node it travels as wire data, a PUNCH's common start in the store's
        reference clock (``_on_push`` converts it back).

        A message that cannot be framed raises LocalProtocolError here, to the caller acting
        for the SENDER: the recipient is never dropped for what another peer sent."""
        if record.node == self.node_id:      # framed once, by the recipient's connection
            proto = self.peers.get(record.peer_id)
            if proto is None:
                return False
            self._deliver(proto, msg, remote=False, strict=True)
            return True
        encode_frame(msg, self.config.max_frame)
        if isinstance(msg, Punch):
            msg = replace(msg, start_at=msg.start_at + self.reference_offset)
        push = {"kind": kind, "to": record.peer_id, "msg": msg.to_wire()}
        if await self.store.route(record.node, push):
            return True
        await self.store.drop_online(record.peer_id, record.node)   # its node died: forget it
        return False

    async def _on_push(self, push: Push) -> bool:
        proto = self.peers.get(push.get("to", ""))
        kind = push.get("kind")
        if proto is None:
            log.debug("push %s for %s: peer not here", kind, push.get("to"))
            return False
        if kind == "kick":
            if push.get("conn") != proto.conn_id:
                proto.fail(ErrorCode.REPLACED, "registered again elsewhere")
            return True
        msg = push["msg"]
        remote = isinstance(msg, dict)
        if remote:                      # from another node: checked like any network input
            msg = parse_message(msg)
        self._deliver(proto, msg, remote=remote, strict=False)
        return True

    def _deliver(self, proto: PeerProtocol, msg: Message, *, remote: bool, strict: bool) -> None:
        """Send a pushed message to a peer connected here. ``strict``: a message that cannot
        be framed raises LocalProtocolError (to the caller acting for the sender) and the
        recipient never hears of it; otherwise it is dropped with a warning."""
        if isinstance(msg, Punch):
            # The common start travels in this node's clock, or between nodes in the store's
            # reference clock; this node converts it into the receiving peer's clock.
            start = msg.start_at - self.reference_offset if remote else msg.start_at
            msg = _punch_at(msg, start + proto.clock.offset)
        if strict:
            proto.deliver(msg)
        else:
            proto.send(msg)


def _punch_at(msg: Punch, start_at: float) -> Punch:
    """``replace(msg, start_at=...)`` at half its cost (one per coordination, #18); every
    field is named, so a field added to Punch without adding it here fails its tests."""
    return Punch(session=msg.session, role=msg.role, start_at=start_at, peer=msg.peer,
                 plan=msg.plan, spread=msg.spread)


class _AdmittedTls(BufferedTls):
    """A TlsTransport that first asks the server's unregistered budget; refused: aborted
    before any TLS state exists (a connection flood must not grow memory)."""

    def __init__(self, server: SignalServer) -> None:
        # No on_lost callback: a bound method kept per connection is one more object the
        # collector tracks for every peer (#18); connection_lost below calls the server.
        super().__init__(server.ssl_context, server.peer_factory,
                         server.config.handshake_timeout)
        self._server: SignalServer | None = server      # None: refused, never counted

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert self._server is not None
        if not self._server.admit(self, transport.get_extra_info("peername")):
            self._server, self._closed = None, True
            transport.abort()  # type: ignore[attr-defined]
            return
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._server is not None:
            self._server._tls_lost(self)
        super().connection_lost(exc)
        # Unlinked from its PeerProtocol (which keeps its transport): the pair is freed by
        # reference counting as the peer leaves, not left to a full collection as cyclic
        # garbage (5,000 peers gone: 271 ms for the collection that freed them, #18).
        self._app = None


__all__ = ["PeerProtocol", "Refusal", "ServerConfig", "SignalServer", "make_plan"]
