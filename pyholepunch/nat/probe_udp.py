"""The UDP probes of NAT classification (nat/probe.py has the shared parts and TCP's)."""
from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

from ..address import Address, route_source
from ..errors import TransactionFailed, TransactionTimeout
from ..stun.client import BindingResult, StunUdpClient, format_address, new_transaction_id
from ..stun.codec import ChangeRequest, ErrorCode, binding_request
from .probe import CHANGE_BOTH, CHANGE_PORT, _changed_expected, _gather, _waits

if TYPE_CHECKING:
    from .classify import FilterProbe, Observations


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
