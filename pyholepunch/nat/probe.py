"""The I/O half of NAT classification: run the probes, fill ``Observations``.

The verdict (nat/classify.py ``build_profile``) never sees a socket; this module never
decides a NAT type. Rounds are ordered so that only the allocation probes create new
mappings while they run (a sequential allocator must show its real delta).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..address import Address, route_source
from ..errors import ProtocolError, TransactionFailed, TransactionTimeout
from ..stun.client import (
    CONNECT_REARM,
    BindingResult,
    StunTcpConnection,
    StunUdpClient,
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
    from .classify import FilterProbe, Observations

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


# --- UDP -------------------------------------------------------------------------------

def _udp_filter_outcome(obs: Observations, probe: FilterProbe, change: ChangeRequest,
                        result: BindingResult | BaseException) -> None:
    from .classify import Outcome
    if isinstance(result, BindingResult):
        expected = _changed_expected(obs, change)
        if result.source == obs.server or (expected is not None and result.source != expected):
            probe.outcome, probe.detail = Outcome.INVALID, f"answer came from {result.source}"
        else:
            probe.outcome = Outcome.PASSED
    elif isinstance(result, TransactionTimeout):
        probe.outcome = Outcome.BLOCKED
    elif isinstance(result, TransactionFailed) and result.code in (ErrorCode.UNKNOWN_ATTRIBUTE,
                                                                    ErrorCode.BAD_REQUEST):
        probe.outcome, probe.detail = Outcome.UNSUPPORTED, f"server answered {result}".rstrip("\0")
    else:
        probe.outcome, probe.detail = Outcome.INVALID, str(result)


async def probe_udp(obs: Observations, *, local_ip: str | None, timeout: float,
                    allocation_probes: int) -> None:
    ip = local_ip or route_source(obs.server[0])
    obs.local_ip = ip
    first: dict[str, Any] = dict(rto=min(0.25, timeout / 4), rc=6, timeout=timeout)
    clients: list[StunUdpClient] = []
    filter_task: asyncio.Future[list[Any]] | None = None
    try:
        sm = await StunUdpClient.open((ip, 0))
        sf = await StunUdpClient.open((ip, 0))
        clients += [sm, sf]
        obs.mapping_local, obs.filter_local = sm.local, sf.local
        r1, rf = await _gather(sm.binding(obs.server, **first), sf.binding(obs.server, **first))
        if not isinstance(r1, BindingResult):
            obs.error = (f"no UDP answer from {format_address(obs.server)} within {timeout:.1f} s "
                         "(server down, wrong port, or UDP blocked)"
                         if isinstance(r1, TransactionTimeout) else f"server refused: {r1}")
            return
        obs.mapped_primary, obs.rtt, obs.other_address = r1.mapped, r1.rtt, r1.other_address
        rto, wait = _waits(r1.rtt)
        quick: dict[str, Any] = dict(rto=rto, rc=4, timeout=wait)

        # filtering runs in the background: it creates no mapping
        if isinstance(rf, BindingResult):
            obs.mapped_filter = rf.mapped
            filter_task = asyncio.ensure_future(_gather(
                sf.binding(obs.server, change=CHANGE_BOTH, **quick),
                sf.binding(obs.server, change=CHANGE_PORT, **quick)))
        else:
            obs.notes.append(f"filtering: the filtering socket got no answer ({rf})")

        # mapping: same socket, other destinations
        if obs.other_address is not None:
            m2, m3 = await _gather(
                sm.binding((obs.other_address[0], obs.server[1]), **quick),
                sm.binding(obs.other_address, **quick))
            obs.mapped_alt_ip = m2.mapped if isinstance(m2, BindingResult) else None
            obs.mapped_alt_both = m3.mapped if isinstance(m3, BindingResult) else None
        elif obs.alt_server is not None:
            m2 = (await _gather(sm.binding(obs.alt_server, rto=rto, rc=4, timeout=timeout)))[0]
            obs.mapped_alt_server = m2.mapped if isinstance(m2, BindingResult) else None

        # allocation: fresh sockets, sends leave in order
        fresh = [await StunUdpClient.open((ip, 0)) for _ in range(allocation_probes)]
        clients += fresh
        results = await _gather(*(c.binding(obs.server, **quick) for c in fresh))
        for c, r in zip(fresh, results, strict=True):
            if isinstance(r, BindingResult):
                obs.allocation.append((c.local[1], r.mapped[1]))
            else:
                obs.allocation_lost += 1

        # hairpin: our own request, sent to our own mapping, must come back to us
        req = binding_request(new_transaction_id())
        data = req.encode()
        got: asyncio.Future[Address] = asyncio.get_running_loop().create_future()

        def on_unmatched(d: bytes, a: Address) -> None:
            if d == data and not got.done():
                got.set_result(a)
        sm.on_unmatched = on_unmatched
        for _ in range(3):
            sm.send_raw(data, r1.mapped)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(got), wait / 3)
                break
        obs.hairpin = got.done()
        if filter_task is not None:
            fb, fp = await filter_task
            _udp_filter_outcome(obs, obs.filter_both, CHANGE_BOTH, fb)
            _udp_filter_outcome(obs, obs.filter_port, CHANGE_PORT, fp)
    finally:
        if filter_task is not None and not filter_task.done():
            filter_task.cancel()
        for c in clients:
            c.close()


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
                    allocation_probes: int) -> None:
    ip = local_ip or route_source(obs.server[0])
    obs.local_ip = ip
    lsock = _listener((ip, 0))
    p2 = lsock.getsockname()[1]
    catcher = _ConnectBackCatcher()
    try:
        listener = await asyncio.start_server(catcher.handle, sock=lsock)
    except BaseException:
        lsock.close()
        raise
    conns: list[StunTcpConnection] = []
    filter_task: asyncio.Future[None] | None = None
    hairpin: asyncio.Future[None] | None = None
    try:
        a, f = await _gather(StunTcpConnection.open(obs.server, local=(ip, 0), connect_timeout=timeout),
                             StunTcpConnection.open(obs.server, local=(ip, p2), connect_timeout=timeout))
        conns += [c for c in (a, f) if isinstance(c, StunTcpConnection)]
        if not isinstance(a, StunTcpConnection):
            what = ("connection refused" if isinstance(a, ConnectionRefusedError) else
                    "no answer to the TCP handshake" if isinstance(a, TransactionTimeout) else str(a))
            obs.error = f"cannot reach {format_address(obs.server)} over TCP: {what}"
            return
        try:
            r1 = await a.binding(timeout=timeout)
        except ConnectionError as exc:
            # A broken first connection (seen under loss: re-sent SYNs on one port can leave
            # the two ends disagreeing) is not the server's answer: once more, a fresh port.
            # (Bytes that are not STUN are an answer: a server of another kind, said at once.)
            log.debug("TCP classification: the first connection broke (%r): a fresh one", exc)
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
        obs.rtt = _rtt([a.handshake_rtt, r1.rtt]
                       + ([f.handshake_rtt] if isinstance(f, StunTcpConnection) else []))
        _, wait = _waits(obs.rtt)
        step = max(2.5, 6 * obs.rtt) + wait    # room for one SYN retransmission (1 s) and more
        rearm = _Rearm.measured(obs.rtt)

        # filtering on the listener's port, in the background
        filtered: asyncio.Future[Address | None] = asyncio.get_running_loop().create_future()
        if isinstance(f, StunTcpConnection):
            obs.filter_local = f.local
            # the server's budget, our patience for silence, and TCP's retransmissions (RTO
            # >= 0.2 s, doubling) of a lost request or report: a deadline, rarely waited out
            cb_wait = SERVER_CONNECT_BACK_TIMEOUT + wait + 2 * obs.rtt + REPORT_LOSS
            filter_task = asyncio.ensure_future(
                _tcp_filtering(obs, f, catcher, cb_wait, step, filtered))
        else:
            obs.notes.append(f"filtering: the filtering connection failed ({f!r})")
            filtered.set_result(None)
        # The hairpin's connect takes a mapping of a fresh port, which only the allocation
        # run must not see: it runs beside the mapping probes (its wait for silence, 0.4 s
        # at least, was a round of its own), once the filtering port's mapping is known.
        hairpin = asyncio.ensure_future(_tcp_hairpin(obs, ip, catcher, wait, filtered, step))

        # mapping: same local port, other destinations
        if obs.other_address is not None:
            m2, m3 = await _gather(
                _tcp_binding((obs.other_address[0], obs.server[1]), p1, step, rearm),
                _tcp_binding(obs.other_address, p1, step, rearm))
            obs.mapped_alt_ip = m2.mapped if isinstance(m2, BindingResult) else None
            obs.mapped_alt_both = m3.mapped if isinstance(m3, BindingResult) else None
        elif obs.alt_server is not None:
            m2 = (await _gather(_tcp_binding(obs.alt_server, p1, timeout, rearm)))[0]
            obs.mapped_alt_server = m2.mapped if isinstance(m2, BindingResult) else None
        await hairpin

        # connect-backs create no mapping, so they may overlap the allocation run
        await _tcp_allocation(obs, ip, allocation_probes, step, rearm)
        if filter_task is not None:
            await filter_task
    finally:
        for task in (filter_task, hairpin):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        for c in conns:
            await c.close()
        listener.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(listener.wait_closed(), 1.0)


async def _tcp_filtering(obs: Observations, conn: StunTcpConnection, catcher: _ConnectBackCatcher,
                         wait: float, first_timeout: float,
                         mapped: asyncio.Future[Address | None]) -> None:
    """The filtering tests; ``mapped`` gets the filtering port's mapping (None if none)."""
    from .classify import Outcome
    try:
        rf = await conn.binding(timeout=first_timeout)   # TCP's own retransmission may be needed
        obs.mapped_filter = rf.mapped
    except (TransactionTimeout, TransactionFailed, OSError, ProtocolError) as exc:
        obs.notes.append(f"filtering: no answer on the filtering connection ({exc})")
        return
    finally:
        if not mapped.done():
            mapped.set_result(obs.mapped_filter)
    probes = {}
    for change, probe in ((CHANGE_BOTH, obs.filter_both), (CHANGE_PORT, obs.filter_port)):
        req = binding_request(new_transaction_id(), change=change)
        probes[req.transaction_id] = (change, probe)
        conn.send(req)
    await conn.writer.drain()
    deadline = time.monotonic() + wait
    pending = dict(probes)

    async def read_reports() -> None:
        while pending:
            msg = await conn.read_message(deadline - time.monotonic())
            entry = pending.get(msg.transaction_id)
            if entry is None or msg.cls is MessageClass.REQUEST:
                continue
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

    reports = asyncio.ensure_future(read_reports())
    try:
        while pending and time.monotonic() < deadline:
            for tid in [t for t in pending if t in catcher.answers]:
                change, probe = pending.pop(tid)
                peer = catcher.answers[tid][1]
                expected = _changed_expected(obs, change)
                if expected is not None and peer != expected:
                    probe.outcome, probe.detail = Outcome.INVALID, f"connect-back came from {peer}"
                else:
                    probe.outcome = Outcome.PASSED
            if pending:
                catcher.event.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(catcher.event.wait(), 0.02)
    finally:
        reports.cancel()
        with contextlib.suppress(BaseException):
            await reports
    for _, probe in pending.values():
        probe.outcome, probe.detail = Outcome.NOT_RUN, f"no connect-back and no report in {wait:.2f} s"


async def _tcp_allocation(obs: Observations, ip: str, count: int, timeout: float,
                          rearm: _Rearm = _Rearm()) -> None:
    async def one(delay: float) -> BindingResult:
        await asyncio.sleep(delay)   # a few ms apart: the SYNs leave in order
        conn = await StunTcpConnection.open(obs.server, local=(ip, 0), connect_timeout=timeout,
                                            rearm=rearm.rearm, growth=rearm.growth)
        obs.allocation_rearms += conn.rearms
        async with conn:
            return await conn.binding(timeout=timeout)
    results = await _gather(*(one(i * 0.003) for i in range(count)))
    for r in results:
        if isinstance(r, BindingResult):
            obs.allocation.append((r.local[1], r.mapped[1]))
        else:
            obs.allocation_lost += 1


async def _tcp_hairpin(obs: Observations, ip: str, catcher: _ConnectBackCatcher, wait: float,
                       mapped: asyncio.Future[Address | None], timeout: float) -> None:
    try:
        target = await asyncio.wait_for(asyncio.shield(mapped), timeout)
    except TimeoutError:
        target = None
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
