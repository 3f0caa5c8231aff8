"""The I/O half of NAT classification: run the probes, fill ``Observations``.

The verdict (nat/classify.py ``build_profile``) never sees a socket; this module never
decides a NAT type. Rounds are ordered so that only the allocation probes create new
mappings while they run (a sequential allocator must show its real delta). TCP here; UDP's
probes are in nat/probe_udp.py.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..address import Address, route_source
from ..errors import ProtocolError, TransactionFailed, TransactionTimeout
from ..stun.client import (
    CONNECT_REARM,
    BindingResult,
    StunTcpConnection,
    format_address,
    new_transaction_id,
    reusable_socket,
    silence_rearm,
)
from ..stun.codec import (
    AttrType,
    ChangeRequest,
    ConnectBack,
    ErrorCode,
    MessageClass,
    StreamFramer,
    StunMessage,
    binding_request,
)

if TYPE_CHECKING:
    from .classify import Observations

log = logging.getLogger(__name__)

CHANGE_BOTH = ChangeRequest(True, True)
CHANGE_PORT = ChangeRequest(False, True)
SERVER_CONNECT_BACK_TIMEOUT = 0.6   # our server's default; the client waits a bit longer
REPORT_LOSS = 1.25      # s: a lost change request or report, twice (TCP's RTO 0.25 s, then 0.5 s)


def _waits(rtt: float) -> tuple[float, float]:
    """(retransmission timeout, how long silence must last to count as 'blocked')."""
    return max(0.1, 2 * rtt), max(0.4, 6 * rtt)


async def _gather(*aws: Any) -> list[Any]:
    return list(await asyncio.gather(*aws, return_exceptions=True))


def _changed_expected(obs: Observations, change: ChangeRequest) -> Address | None:
    other = obs.other_address
    if other is None:
        return None
    host = other[0] if change.change_ip else obs.server[0]
    port = other[1] if change.change_port else obs.server[1]
    return (host, port)


# --- TCP -------------------------------------------------------------------------------

class _ConnectBackCatcher:
    """Accepts the server's connect-backs on the filtering port and matches transaction ids."""

    def __init__(self) -> None:
        self.answers: dict[bytes, tuple[StunMessage, Address]] = {}
        self.event = asyncio.Event()
        self.peers: list[str] = []     # the IP of every connection accepted (hairpin: ours)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        self.peers.append(peer[0])
        framer = StreamFramer()
        try:
            while True:
                data = await asyncio.wait_for(reader.read(4096), 2.0)
                if not data:
                    return
                for frame in framer.feed(data):
                    msg = StunMessage.parse(frame)
                    self.answers[msg.transaction_id] = (msg, (peer[0], peer[1]))
                    self.event.set()
                    return
        except (TimeoutError, OSError, ProtocolError):
            return
        finally:
            writer.close()


def _listener(local: Address) -> socket.socket:
    sock = reusable_socket(local)
    sock.listen(16)
    return sock


@dataclass(frozen=True, slots=True)
class _Rearm:
    """How the probes' connects re-send a lost SYN once the RTT is measured: after ~3 RTTs,
    then a little later each time (stun.client.connect_rearming). A lost SYN-ACK needs two
    fresh SYNs (the first one's only meets the server's half-open connection and clears
    it), so the kernel's 1 s or a doubling schedule cost ~0.8 s each, and a phase waits for
    its slowest probe."""

    rearm: float = CONNECT_REARM
    growth: float = 2.0

    @classmethod
    def measured(cls, rtt: float) -> _Rearm:
        return cls(silence_rearm(rtt), 1.25)


async def _tcp_binding(server: Address, local: Address, timeout: float,
                       rearm: _Rearm = _Rearm()) -> BindingResult:
    conn = await StunTcpConnection.open(server, local=local, connect_timeout=timeout,
                                        rearm=rearm.rearm, growth=rearm.growth)
    async with conn:
        return await conn.binding(timeout=timeout)


