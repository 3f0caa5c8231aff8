"""``PortMapper``: ask the router on the path for a port mapping, keep it, give it back.

    mapper = PortMapper(gateway, local_ip)
    probe = await mapper.probe()          # PCP, NAT-PMP and UPnP at once, one ~250 ms budget
    m = await mapper.map(punch_port)      # first that works: PCP, NAT-PMP, then UPnP
    ... m.external ...                    # renewed at half life; re-made after a router reboot
    await mapper.close()                  # deleted (also at exit and on SIGTERM: cleanup.py)

The probe's answer is cached. A refused or failed mapping moves on to the next protocol that
answered; when none works the caller goes on without (PortMapError says why per protocol).
``on_change(mapping)`` is called when a renewal or re-creation moved the external address,
and with ``mapping.lost`` set when the router stopped renewing it.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..address import Address
from ..errors import HolePunchError, PortMapError, PortMapUnavailable
from . import cleanup, natpmp, pcp, upnp
from .epoch import EpochSample, epoch_lost
from .igd import Igd, delete_args, soap_headers
from .transport import Wire

log = logging.getLogger(__name__)

PROTOCOLS = ("pcp", "nat-pmp", "upnp")          # preference order
LABELS = {"pcp": "PCP", "nat-pmp": "NAT-PMP", "upnp": "UPnP"}
RETRY_AFTER_FAILED_RENEWAL = 5.0


@dataclass(frozen=True)
class ProbeResult:
    available: tuple[str, ...]          # protocols that answered, in preference order
    elapsed: float
    external_ip: str | None = None      # from NAT-PMP, if it answered
    upnp_location: str | None = None
    malformed: tuple[str, ...] = ()     # what was wrong with answers that could not be parsed


@dataclass(eq=False)
class Mapping:
    protocol: str                       # "pcp" | "nat-pmp" | "upnp"
    transport: str                      # "tcp" | "udp"
    internal: Address
    external: Address
    lifetime: int                       # seconds granted (0: permanent UPnP lease)
    renewed_at: float = field(default_factory=time.monotonic)
    nonce: bytes = b""                  # PCP
    service: upnp.Service | None = None  # UPnP
    renewals: int = 0
    recreations: int = 0                # after the router's epoch showed it lost its state
    lost: bool = False

    @property
    def label(self) -> str:
        return LABELS[self.protocol]

    def renew_due(self) -> float:
        return self.renewed_at + (self.lifetime / 2 if self.lifetime else 3600.0)


def _answer(protocol: str, data: bytes,
            addr: tuple[str, int]) -> pcp.PcpResponse | natpmp.NatPmpResponse | None:
    """A datagram from port 5351 parsed as a ``protocol`` ("pcp" | "nat-pmp") response; None
    when it comes from another port or is the other protocol's (they share the port)."""
    if addr[1] != pcp.PORT or not data:
        return None
    if protocol == "pcp":
        return pcp.parse_response(data) if data[0] == pcp.VERSION else None
    return natpmp.parse_response(data) if data[0] == natpmp.VERSION else None


