"""Where the rendezvous server keeps state: the name directory, online peers, sessions, routing.

``MemoryStore`` serves one process (names persist to ``names.jsonl`` in the state directory
when one is given). ``RedisStore`` lets several server nodes share one directory: names in a
hash (HSETNX makes the first key win atomically), online peers and sessions as msgpack blobs
with a TTL, and pushes routed to the node holding the target through pub/sub on
``<prefix>:node:<node_id>``. Node clocks need not agree: a PUNCH's common start crosses
nodes in Redis's clock (TIME), which each node measures NTP-style against its own.
"""
from __future__ import annotations

import abc
import functools
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack  # type: ignore[import-untyped]

from ..errors import QuotaError
from .protocol import PEER_ID_RE

log = logging.getLogger(__name__)

Push = dict[str, Any]
PushHandler = Callable[[Push], Awaitable[bool]]   # True: delivered to a local peer
NAMES_FILE = "names.jsonl"
REFERENCE_SAMPLES = 5         # Redis TIME round trips per clock measurement
NAME_TTL = 90 * 86400.0       # a name its key has not registered for this long is free again
MAX_NAMES_PER_KEY = 16
MAX_NAMES_PER_SOURCE = 256    # names first bound from one source address (IPv4 or IPv6 /64)
SESSION_TTL = 300.0
PEER_ID_CACHE = 1 << 16       # public key -> peer_id results remembered (find by name)
# Redis connections one node keeps: a command waits for a free one (BlockingConnectionPool)
# instead of failing, so thousands of peers' concurrent requests share a few connections.
REDIS_CONNECTIONS = 32
REDIS_POOL_WAIT = 10.0        # seconds a command may wait for a free connection


@dataclass(frozen=True, slots=True)
class NameLimits:
    """How long a name binding lives unused, and how many one key or one address may hold."""

    ttl: float = NAME_TTL
    per_key: int = MAX_NAMES_PER_KEY
    per_source: int = MAX_NAMES_PER_SOURCE
    # Peers on the server's own host (its operator, the loopback demo and benches) are not
    # counted per source; tests standing in other hosts with 127.0.0.x turn this off.
    exempt_loopback: bool = True

    def counts_source(self, source: str) -> bool:
        return bool(source) and not (self.exempt_loopback and source.startswith("127."))