def _rtt(samples: list[float]) -> float:
    """An RTT from a few round trips of the first round: the median, so one stretched by a
    lost segment (TCP's retransmission, ~0.25 s) does not make every later wait 6 x longer."""
    good = sorted(x for x in samples if x > 0)
    return statistics.median(good) if len(good) >= 3 else good[0]


async def probe_tcp(obs: Observations, *, local_ip: str | None, timeout: float,
                    allocation_probes: int, on_mapped: Callable[[], None] | None = None) -> None:
    ip = local_ip or route_source(obs.server[0])
    obs.local_ip = ip
    catcher = _ConnectBackCatcher()
    listening: list[socket.socket] = []     # ports the filtering connection may take
    servers: list[asyncio.Server] = []      # the one it took: the connect-backs come there
    loop = asyncio.get_running_loop()
    conns: list[StunTcpConnection] = []
    rtt_known: asyncio.Future[float] = loop.create_future()
    filtered: asyncio.Future[Address | None] = loop.create_future()
    # The filtering test asks as soon as its connection is up: the server's connect-back
    # wait (0.6 s on a filtering NAT, whatever the loss) is the classification's floor.
    shook: asyncio.Future[float] = loop.create_future()   # the first handshake's RTT
    filter_task = asyncio.ensure_future(
        _tcp_filtering(obs, ip, catcher, timeout, rtt_known, filtered, conns, shook,
                       (listening, servers)))
    hairpin: asyncio.Future[None] | None = None
    samples: list[float] = []

    async def allocate() -> list[BindingResult]:
        # The allocation run rides along the first round, once a first handshake measured
        # the RTT (a lost SYN-ACK needs two fresh SYNs: at 0.25 s and 0.5 s without it):
        # every mapping made meanwhile is a fresh port's to the primary address (a round of
        # its own after the mapping probes was one more wait for the slowest of five).
        rearm = _Rearm.measured(await asyncio.shield(shook))
        return await _tcp_allocation(obs, ip, allocation_probes, timeout, rearm, samples=samples)

    allocation = asyncio.ensure_future(allocate())
    allocated: list[BindingResult] = []
    try:
        # any port will do: a lost SYN-ACK costs a fresh port's SYN, not two on this one
        a = (await _gather(StunTcpConnection.open(
            obs.server, connect_timeout=timeout, new_socket=lambda: reusable_socket((ip, 0)))))[0]
        if isinstance(a, StunTcpConnection) and not shook.done():
            shook.set_result(a.handshake_rtt)
        if not isinstance(a, StunTcpConnection):
            what = ("connection refused" if isinstance(a, ConnectionRefusedError) else
                    "no answer to the TCP handshake" if isinstance(a, TransactionTimeout) else str(a))
            obs.error = f"cannot reach {format_address(obs.server)} over TCP: {what}"
            return
        conns.append(a)
        obs.allocation_rearms += a.rearms
        try:
            r1 = await a.binding(timeout=timeout)
        except ConnectionError as exc:
            # A broken first connection (seen under loss: re-sent SYNs on one port can leave
            # the two ends disagreeing) is not the server's answer: once more, a fresh port.
            # (Bytes that are not STUN are an answer: a server of another kind, said at once.)
            log.debug("TCP classification: the first connection broke (%r): a fresh one", exc)
            obs.allocation_rearms += 1     # a mapping of its own, maybe among the allocation run's
            try:
                a = await StunTcpConnection.open(obs.server, local=(ip, 0), connect_timeout=timeout)
                conns.append(a)
                r1 = await a.binding(timeout=timeout)
            except (TransactionTimeout, TransactionFailed, OSError, ProtocolError) as exc2:
                obs.error = f"no STUN answer over TCP from {format_address(obs.server)}: {exc2}"
                return
        except (TransactionTimeout, TransactionFailed, OSError, ProtocolError) as exc:
            obs.error = f"no STUN answer over TCP from {format_address(obs.server)}: {exc}"
            return
        p1 = a.local
        obs.mapping_local = p1
        obs.mapped_primary, obs.other_address = r1.mapped, r1.other_address
        # The hairpin's connect takes a mapping of a fresh port: it goes once the filtering
        # port's mapping is known (its wait for silence, 0.4 s at least, was a round of its
        # own), maybe among the allocation run's mappings: one more it tolerates.
        first_rtt = _rtt([a.handshake_rtt, r1.rtt])
        _, hairpin_wait = _waits(first_rtt)
        hairpin_sent = asyncio.Event()
        hairpin = asyncio.ensure_future(_tcp_hairpin(
            obs, ip, catcher, hairpin_wait, filtered, max(2.5, 6 * first_rtt) + hairpin_wait,
            hairpin_sent))
        if not allocation.done():
            obs.allocation_rearms += 1
        allocated = await allocation
        obs.rtt = _rtt([a.handshake_rtt, r1.rtt, *samples])
        rtt_known.set_result(obs.rtt)
        _, wait = _waits(obs.rtt)
        step = max(2.5, 6 * obs.rtt) + wait    # room for one SYN retransmission (1 s) and more
        rearm = _Rearm.measured(obs.rtt)

        # mapping: same local port, other destinations (after the allocation run: on a
        # symmetric NAT each takes a new mapping)
        if obs.other_address is not None:
            bases = [(p1, r1.mapped), *((r.local, r.mapped) for r in allocated[:1])]
            await _tcp_mapping(obs, bases, step, rearm)
        elif obs.alt_server is not None:
            m2 = (await _gather(_tcp_binding(obs.alt_server, p1, timeout, rearm)))[0]
            obs.mapped_alt_server = m2.mapped if isinstance(m2, BindingResult) else None
        await hairpin_sent.wait()
        if on_mapped is not None:     # only the hairpin's and the filtering test's waits are left
            on_mapped()
        await hairpin
        await filter_task
    finally:
        for task in (filter_task, hairpin, allocation):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        for c in conns:
            await c.close()
        for sock in listening:
            sock.close()
        for srv in servers:
            srv.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(srv.wait_closed(), 1.0)


