"""``pyholepunch.Punch``: one punch session as a public API, signaling brought by the app.

::

    async with pyholepunch.Punch(stun="host:port") as punch:
        mine = await punch.offer()                     # the offerer: send it over your channel
        conn = await punch.connect(answer)             # the answer that came back

    async with pyholepunch.Punch(stun="host:port") as punch:
        answer = await punch.offer(reply_to=theirs)    # the answerer: reply to their offer
        conn = await punch.connect(theirs)

``start`` classifies our NAT against the app's STUN server (ours, coturn, any RFC 5389/5780
server) and keeps a punch port per address family. ``offer`` learns what that port maps to
now and returns the signed offer (offer.py). ``connect`` verifies the other side's offer and
derives everything from the two offers alone, identically on both sides: the roles (the
lower peer id initiates), the plan (strategy.plan_race over both offers' profiles and
candidates, restricted to the step kinds both offers allow), the start (offer_clock.py: an
answer's start, which the offerer converts into its own clock with the offset measured over
the offer/answer exchange itself — NTP's four timestamps — so the two wall clocks need not
agree; two offers made independently fall back to the later of their proposed starts, which
relies on NTP-synced clocks, and the report says so). Each offer proposes to start ``lead``
seconds after its creation: the app's channel must deliver within that. From there the
session runs the one punch path Peer runs too (session.py).

Relay (backend_relay.py): ``relay="hp:HOST:PORT"`` with ``relay_secret``: the built-in relay
of a ``pyholepunch serve --relay-secret`` run by the app's operator, each side minting its
own single-use token for the session (used when both offers bring it).
``relay="turn:HOST:PORT"`` with credentials allocates on the TURN server at ``offer()`` and
puts the relayed address into the offer; the session uses one allocation, the initiator's,
else the responder's: its owner permits the other side's addresses and accepts its
connection, the other side dials the relayed address with plain TCP (no credentials needed).
``relay=None``: no relay, and a pair without a direct path fails with PunchError (the report
in ``punch.last_report``).
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from . import engine as engine_mod
from ._service import Service
from .address import Address, ip_of, parse_address, route_source
from .backend_relay import close_quietly, dial_relayed, join_hub, parse_relay, shared_hub
from .connection import DEFAULT_KEEPALIVE, Connection, KeepAlive
from .errors import (
    AuthenticationError,
    HolePunchError,
    OfferError,
    RelayError,
    StaleOffer,
    StateError,
    StrategyError,
)
from .identity import Identity
from .nat.classify import classify_nat
from .nat.hops import nat_hops
from .nat.profile import Family, NatProfile
from .offer import MAX_AGE, Offer, encode_offer, parse_offer
from .offer_clock import agree_start
from .punch_sequential import AllocationTracker, sequential_side, tracker_for
from .punchport import PunchPort, candidates, classify_family, probe, reserve_port
from .relay.minted import session_key
from .relay.turn import TurnClient, accept_relayed, offer_relayed
from .relay_step import hold_allocation, parse_turn_relay, turn_credentials
from .report import ConnectionReport
from .security import Streams, certificate_for
from .session import JoinRelay, SessionEnd, check_strategies, punch_or_relay, restrict_plan
from .signal.protocol import NAME_RE
from .strategy import plan_race
from .strategy.candidates import FAMILIES, family_name

log = logging.getLogger(__name__)

DEFAULT_LEAD = 1.0          # s from an offer's creation to its proposed start
RELAY_TIMEOUT = 10.0
START_AHEAD = 0.1           # s before the agreed start the session (and its report) begins


class Punch(Service):
    """One side of an offer/answer punch session (see the module docstring)."""

    def __init__(self, stun: str | Address, *, identity: Identity | None = None,
                 relay: str | None = None, relay_secret: str | bytes | None = None,
                 name: str | None = None, turn_user: str | None = None, turn_password: str | None = None,
                 turn_secret: str | None = None, engine: str | engine_mod.Engine | None = None,
                 lead: float = DEFAULT_LEAD, max_age: float = MAX_AGE,
                 families: Sequence[str] | None = None, insecure_plain: bool = False,
                 keepalive: KeepAlive | None = DEFAULT_KEEPALIVE,
                 clock: Callable[[], float] = time.time) -> None:
        self.stun = parse_address(stun, default_port=3478)
        self.identity = identity or Identity.generate()
        self.name = name or f"peer-{self.identity.peer_id[:8]}"
        if not NAME_RE.fullmatch(self.name):
            raise ValueError(f"a name is 1-64 of A-Z a-z 0-9 . _ @ - (starting with a letter or "
                             f"digit), got {self.name!r:.70}")
        # AddressError / ValueError naming the forms; the built-in relay's secret, checked
        self._hub = parse_relay(relay, relay_secret)
        self.relay = relay
        self.turn = (turn_user, turn_password, turn_secret)
        self.engine = engine if isinstance(engine, engine_mod.Engine) else engine_mod.get(engine)
        if not 0 < lead <= 30:
            raise ValueError(f"lead is 0..30 s, got {lead}")
        self.lead, self.max_age, self.clock = lead, max_age, clock
        self.families = tuple(families) if families else FAMILIES
        if not self.families or any(f not in FAMILIES for f in self.families):
            raise ValueError(f"families must be among {', '.join(FAMILIES)}, got {families!r}")
        self.insecure_plain, self.keepalive = insecure_plain, keepalive
        self.cert = certificate_for(self.identity)
        self.family_profiles: dict[str, NatProfile] = {}   # TCP, per family
        self.ports: dict[str, PunchPort] = {}
        self.rtt: float | None = None
        self.nat_hops: int | None = None
        self.last_report: ConnectionReport | None = None
        self._primary = family_name(self.stun[0])
        # Loopback candidates only when everything is on this host (a STUN server on loopback).
        self._loopback = bool((ip := ip_of(self.stun[0])) and ip.is_loopback)
        self._tracker: AllocationTracker | None = None
        self._turn: TurnClient | None = None
        self._mine: bytes | None = None        # our latest offer, until a connect uses it
        # Nonces of the offers connected with -> their creation: a replay is refused; one
        # older than max_age is refused as stale anyway, and forgotten.
        self._used: dict[bytes, float] = {}
        self._fresh_port = False
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    @property
    def tcp_profile(self) -> NatProfile:
        return self.family_profiles.get(self._primary) or NatProfile()

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        if self._primary not in self.families:
            raise ValueError(f"the STUN server {self.stun[0]} is {self._primary} but families "
                             f"are {', '.join(self.families)}")
        local_ip = await asyncio.to_thread(route_source, self.stun[0])
        hops = asyncio.ensure_future(asyncio.to_thread(nat_hops, self.stun[0], local_ip=local_ip))
        try:
            profile = await classify_nat(self.stun, transport="tcp", local_ip=local_ip)
        except BaseException:
            hops.cancel()
            raise
        self.family_profiles[self._primary] = profile.evolve(family=Family(self._primary))
        self._tracker = tracker_for(self.tcp_profile)
        self.ports[self._primary] = PunchPort(self._primary, self.stun, local_ip)
        self.nat_hops = await hops
        await self._learn(self._primary, new_port=True)
        other = self.ports[self._primary].other_family
        fam = family_name(other[0]) if other else ""
        if other is not None and fam in self.families and \
                (found := await classify_family(other)) is not None:
            self.family_profiles[fam] = found[1]
            self.ports[fam] = PunchPort(fam, other, found[0])
            try:
                await self._learn(fam, new_port=True)
            except (OSError, HolePunchError) as exc:
                log.info("%s left out: no STUN answer for its punch port (%s)", fam, exc)
                self.ports.pop(fam).close()
                self.family_profiles.pop(fam, None)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._release_turn()
        for pp in self.ports.values():
            pp.close()

    async def _learn(self, family: str, *, new_port: bool) -> None:
        """STUN over TCP from ``family``'s punch port: what it maps to outside now (a fresh
        port first with ``new_port``: the one a session used may sit in TIME_WAIT)."""
        pp = self.ports[family]
        reservation = reserve_port(pp.local_ip) if new_port or pp.reservation is None else None
        port = reservation.getsockname()[1] if reservation is not None else pp.port
        t = time.time()
        try:
            result = await probe(pp.server, pp.local_ip, port)
        except BaseException:
            if reservation is not None:
                reservation.close()
            raise
        took = time.time() - t
        if family == self._primary:
            self.rtt = took / 2      # a TCP handshake and one Binding: about two round trips
            if self._tracker is not None:
                self._tracker.observe(t, result.mapped[1], announced=True, took=took)
        if reservation is not None:
            pp.close()
            pp.reservation, pp.port = reservation, port
        pp.announced = result.mapped
        pp.other_family = result.other_family or pp.other_family

    # -- the offer ---------------------------------------------------------------------------
    async def offer(self, *, strategies: Sequence[str] | None = None,
                    reply_to: bytes | None = None, received: float | None = None) -> bytes:
        """Our signed offer, to send to the other side over the app's channel.

        ``strategies``: the step kinds this side allows (see Peer.connect); the session uses
        the kinds both offers allow. ``reply_to``: the other side's offer, just received: ours
        is then its *answer* (it says when we got theirs), which lets both sides agree on the
        start whatever their clocks say (offer_clock.py); then ``connect(theirs)``. Call it as
        their offer arrives, or give ``received``: when it did, in ``self.clock()`` terms (the
        measurement counts any wait before as channel delay). Each offer is good for one
        ``connect``."""
        if received is None:
            received = self.clock()        # t2: when the app handed us their offer
        answering = self.check(reply_to) if reply_to is not None else None
        chosen = check_strategies(strategies)
        if not self.ports:
            raise StateError("Punch is not started (use `async with Punch(...)`)")
        for fam in list(self.ports):
            try:
                await self._learn(fam, new_port=self._fresh_port)
            except (OSError, HolePunchError):
                if fam == self._primary:
                    raise
                log.info("%s punch port: no STUN answer; offering the previous mapping", fam)
        self._fresh_port = False
        relayed = await self._allocate() if self.relay and self._hub is None else None
        created = self.clock()
        self._mine = encode_offer(
            self.identity, self.cert, name=self.name, created=created, start=created + self.lead,
            rtt=self.rtt or 0.0, profiles=self._profiles(), candidates=candidates(self.ports),
            strategies=chosen, relayed=relayed,
            reply_to=(answering.nonce, received) if answering is not None else None,
            hub=(self._hub.at, self._hub.kid) if self._hub is not None else None)
        return self._mine

    def _profiles(self) -> list[NatProfile]:
        return [self.family_profiles[f] for f in FAMILIES if f in self.family_profiles]

    def check(self, theirs: bytes) -> Offer:
        """The other side's offer, verified (OfferError, StaleOffer, AuthenticationError)."""
        offer = parse_offer(theirs, now=self.clock(), max_age=self.max_age,
                            allow_loopback=self._loopback)
        if offer.peer_id == self.peer_id:
            raise OfferError("that is our own offer (or one signed with our key)",
                             field="peer_id")
        if offer.nonce in self._used:
            raise StaleOffer(f"offer of peer {offer.peer_id} was used already: a replay",
                             field="nonce")
        return offer

    # -- connecting --------------------------------------------------------------------------
    async def connect(self, theirs: bytes, *, peer_id: str | None = None,
                      timeout: float = 15.0, received: float | None = None) -> Connection:
        """The connection to the sender of ``theirs`` (direct if possible, else through a
        relay: the built-in one both offers bring, or a TURN allocation of either side), TLS
        1.3 pinned to its certificate.

        ``peer_id``: refuse (AuthenticationError) an offer from anyone else — the app's
        channel may not be trusted to say who sent it. ``received``: when ``theirs`` arrived
        (``self.clock()`` terms; default now), as for ``offer``."""
        entered = self.clock() if received is None else received    # t4 for an answer
        if self._mine is None:
            raise StateError("call offer() first: connect() pairs our latest offer with theirs")
        t = self.check(theirs)
        if peer_id is not None and t.peer_id != peer_id:
            raise AuthenticationError(f"the offer is from peer {t.peer_id}, not {peer_id}")
        mine = parse_offer(self._mine, now=self.clock(), max_age=self.max_age,
                           allow_loopback=True)
        agreed = agree_start(mine, t, entered=entered)      # OfferError: a mismatched answer
        now = self.clock()
        self._used = {n: c for n, c in self._used.items() if now - c <= self.max_age}
        self._used[t.nonce] = t.created
        self._mine, self._fresh_port = None, True     # one session per offer
        role = "initiator" if mine.peer_id < t.peer_id else "responder"
        initiator, responder = (mine, t) if role == "initiator" else (t, mine)
        session = hashlib.sha256(b"".join(sorted((mine.nonce, t.nonce)))).hexdigest()[:16]
        report = ConnectionReport(role=role, started=time.time(), start_sync=agreed.to_dict())
        log.log(logging.INFO if agreed.method != "wall-clocks" else logging.WARNING,
                "[%s] start: %s", session, agreed.describe())
        report.local_nat = self.tcp_profile.to_dict()
        self.last_report = report
        try:
            with report.failing(f"connect to {t.name}", timeout):
                async with asyncio.timeout(timeout):
                    return await self._session(session, role, initiator, responder, t, report,
                                               agreed.start)
        finally:
            await self._release_turn()     # a held allocation lives on in its holder task

    async def _session(self, session: str, role: str, initiator: Offer, responder: Offer,
                       peer: Offer, report: ConnectionReport, start: float) -> Connection:
        both = [s for s in (initiator.strategies, responder.strategies) if s is not None]
        kinds = [k for k in both[0] if all(k in s for s in both)] if both else None
        if kinds is not None and not kinds:
            raise StrategyError(f"the two offers allow no step kind in common "
                                f"({', '.join(both[0])} / {', '.join(both[-1])})")
        # The relay: the built-in one when both bring it, else the initiator's TURN
        # allocation, else the responder's, else none.
        hub = shared_hub(self._hub, initiator, responder, session)
        holder = None if hub is not None else initiator if initiator.relayed is not None else \
            responder if responder.relayed is not None else None
        plan = plan_race(initiator.nat_profiles, responder.nat_profiles, initiator.candidates,
                         responder.candidates, rtt=max(initiator.rtt, responder.rtt, 0.01),
                         relay=hub is not None or holder is not None)
        plan = restrict_plan(plan, kinds, keep_slots=False)
        start_at = start - (self.clock() - time.time())        # into the engine's clock
        if start_at < time.time():
            log.warning("[%s] the agreed start passed %.3f s ago: the offers took longer than "
                        "lead=%g s to arrive; punching late", session, time.time() - start_at,
                        self.lead)
        join: JoinRelay | None = None
        if hub is not None:
            key = session_key((initiator.nonce, responder.nonce))

            def join(initiator: bool) -> Awaitable[Streams]:
                return join_hub(hub, key, initiator, now=self.clock(), timeout=RELAY_TIMEOUT)
        elif holder is not None and holder.relayed is not None:
            if holder is not peer:
                join = await self._permit(session, peer)
            else:
                relayed = holder.relayed

                def join(initiator: bool) -> Awaitable[Streams]:
                    return dial_relayed(relayed, RELAY_TIMEOUT)
        pp = self.ports[self._primary]
        end = SessionEnd(self.identity, self.engine, self.insecure_plain, self.keepalive,
                         rtt=self.rtt, nat_hops=self.nat_hops, sequential=sequential_side(
                             self._tracker, lambda: probe(pp.server, pp.local_ip, 0)))

        async def record(outcome: str, report: ConnectionReport) -> None:
            log.info("[%s] %s with %s: %s", session, role, peer.name, outcome)

        log.info("[%s] %s with %s (%s): %s", session, role, peer.name, peer.peer_id, plan.reason)
        # Wait for the agreed start here: the report (and the relay race's decision, which
        # counts from it) starts just before the punch does, as after a server's PUNCH.
        await asyncio.sleep(max(0.0, start_at - START_AHEAD - time.time()))
        report.started = time.time()
        return await punch_or_relay(
            end, plan=plan, role=role, start_at=start_at, peer=peer.peer_info(), report=report,
            ends={f: (p.local_ip, p.port) for f, p in self.ports.items()}, join_relay=join,
            record=record, spawn=self._spawn)

    # -- TURN ----------------------------------------------------------------------------------
    async def _allocate(self) -> Address:
        """Our TURN allocation's relayed address (allocated once per offer)."""
        assert self.relay is not None
        await self._release_turn()
        user, password, secret = self.turn
        client = TurnClient(parse_turn_relay(self.relay),
                            turn_credentials(user, password, secret, now=time.time()),
                            timeout=RELAY_TIMEOUT)
        try:
            relayed = await client.allocate()
        except BaseException:
            await close_quietly(client)
            raise
        self._turn = client
        return relayed

    async def _permit(self, session: str, peer: Offer) -> Callable[[bool], Any]:
        """The relay through our allocation: permit the peer's addresses on it now (the peer
        dials when its relay step comes); joining accepts its connection, whose holder task
        then keeps the allocation (else connect() releases it at the end)."""
        client = self._turn
        if client is None:
            raise RelayError("our TURN allocation is gone (offer() again)")
        await offer_relayed(client, *[c.ip for c in peer.candidates])

        async def join(initiator: bool) -> Streams:
            _peer, (reader, writer) = await accept_relayed(client, timeout=RELAY_TIMEOUT)
            if self._turn is client:
                self._turn = None
            hold_allocation(client, writer, session)
            return reader, writer
        return join

    async def _release_turn(self) -> None:
        client, self._turn = self._turn, None
        if client is not None:
            await close_quietly(client)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