@dataclass(slots=True)
class PeerRecord:
    """An online peer, as every node needs to see it to coordinate a punch with it."""

    peer_id: str
    name: str
    public_key: bytes
    node: str
    cert: bytes | None = None
    candidates: list[Any] = field(default_factory=list)
    profiles: list[dict[str, Any]] = field(default_factory=list)
    offset: float = 0.0     # peer clock minus server clock
    rtt: float = 0.0
    spread: float = 0.0     # its round trips' spread (ClockEstimator.spread): PUNCH margin
    source: str = ""        # its address as admission counts it (never sent to other peers)

    def to_wire(self) -> dict[str, Any]:
        return {s: getattr(self, s) for s in self.__slots__}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> PeerRecord:
        return cls(**d)

    def peer_info(self, candidates: list[Any] | None = None,
                  profiles: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """The PUNCH ``peer`` map: what the other side needs to reach and authenticate us
        (``candidates``/``profiles``: this session's, instead of the registered ones)."""
        return {"peer_id": self.peer_id, "name": self.name, "public_key": self.public_key,
                "cert": self.cert,
                "candidates": [list(c) for c in (self.candidates if candidates is None
                                                 else candidates)],
                "profiles": self.profiles if profiles is None else profiles}


class Store(abc.ABC):
    """The seam between the signaling server and its shared state."""

    node_id: str

    @abc.abstractmethod
    async def start(self, node_id: str, on_push: PushHandler) -> None:
        """Begin delivering pushes addressed to ``node_id`` to ``on_push``."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def bind_name(self, name: str, public_key: bytes, source: str = "") -> bytes | None:
        """Bind ``name`` to ``public_key`` if free (or expired), refreshing its life; return
        the other key if it is taken. QuotaError when ``public_key`` or ``source`` (the
        registering address, ``admission.source_key``) already holds its limit of names."""

    @abc.abstractmethod
    async def put_online(self, record: PeerRecord) -> None: ...

    @abc.abstractmethod
    async def drop_online(self, peer_id: str, node: str) -> None:
        """Forget the peer, unless it has meanwhile registered on another node."""

    @abc.abstractmethod
    async def get_online(self, peer_id: str) -> PeerRecord | None: ...

    @abc.abstractmethod
    async def key_of(self, name: str) -> bytes | None: ...

    @abc.abstractmethod
    async def online_count(self) -> int: ...

    @abc.abstractmethod
    async def put_session(self, session: str, info: dict[str, Any]) -> bool:
        """Store a new session; False if the id is already in use."""

    @abc.abstractmethod
    async def get_session(self, session: str) -> dict[str, Any] | None: ...

    @abc.abstractmethod
    async def route(self, node: str, push: Push) -> bool:
        """Deliver ``push`` to the node holding its peer; False if that node is gone."""

    async def reference_offset(self, clock: Callable[[], float]) -> float:
        """The shared reference clock minus ``clock``: nodes exchange times (a PUNCH's common
        start) in the reference clock, so their own clocks need not agree. One node: its own
        clock is the reference (0)."""
        return 0.0

    async def find(self, target: str) -> PeerRecord | None:
        """An online peer by peer_id or by name."""
        if PEER_ID_RE.fullmatch(target):
            return await self.get_online(target)
        key = await self.key_of(target)
        return None if key is None else await self.get_online(cached_peer_id(key))


@dataclass(slots=True)
class _Binding:
    key: bytes
    source: str
    seen: float         # last registration under this name


class MemoryStore(Store):
    def __init__(self, state_dir: str | os.PathLike[str] | None = None, *,
                 max_sessions: int = 100_000, names: NameLimits | None = None,
                 session_ttl: float = SESSION_TTL,
                 clock: Callable[[], float] = time.time) -> None:
        self.node_id = ""
        self.limits = names or NameLimits()
        self._clock = clock
        self._names: dict[str, _Binding] = {}
        self._per_key: Counter[bytes] = Counter()
        self._per_source: Counter[str] = Counter()
        self._online: dict[str, PeerRecord] = {}
        self._sessions: dict[str, dict[str, Any]] = {}
        self._session_expiry: dict[str, float] = {}   # apart: an (expiry, info) tuple is GC-tracked
        self._max_sessions = max_sessions
        self._session_ttl = session_ttl
        self._on_push: PushHandler | None = None
        self._names_path = Path(state_dir) / NAMES_FILE if state_dir is not None else None
        self._names_file: Any = None
        if self._names_path is not None:
            self._load_names(self._names_path)

    def _load_names(self, path: Path) -> None:
        if not path.exists():
            return
        now = self._clock()
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            try:
                entry = json.loads(line)
                key = bytes.fromhex(entry["key"])
                seen = float(entry.get("seen", now))       # older files: no time, count from now
                source = str(entry.get("source", ""))
            except (ValueError, KeyError, TypeError, AttributeError):
                # A torn last line after a crash must not lose the other bindings.
                log.warning("%s:%d: skipping unreadable name binding", path, lineno)
                continue
            known = self._names.get(entry["name"])
            if known is None or (known.key == key or known.seen + self.limits.ttl < seen):
                self._set_binding(entry["name"], _Binding(key, source, seen))
        self._expire_names(now)

    def _set_binding(self, name: str, binding: _Binding) -> None:
        old = self._names.pop(name, None)
        if old is not None:
            self._uncount(old)
        self._names[name] = binding
        self._per_key[binding.key] += 1
        self._per_source[binding.source] += 1

    def _uncount(self, b: _Binding) -> None:
        _decrement(self._per_key, b.key)
        _decrement(self._per_source, b.source)

    def _expire_names(self, now: float) -> None:
        horizon = now - self.limits.ttl
        for name in [n for n, b in self._names.items() if b.seen < horizon]:
            self._uncount(self._names.pop(name))

    async def start(self, node_id: str, on_push: PushHandler) -> None:
        self.node_id, self._on_push = node_id, on_push
        if self._names_path is not None:
            self._names_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            # Rewritten compact at start (expired and superseded lines gone), then appended.
            tmp = self._names_path.with_suffix(".tmp")
            with open(tmp, "w") as f:
                for name, b in self._names.items():
                    f.write(self._line(name, b))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._names_path)
            self._names_file = open(self._names_path, "a")  # noqa: SIM115 - kept open for appends

    @staticmethod
    def _line(name: str, b: _Binding) -> str:
        return json.dumps({"name": name, "key": b.key.hex(), "source": b.source,
                           "seen": round(b.seen, 1)}) + "\n"

    async def close(self) -> None:
        if self._names_file is not None:
            self._names_file.close()
            self._names_file = None

    async def bind_name(self, name: str, public_key: bytes, source: str = "") -> bytes | None:
        now = self._clock()
        known = self._names.get(name)
        if known is not None and known.seen + self.limits.ttl < now:
            self._uncount(self._names.pop(name))      # expired: free for anyone
            known = None
        if known is not None:
            if known.key != public_key:
                return known.key
            # Refresh its life; on disk only when a noticeable part of it has passed.
            persist = now - known.seen > self.limits.ttl / 100
            known.seen = now
            if persist:
                self._persist(name, known)
            return None
        for _ in range(2):         # a bound hit: drop expired bindings once, then judge
            over_key = self._per_key[public_key] >= self.limits.per_key
            over_source = (self.limits.counts_source(source)
                           and self._per_source[source] >= self.limits.per_source)
            if not (over_key or over_source):
                break
            self._expire_names(now)
        else:
            raise QuotaError(f"this key already holds {self.limits.per_key} names" if over_key
                             else f"address {source} already bound {self.limits.per_source} names")
        binding = _Binding(public_key, source, now)
        self._set_binding(name, binding)
        self._persist(name, binding)
        return None

    def _persist(self, name: str, binding: _Binding) -> None:
        if self._names_file is not None:
            self._names_file.write(self._line(name, binding))
            self._names_file.flush()
            os.fsync(self._names_file.fileno())

    async def put_online(self, record: PeerRecord) -> None:
        self._online[record.peer_id] = record

    async def drop_online(self, peer_id: str, node: str) -> None:
        rec = self._online.get(peer_id)
        if rec is not None and rec.node == node:
            del self._online[peer_id]

    async def get_online(self, peer_id: str) -> PeerRecord | None:
        return self._online.get(peer_id)

    async def key_of(self, name: str) -> bytes | None:
        b = self._names.get(name)
        return None if b is None or b.seen + self.limits.ttl < self._clock() else b.key

    async def online_count(self) -> int:
        return len(self._online)

    async def put_session(self, session: str, info: dict[str, Any]) -> bool:
        now = self._clock()
        # Oldest first (dicts keep insertion order): expired ones, then over the count bound.
        while self._sessions:
            first = next(iter(self._sessions))
            if self._session_expiry[first] > now and len(self._sessions) < self._max_sessions:
                break
            del self._sessions[first], self._session_expiry[first]
        if session in self._sessions:
            return False
        self._sessions[session], self._session_expiry[session] = info, now + self._session_ttl
        return True

    async def get_session(self, session: str) -> dict[str, Any] | None:
        return self._sessions.get(session) if self._session_expiry.get(session, 0) > self._clock() else None

    async def route(self, node: str, push: Push) -> bool:
        if node != self.node_id or self._on_push is None:
            log.warning("push for unknown node %s dropped", node)
            return False
        return await self._on_push(push)


@functools.lru_cache(maxsize=PEER_ID_CACHE)
def cached_peer_id(public_key: bytes) -> str:
    """identity.peer_id_of, remembered: CONNECTs by name need it (set at registration)."""
    from ..identity import peer_id_of
    return peer_id_of(public_key)


def _decrement(counter: Counter[Any], key: Any) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]


def _pack(obj: Any) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, use_list=True)


class RedisStore(Store):
    """Shared state in Redis; pushes between nodes over pub/sub."""

    def __init__(self, url: str, *, prefix: str = "hp", online_ttl: float = 120.0,
                 session_ttl: float = SESSION_TTL, names: NameLimits | None = None) -> None:
        import redis.asyncio as aioredis  # optional dependency: imported only when used

        self.node_id = ""
        self.limits = names or NameLimits()
        # redis-py's default pool raises MaxConnectionsError past 100 commands in flight
        # (measured: ~20 % of CONNECTs failed with INTERNAL at 700/s over two nodes).
        self._redis = aioredis.Redis.from_pool(aioredis.BlockingConnectionPool.from_url(
            url, max_connections=REDIS_CONNECTIONS, timeout=REDIS_POOL_WAIT))
        self._prefix = prefix
        self._online_ttl = int(online_ttl * 1000)
        self._session_ttl = int(session_ttl * 1000)
        self._pubsub: Any = None
        self._listener: Any = None
        self.url = url

    def _k(self, *parts: str) -> str:
        return ":".join((self._prefix, *parts))

    async def start(self, node_id: str, on_push: PushHandler) -> None:
        import asyncio

        self.node_id = node_id
        await self._redis.ping()
        self._pubsub = self._redis.pubsub()
        await self._pubsub.subscribe(self._k("node", node_id))

        async def listen() -> None:
            async for msg in self._pubsub.listen():
                if msg.get("type") != "message":
                    continue
                try:
                    push = _unpack(msg["data"])
                except Exception:   # a foreign publisher on our channel must not kill routing
                    log.warning("unreadable push on %s dropped", msg.get("channel"))
                    continue
                try:
                    await on_push(push)
                except Exception:
                    log.exception("push handler failed")

        self._listener = asyncio.get_running_loop().create_task(listen())

    async def close(self) -> None:
        import asyncio
        import contextlib

        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._listener
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()
        await self._redis.aclose()

    async def bind_name(self, name: str, public_key: bytes, source: str = "") -> bytes | None:
        """One key per name (``<prefix>:name:<name>``, SET NX, its TTL the name's life,
        refreshed on each registration); per key and per source a sorted set of names
        scored by expiry counts the live ones."""
        ttl_ms = int(self.limits.ttl * 1000)
        name_key = self._k("name", name)
        known: Any = await self._redis.get(name_key)
        if known is not None:
            if bytes(known) != public_key:
                return bytes(known)
            await self._redis.pexpire(name_key, ttl_ms)
            await self._note_name(name, public_key, source)
            return None
        now = time.time()
        by_key, by_source = self._k("keynames", public_key.hex()), self._k("srcnames", source)
        for zkey, limit, what in ((by_key, self.limits.per_key, "this key"),
                                  (by_source, self.limits.per_source, f"address {source}")):
            if zkey == by_source and not self.limits.counts_source(source):
                continue
            await self._redis.zremrangebyscore(zkey, "-inf", now)
            if await self._redis.zcard(zkey) >= limit:
                raise QuotaError(f"{what} already holds {limit} names")
        if not await self._redis.set(name_key, public_key, nx=True, px=ttl_ms):
            known = await self._redis.get(name_key)
            if known is not None and bytes(known) != public_key:
                return bytes(known)
        await self._note_name(name, public_key, source)
        return None

    async def _note_name(self, name: str, public_key: bytes, source: str) -> None:
        expires = time.time() + self.limits.ttl
        ttl_ms = int(self.limits.ttl * 1000)
        for zkey in (self._k("keynames", public_key.hex()),
                     self._k("srcnames", source) if self.limits.counts_source(source) else None):
            if zkey is not None:
                await self._redis.zadd(zkey, {name: expires})
                await self._redis.pexpire(zkey, ttl_ms)

    async def put_online(self, record: PeerRecord) -> None:
        await self._redis.set(self._k("peer", record.peer_id), _pack(record.to_wire()),
                              px=self._online_ttl)

    async def drop_online(self, peer_id: str, node: str) -> None:
        rec = await self.get_online(peer_id)
        if rec is not None and rec.node == node:
            await self._redis.delete(self._k("peer", peer_id))

    async def get_online(self, peer_id: str) -> PeerRecord | None:
        data: Any = await self._redis.get(self._k("peer", peer_id))
        return None if data is None else PeerRecord.from_wire(_unpack(bytes(data)))

    async def key_of(self, name: str) -> bytes | None:
        value: Any = await self._redis.get(self._k("name", name))
        return bytes(value) if value is not None else None

    async def online_count(self) -> int:
        count = 0
        async for _ in self._redis.scan_iter(match=self._k("peer", "*"), count=1000):
            count += 1
        return count

    async def put_session(self, session: str, info: dict[str, Any]) -> bool:
        ok = await self._redis.set(self._k("session", session), _pack(info), nx=True,
                                   px=self._session_ttl)
        return bool(ok)

    async def get_session(self, session: str) -> dict[str, Any] | None:
        data: Any = await self._redis.get(self._k("session", session))
        return None if data is None else dict(_unpack(bytes(data)))

    async def reference_offset(self, clock: Callable[[], float]) -> float:
        """Redis's clock (TIME) is the reference: NTP-style, the sample with the least round
        trip of REFERENCE_SAMPLES."""
        best: tuple[float, float] | None = None
        for _ in range(REFERENCE_SAMPLES):
            t1 = clock()
            seconds, micros = await self._redis.time()
            t4 = clock()
            sample = (t4 - t1, seconds + micros / 1e6 - (t1 + t4) / 2)
            best = sample if best is None or sample < best else best
        assert best is not None
        return best[1]

    async def route(self, node: str, push: Push) -> bool:
        receivers = await self._redis.publish(self._k("node", node), _pack(push))
        if not receivers:
            log.warning("push for node %s reached no subscriber", node)
        return bool(receivers)


def open_store(spec: str | None, state_dir: str | os.PathLike[str] | None = None, *,
               names: NameLimits | None = None) -> Store:
    """``None``/``memory`` -> MemoryStore; ``redis://host:port[/db]`` -> RedisStore."""
    if spec in (None, "", "memory"):
        return MemoryStore(state_dir, names=names)
    if spec.startswith(("redis://", "rediss://", "unix://")):
        return RedisStore(spec, names=names)
    raise ValueError(f"unknown store {spec!r}: use memory or redis://HOST:PORT")