async def _tcp_filtering(obs: Observations, ip: str, catcher: _ConnectBackCatcher,
                         timeout: float, rtt_known: asyncio.Future[float],
                         mapped: asyncio.Future[Address | None],
                         conns: list[StunTcpConnection], shook: asyncio.Future[float],
                         ports: tuple[list[socket.socket], list[asyncio.Server]]) -> None:
    """The filtering tests from a port of ours that listens (``ports``: the listening
    sockets tried, and the server on the one taken); ``mapped`` gets its mapping (None if
    none). Its connection races fresh ports, as the first one's does.

    The binding and both change requests leave together once connected; how long to wait
    for the connect-backs and reports is known once the RTT is (``rtt_known``), and so is
    the server's OTHER-ADDRESS, which a connect-back must come from."""
    from .classify import Outcome
    listening, servers = ports

    def new_socket() -> socket.socket:
        listening.append(_listener((ip, 0)))
        return reusable_socket(listening[-1].getsockname()[:2])

    try:
        conn = await StunTcpConnection.open(obs.server, connect_timeout=timeout,
                                            new_socket=new_socket)
    except (TransactionTimeout, OSError) as exc:
        obs.notes.append(f"filtering: the filtering connection failed ({exc!r})")
        mapped.set_result(None)
        return
    conns.append(conn)
    taken = next(s for s in listening if s.getsockname()[1] == conn.local[1])
    listening.remove(taken)
    try:
        servers.append(await asyncio.start_server(catcher.handle, sock=taken))
    except BaseException:
        taken.close()
        raise
    while listening:        # the other attempts' ports
        listening.pop().close()
    if not shook.done():
        shook.set_result(conn.handshake_rtt)
    obs.filter_local = conn.local
    obs.allocation_rearms += conn.rearms
    binding = binding_request(new_transaction_id())
    conn.send(binding)
    probes = {}
    for change, probe in ((CHANGE_BOTH, obs.filter_both), (CHANGE_PORT, obs.filter_port)):
        req = binding_request(new_transaction_id(), change=change)
        probes[req.transaction_id] = (change, probe)
        conn.send(req)
    sent = time.monotonic()
    # until the RTT is known: the first contact's bound (TCP's own retransmission may be
    # needed), then the server's budget, our patience for silence, and TCP's
    # retransmissions (RTO >= 0.2 s, doubling) of a lost request or report
    deadline = sent + timeout + SERVER_CONNECT_BACK_TIMEOUT + REPORT_LOSS
    pending = dict(probes)

    def read_one(msg: StunMessage) -> None:
        if msg.transaction_id == binding.transaction_id:
            if msg.cls is MessageClass.SUCCESS and msg.mapped_address is not None:
                obs.mapped_filter = msg.mapped_address
            if not mapped.done():
                mapped.set_result(obs.mapped_filter)
            return
        entry = pending.get(msg.transaction_id)
        if entry is None or msg.cls is MessageClass.REQUEST:
            return
        change, probe = entry
        err = msg.error
        if msg.cls is MessageClass.SUCCESS:
            probe.outcome, probe.detail = Outcome.INVALID, "server answered on the same connection"
        elif err and err.code in (ErrorCode.UNKNOWN_ATTRIBUTE, ErrorCode.BAD_REQUEST) and \
                AttrType.CONNECT_BACK_RESULT not in msg:
            # 420: no alternate address; 400: e.g. coturn, "applicable only to UDP"
            probe.outcome = Outcome.UNSUPPORTED
            probe.detail = f"server answered {err.code} {err.reason.rstrip(chr(0))}".strip()
        elif msg.get(AttrType.CONNECT_BACK_RESULT) in (ConnectBack.REFUSED, ConnectBack.TIMEOUT,
                                                        ConnectBack.UNREACHABLE):
            probe.outcome = Outcome.BLOCKED
            probe.connect_back = msg.get(AttrType.CONNECT_BACK_RESULT)
        else:
            probe.outcome = Outcome.INVALID
            text = f"server error {err.code} {err.reason}" if err else "unexpected answer"
            probe.detail = text.rstrip("\0 ")
        pending.pop(msg.transaction_id, None)

    async def read_reports() -> None:
        while pending or not mapped.done():
            read_one(await conn.read_message(deadline - time.monotonic()))

    reports = asyncio.ensure_future(read_reports())
    try:
        await conn.writer.drain()
        while (pending or not mapped.done()) and time.monotonic() < deadline:
            if reports.done() and not mapped.done():     # the connection broke
                mapped.set_result(None)
            if rtt_known.done():
                if deadline > sent + timeout:      # once: the RTT's deadline
                    _, wait = _waits(rtt_known.result())
                    deadline = sent + SERVER_CONNECT_BACK_TIMEOUT + wait \
                        + 2 * rtt_known.result() + REPORT_LOSS
                for tid in [t for t in pending if t in catcher.answers]:
                    change, probe = pending.pop(tid)
                    peer = catcher.answers[tid][1]
                    expected = _changed_expected(obs, change)
                    if expected is not None and peer != expected:
                        probe.outcome, probe.detail = Outcome.INVALID, f"connect-back came from {peer}"
                    else:
                        probe.outcome = Outcome.PASSED
            catcher.event.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(catcher.event.wait(), 0.02)
    finally:
        reports.cancel()
        with contextlib.suppress(BaseException):
            await reports
        if not mapped.done():
            mapped.set_result(None)
    if obs.mapped_filter is None:
        obs.notes.append("filtering: no answer to the binding on the filtering connection")
    for _, probe in pending.values():
        probe.outcome = Outcome.NOT_RUN
        probe.detail = f"no connect-back and no report in {deadline - sent:.2f} s"


