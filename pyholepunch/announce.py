"""The peer's punch addresses: learning them (STUN over TCP from each family's punch port)
and announcing them with its profiles. A part of ``Peer`` (peer.py), kept apart so that
module stays one concern: connecting."""
from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable
from dataclasses import dataclass

from .errors import HolePunchError
from .nat.profile import NatProfile
from .punch_mapping import PunchPortMapping
from .punch_sequential import AllocationTracker
from .punchport import PunchPort, candidates, classify_family, probe, reserve_port
from .signal.client import SignalClient
from .strategy import Candidate
from .strategy.candidates import family_name
from .stun.client import BindingResult

log = logging.getLogger(__name__)


@dataclass
class Probed:
    """A punch port's STUN probe: the port (its new reservation, if any) and its mapping."""

    reservation: socket.socket | None
    port: int
    started: float          # time.time()
    took: float
    result: BindingResult

    def discard(self) -> None:
        if self.reservation is not None:
            self.reservation.close()


class Announcing:
    """Peer's punch-address methods; the attributes are Peer's."""

    ports: dict[str, PunchPort]
    profiles: dict[str, NatProfile]
    family_profiles: dict[str, NatProfile]
    families: tuple[str, ...]
    port_mapping: PunchPortMapping | None
    _primary: str
    _signal: SignalClient
    _announcing: asyncio.Lock
    _tracker: AllocationTracker | None

    @property
    def tcp_profile(self) -> NatProfile:
        return self.profiles.get("tcp") or NatProfile()

    async def _add_other_family(self) -> None:
        """Dual stack: the server named its address in the other family (STUN
        OTHER-FAMILY-ADDRESS); if we have a route there and its STUN answers, classify that
        family too and keep a punch port in it. A family the server cannot be reached in
        (no route, or a blackholed uplink: no answer) is left out, and said so."""
        server = self.ports[self._primary].other_family
        fam = family_name(server[0]) if server else ""
        if server is None or fam not in self.families or fam in self.ports or \
                (found := await classify_family(server)) is None:
            return
        local_ip, self.family_profiles[fam] = found
        self.ports[fam] = PunchPort(fam, server, local_ip)
        try:
            await self._learn_punch_address(fam, new_port=True)
        except (OSError, HolePunchError) as exc:
            log.info("%s left out: no STUN answer for its punch port (%s)", fam, exc)
            self.ports.pop(fam).close()
            self.family_profiles.pop(fam, None)

    def _all_profiles(self) -> list[NatProfile]:
        """What we announce: our profiles towards the server's family, and the TCP profile
        of the other family when we have one."""
        return [*self.profiles.values(),
                *(p for f, p in self.family_profiles.items() if f != self._primary)]

    async def announce(self, *, new_port: bool = False) -> None:
        """Learn and announce our external punch addresses (see ``_learn_punch_address``)
        and our profiles (a router port mapping shows in the TCP one)."""
        for fam in list(self.ports):
            try:
                await self._learn_punch_address(fam, new_port=new_port)
            except (OSError, HolePunchError):
                if fam == self._primary:
                    raise
                log.info("%s punch port: no STUN answer; announcing the previous mapping", fam)
        await self._signal.update(candidates=self._candidates(), profiles=self._all_profiles())

    async def _probe_punch_port(self, family: str, *, new_port: bool) -> Probed:
        """The STUN probe of ``_learn_punch_address``, not yet adopted (see there)."""
        pp = self.ports[family]
        reservation = (reserve_port(pp.local_ip) if new_port or pp.reservation is None
                       else None)
        port = reservation.getsockname()[1] if reservation is not None else pp.port
        t = time.time()
        try:
            result = await probe(pp.server, pp.local_ip, port,
                                 rtt=self._signal.rtt or self._signal.connect_rtt)
        except BaseException:
            if reservation is not None:
                reservation.close()
            raise
        return Probed(reservation, port, t, time.time() - t, result)

    async def _learn_punch_address(self, family: str, *, new_port: bool,
                                   probed: Awaitable[Probed] | None = None) -> None:
        """STUN over TCP from ``family``'s punch port: what it maps to outside.

        For an endpoint-independent mapping that is where the peer will find us; for a
        sequential symmetric NAT it is the latest mapping, the base of the peer's prediction.
        With ``new_port`` a fresh port is probed first and then swapped in together with its
        mapping, so the port and the announced address always agree. The probe ends with an
        RST (SO_LINGER 0): a TIME_WAIT would block the next probe from that port. ``probed``:
        that probe, started earlier (``_probe_punch_port``; the peer's start).
        """
        pp = self.ports[family]
        async with self._announcing:
            got = await (probed if probed is not None
                         else self._probe_punch_port(family, new_port=new_port))
            if self._tracker is not None and family == self._primary:
                self._tracker.observe(got.started, got.result.mapped[1], announced=True,
                                      took=got.took)
            if got.reservation is not None:
                pp.close()
                pp.reservation, pp.port = got.reservation, got.port
            pp.announced = got.result.mapped
            pp.other_family = got.result.other_family or pp.other_family
            if self.port_mapping is not None and family == self._primary:
                await self.port_mapping.follow(pp.port)
                self.profiles["tcp"] = self.port_mapping.profile(self.tcp_profile)
                self.family_profiles[family] = self.profiles["tcp"]

    def _candidates(self) -> list[Candidate]:
        return candidates(self.ports)