class PortMapper:
    def __init__(self, gateway: str, local_ip: str, *, budget: float = 0.25,
                 protocols: tuple[str, ...] = PROTOCOLS, lifetime: int = 7200,
                 check_interval: float = 60.0, rto: float = 0.25, attempts: int = 3,
                 on_change: Callable[[Mapping], Any] | None = None) -> None:
        unknown = set(protocols) - set(PROTOCOLS)
        if unknown:
            raise ValueError(f"unknown port-mapping protocol(s) {sorted(unknown)}; "
                             f"choose from {', '.join(PROTOCOLS)}")
        self.gateway, self.local_ip = gateway, local_ip
        self.budget, self.protocols, self.lifetime = budget, protocols, lifetime
        self.check_interval, self.rto, self.attempts = check_interval, rto, attempts
        self.on_change = on_change
        self.probed: ProbeResult | None = None
        self.mappings: list[Mapping] = []
        self._wire: Wire | None = None
        self._epochs: dict[str, EpochSample] = {}
        self._external_ip: str | None = None        # NAT-PMP's answer
        self._igd: Igd | None = None
        self._probing: asyncio.Future[ProbeResult] | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._closed = False

    # -- probing ------------------------------------------------------------------------------
    async def _open(self) -> Wire:
        if self._wire is None:
            self._wire = await Wire.open(self.gateway, self.local_ip)
        return self._wire

    async def probe(self) -> ProbeResult:
        """Which protocols the gateway answers, all asked at once within ``budget`` (cached;
        callers arriving while it runs share it)."""
        if self.probed is not None:
            return self.probed
        if self._probing is None:
            self._probing = asyncio.ensure_future(self._probe())
        return await asyncio.shield(self._probing)

    async def _probe(self) -> ProbeResult:
        wire = await self._open()
        t0 = time.monotonic()
        sends: dict[str, tuple[bytes, int]] = {
            "pcp": (pcp.encode_announce(self.local_ip), pcp.PORT),
            "nat-pmp": (natpmp.encode_external_address_request(), natpmp.PORT),
            "upnp": (upnp.encode_msearch(host=self.gateway), upnp.SSDP_PORT)}
        futures = {p: wire.listen(self._probe_matcher(p)) for p in self.protocols}
        for p in self.protocols:
            wire.send(*sends[p])
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.budget / 2):
                await asyncio.wait(futures.values(), return_when=asyncio.ALL_COMPLETED)
        for p, fut in futures.items():   # once more for what did not answer (a lost datagram)
            if not fut.done():
                wire.send(*sends[p])
        left = self.budget - (time.monotonic() - t0)
        if left > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await asyncio.wait(futures.values(), return_when=asyncio.ALL_COMPLETED)
        results: dict[str, Any] = {}
        for p, fut in futures.items():
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                results[p] = fut.result()
            else:
                fut.cancel()
        available = tuple(p for p in PROTOCOLS if p in results)
        ext = results["nat-pmp"].external_ip if "nat-pmp" in results else None
        self._external_ip = ext
        loc = results["upnp"].location if "upnp" in results else None
        self.probed = ProbeResult(available, time.monotonic() - t0, ext, loc, tuple(wire.malformed))
        log.info("port-mapping probe of %s: %s in %.0f ms", self.gateway,
                 ", ".join(LABELS[p] for p in available) or "nothing answered",
                 self.probed.elapsed * 1000)
        return self.probed

    def _probe_matcher(self, protocol: str) -> Callable[[bytes, tuple[str, int]], Any]:
        def match(data: bytes, addr: tuple[str, int]) -> Any:
            if protocol == "upnp":
                return upnp.parse_ssdp_response(data) if addr[1] == upnp.SSDP_PORT else None
            r = _answer(protocol, data, addr)
            first = pcp.Opcode.ANNOUNCE if protocol == "pcp" else natpmp.Opcode.EXTERNAL_ADDRESS
            if r is None or r.opcode is not first or not r.ok:
                return None
            self._note_epoch(protocol, r.epoch)
            return r
        return match

    def _note_epoch(self, protocol: str, epoch: int) -> bool:
        """Record an epoch; True when it shows the router lost its mappings."""
        sample = EpochSample(time.monotonic(), epoch)
        lost = epoch_lost(self._epochs.get(protocol), sample)
        self._epochs[protocol] = sample
        if lost:
            log.warning("%s: the router's epoch went from %s to %d: it lost its mappings",
                        LABELS[protocol], self._epochs.get(protocol), epoch)
        return lost

    # -- mapping ------------------------------------------------------------------------------
    async def map(self, port: int, transport: str = "tcp") -> Mapping:
        """Map local ``port``: the first protocol (of those that answered) that grants it."""
        probe = await self.probe()
        if not probe.available:
            bad = f" (malformed answers: {'; '.join(probe.malformed)})" if probe.malformed else ""
            raise PortMapUnavailable(f"no port-mapping router answered at {self.gateway} within "
                                     f"{self.budget * 1000:.0f} ms{bad}")
        errors = []
        for protocol in probe.available:
            try:
                m = await self._create(protocol, port, transport)
            except (HolePunchError, OSError, TimeoutError) as exc:
                log.info("%s mapping of port %d refused or failed: %s", LABELS[protocol], port, exc)
                errors.append(f"{LABELS[protocol]}: {exc or type(exc).__name__}")
                continue
            self.mappings.append(m)
            self._track(m)
            self._ensure_keeper()
            log.info("%s mapped %s:%d -> %s:%d for %d s", m.label, self.local_ip, port,
                     *m.external, m.lifetime)
            return m
        raise PortMapError("no protocol mapped the port: " + "; ".join(errors))

    async def _create(self, protocol: str, port: int, transport: str) -> Mapping:
        internal = (self.local_ip, port)
        if protocol == "pcp":
            m = Mapping("pcp", transport, internal, ("", 0), 0, nonce=os.urandom(pcp.NONCE_LEN))
        elif protocol == "nat-pmp":
            m = Mapping("nat-pmp", transport, internal, ("", 0), 0)
        else:
            m = Mapping("upnp", transport, internal, ("", 0), 0, service=await (await self.igd()).wan())
        await self._refresh(m, suggest=port)
        return m

    async def _refresh(self, m: Mapping, *, suggest: int | None = None) -> None:
        """Create or renew ``m`` (same nonce / external port); updates it in place."""
        want = suggest if suggest is not None else m.external[1]
        if m.protocol == "pcp":
            r = await self._pcp_map(m, want, self.lifetime)
            m.external, m.lifetime = (r.external_ip, r.external_port), r.lifetime
        elif m.protocol == "nat-pmp":
            r2 = await self._natpmp_map(m, want, self.lifetime)
            if self._external_ip is None:
                await self._natpmp_external()
            assert r2.external_port is not None and r2.lifetime is not None
            m.external, m.lifetime = (self._external_ip or "", r2.external_port), r2.lifetime
        else:
            assert m.service is not None
            m.external, m.lifetime = await (await self.igd()).add_port_mapping(
                m.service, m.transport, m.internal, want, self.lifetime)
        m.renewed_at = time.monotonic()

    async def _ask(self, protocol: str, request: bytes, wanted: Callable[[Any], bool], what: str,
                   refused: str | None = None) -> tuple[Any, bool]:
        """Send a PCP or NAT-PMP ``request`` until an answer of ``protocol`` that ``wanted``
        accepts; that answer and whether its epoch shows the router lost its mappings. With
        ``refused``, a non-zero result raises PortMapError with that text and the result name."""
        lost = False

        def match(data: bytes, addr: tuple[str, int]) -> Any:
            nonlocal lost
            r = _answer(protocol, data, addr)
            if r is None or not wanted(r):
                return None
            lost = self._note_epoch(protocol, r.epoch)
            if refused is not None and not r.ok:
                names = pcp.result_name if protocol == "pcp" else natpmp.result_name
                raise PortMapError(f"{refused}: {names(r.result)}", protocol=protocol,
                                   code=r.result)
            return r

        wire = await self._open()
        r = await wire.request([(request, pcp.PORT)], match, rto=self.rto,
                               attempts=self.attempts, what=what, protocol=protocol)
        return r, lost

    # PCP
    async def _pcp_map(self, m: Mapping, external_port: int, lifetime: int) -> pcp.PcpResponse:
        req = pcp.encode_map(client_ip=self.local_ip, nonce=m.nonce, transport=m.transport,
                             internal_port=m.internal[1], external_port=external_port,
                             lifetime=lifetime)
        r, _ = await self._ask("pcp", req, lambda r: r.opcode is pcp.Opcode.MAP and (
            not r.ok or (r.nonce == m.nonce and r.internal_port == m.internal[1])),
            "PCP MAP", refused="PCP MAP refused")
        result: pcp.PcpResponse = r
        return result

    async def _pcp_announce(self) -> bool:
        _, lost = await self._ask("pcp", pcp.encode_announce(self.local_ip),
                                  lambda r: r.opcode is pcp.Opcode.ANNOUNCE, "PCP ANNOUNCE")
        return lost

    # NAT-PMP
    async def _natpmp_map(self, m: Mapping, external_port: int, lifetime: int) -> natpmp.NatPmpResponse:
        req = natpmp.encode_map_request(m.transport, m.internal[1], external_port, lifetime)
        opcode = natpmp.map_opcode(m.transport)
        r, _ = await self._ask("nat-pmp", req, lambda r: r.opcode is opcode and (
            not r.ok or r.internal_port == m.internal[1]),
            "NAT-PMP mapping", refused="NAT-PMP mapping refused")
        result: natpmp.NatPmpResponse = r
        return result

    async def _natpmp_external(self) -> bool:
        """Ask NAT-PMP's external address; True when its epoch shows lost mappings."""
        r, lost = await self._ask("nat-pmp", natpmp.encode_external_address_request(),
                                  lambda r: r.opcode is natpmp.Opcode.EXTERNAL_ADDRESS,
                                  "NAT-PMP external address", refused="NAT-PMP external address")
        self._external_ip = r.external_ip
        return lost

    # UPnP
    async def igd(self) -> Igd:
        """The gateway's UPnP IGD (after a probe that found one)."""
        if self._igd is None:
            probe = await self.probe()
            if probe.upnp_location is None:
                raise PortMapError(f"no UPnP IGD answered at {self.gateway}", protocol="upnp")
            self._igd = Igd(self.gateway, self.local_ip, probe.upnp_location)
        return self._igd

    # -- keeping ------------------------------------------------------------------------------
    def _ensure_keeper(self) -> None:
        if self._keeper is None or self._keeper.done():
            self._keeper = asyncio.create_task(self._keep())
        self._wake.set()

    async def _keep(self) -> None:
        """Renew each mapping at half its life; between renewals, watch the router's epoch
        (PCP ANNOUNCE / NAT-PMP external address) and re-create everything after a reboot."""
        next_check = time.monotonic() + self.check_interval
        while not self._closed:
            live = [m for m in self.mappings if not m.lost]
            if not live:
                return
            due = min([m.renew_due() for m in live] + [next_check])
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, due - time.monotonic())):
                    await self._wake.wait()
            now = time.monotonic()
            if now >= next_check:
                next_check = now + self.check_interval
                await self._check_epochs(live)
            for m in live:
                if m.renew_due() <= time.monotonic() and not m.lost:
                    await self._renew(m)

    async def _check_epochs(self, live: list[Mapping]) -> None:
        for protocol in {m.protocol for m in live} & {"pcp", "nat-pmp"}:
            try:
                lost = await (self._pcp_announce() if protocol == "pcp" else self._natpmp_external())
            except (HolePunchError, OSError) as exc:
                log.info("%s epoch check failed: %s", LABELS[protocol], exc)
                continue
            if lost:
                for m in live:
                    if m.protocol == protocol:
                        await self._renew(m, recreate=True)

    async def _renew(self, m: Mapping, *, recreate: bool = False) -> None:
        before = m.external
        try:
            await self._refresh(m)
        except (HolePunchError, OSError) as exc:
            log.warning("%s: renewing the mapping of port %d failed: %s", m.label, m.internal[1], exc)
            if time.monotonic() > m.renewed_at + max(m.lifetime, 1):
                m.lost = True
                self._untrack(m)
                self._changed(m)
            else:
                m.renewed_at += min(RETRY_AFTER_FAILED_RENEWAL, m.lifetime / 4 or 1)
            return
        if recreate:
            m.recreations += 1
        else:
            m.renewals += 1
        self._track(m)
        log.info("%s %s port %d -> %s:%d for %d s", m.label, "re-created" if recreate else "renewed",
                 m.internal[1], *m.external, m.lifetime)
        if m.external != before:
            self._changed(m)

    def _changed(self, m: Mapping) -> None:
        if self.on_change is not None:
            try:
                self.on_change(m)
            except Exception:   # noqa: BLE001 - a callback's bug must not stop the renewals
                log.exception("port mapping on_change callback failed")

    async def renew_now(self) -> None:
        """Renew every mapping at once (what the keeper does at half life)."""
        for m in list(self.mappings):
            if not m.lost:
                await self._renew(m)

    # -- giving back --------------------------------------------------------------------------
    def _release(self, m: Mapping) -> cleanup.Release:
        if m.protocol == "pcp":
            req = pcp.encode_map(client_ip=self.local_ip, nonce=m.nonce, transport=m.transport,
                                 internal_port=m.internal[1], lifetime=0)
            return cleanup.Release("udp", self.local_ip, (self.gateway, pcp.PORT), req)
        if m.protocol == "nat-pmp":
            req = natpmp.encode_map_request(m.transport, m.internal[1], 0, 0)
            return cleanup.Release("udp", self.local_ip, (self.gateway, natpmp.PORT), req)
        assert m.service is not None
        body = upnp.encode_soap(m.service.service_type, "DeletePortMapping",
                                delete_args(m.transport, m.external[1]))
        host, port, _ = upnp.check_url(m.service.control_url)
        req = upnp.encode_http_request("POST", m.service.control_url, body=body,
                                       headers=soap_headers(m.service, "DeletePortMapping"))
        return cleanup.Release("tcp", self.local_ip, (host, port), req)

    def _track(self, m: Mapping) -> None:
        cleanup.track(id(m), self._release(m))

    def _untrack(self, m: Mapping) -> None:
        cleanup.untrack(id(m))

    async def unmap(self, m: Mapping) -> None:
        """Delete one mapping at the router."""
        if m in self.mappings:
            self.mappings.remove(m)
        self._untrack(m)
        if m.lost:
            return
        m.lost = True
        try:
            if m.protocol == "pcp":
                await self._pcp_map(m, 0, 0)
            elif m.protocol == "nat-pmp":
                await self._natpmp_map(m, 0, 0)
            else:
                assert m.service is not None
                await (await self.igd()).delete_port_mapping(m.service, m.transport, m.external[1])
        except (HolePunchError, OSError, TimeoutError) as exc:
            log.warning("%s: deleting the mapping of port %d failed: %s", m.label, m.internal[1], exc)
        else:
            log.info("%s deleted the mapping of port %d", m.label, m.internal[1])

    async def close(self) -> None:
        """Delete every mapping and stop; safe to call twice (also when cancelled)."""
        if self._closed:
            return
        self._closed = True
        for task in (self._keeper, self._probing):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        try:
            for m in list(self.mappings):
                await self.unmap(m)
        finally:
            for m in self.mappings:       # cancelled mid-way: the sync path finishes the job
                with contextlib.suppress(OSError):
                    cleanup.send_release(self._release(m))
                self._untrack(m)
            if self._wire is not None:
                self._wire.close()

    async def __aenter__(self) -> PortMapper:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