async def _tcp_allocation(obs: Observations, ip: str, count: int, timeout: float,
                          rearm: _Rearm = _Rearm(), *,
                          samples: list[float] | None = None) -> list[BindingResult]:
    """``count`` fresh ports' mappings, in send order (the answers are returned); their
    round trips go to ``samples``."""
    async def one(delay: float) -> BindingResult:
        await asyncio.sleep(delay)   # a few ms apart: the SYNs leave in order
        conn = await StunTcpConnection.open(obs.server, local=(ip, 0), connect_timeout=timeout,
                                            rearm=rearm.rearm, growth=rearm.growth)
        obs.allocation_rearms += conn.rearms
        async with conn:
            r = await conn.binding(timeout=timeout)
        if samples is not None:
            samples.extend((conn.handshake_rtt, r.rtt))
        return r
    results = await _gather(*(one(i * 0.003) for i in range(count)))
    for r in results:
        if isinstance(r, BindingResult):
            obs.allocation.append((r.local[1], r.mapped[1]))
        else:
            obs.allocation_lost += 1
    return [r for r in results if isinstance(r, BindingResult)]


async def _tcp_mapping(obs: Observations, bases: list[tuple[Address, Address]], step: float,
                       rearm: _Rearm) -> None:
    """The mapping probes (to the other IP, and to the other IP and port) from each base, a
    local port whose mapping towards the primary address is known, all at once; the first
    base with both answers is the one observed. Under loss about one connect in three
    waits for a re-sent segment, and a phase waits for its slowest: two bases wait less."""
    assert obs.other_address is not None
    other = obs.other_address

    async def one(local: Address, m1: Address) -> tuple[Address, Address, Any, Any]:
        m2, m3 = await _gather(_tcp_binding((other[0], obs.server[1]), local, step, rearm),
                               _tcp_binding(other, local, step, rearm))
        return local, m1, m2, m3

    tasks = [asyncio.ensure_future(one(*base)) for base in bases]
    seen: tuple[Address, Address, Address | None, Address | None] | None = None
    try:
        for fut in asyncio.as_completed(tasks):
            local, m1, m2, m3 = await fut
            got = (local, m1, m2.mapped if isinstance(m2, BindingResult) else None,
                   m3.mapped if isinstance(m3, BindingResult) else None)
            if seen is None or got.count(None) < seen.count(None):
                seen = got
            if None not in got:
                break
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert seen is not None
    obs.mapping_local, obs.mapped_primary, obs.mapped_alt_ip, obs.mapped_alt_both = seen


async def _tcp_hairpin(obs: Observations, ip: str, catcher: _ConnectBackCatcher, wait: float,
                       mapped: asyncio.Future[Address | None], timeout: float,
                       sent: asyncio.Event) -> None:
    """Does a connection to our own mapped address come back to us? ``sent`` is set once
    its SYN is out (or it is not tried)."""
    try:
        target = await asyncio.wait_for(asyncio.shield(mapped), timeout)
    except TimeoutError:
        target = None
    finally:
        sent.set()       # the connect below sends at once
    if target is None:
        obs.hairpin_detail = "no mapped address for the listening port"
        return
    before = len(catcher.peers)
    servers = {obs.server[0], *(a[0] for a in (obs.other_address, obs.alt_server) if a)}
    sock = reusable_socket((ip, 0))
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, target), wait)
        obs.hairpin = True
    except (TimeoutError, OSError) as exc:
        # accepted, though our end did not see it: hairpinned all the same (the filtering
        # test's connect-backs come in meanwhile, from the server's addresses)
        obs.hairpin = any(p not in servers for p in catcher.peers[before:])
        log.debug("TCP hairpin to %s: %r", target, exc)
    finally:
        sock.close()
