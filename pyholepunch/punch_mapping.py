"""The punch port's router mapping, for the peer (docs/architecture.md): one PortMapper per peer, asked
for the gateway on the route to the rendezvous server (none on loopback or on-link: nothing
is sent), probed while the peer classifies its NAT, following the punch port as it rotates
(the old port's mapping is given back), and folded into the TCP NAT profile the peer
announces (``port_mapping``, ``mapped_by``), which the planner reads as "dial me here".
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from .errors import PortMapError
from .nat.profile import NatProfile
from .portmap import Mapping, PortMapper, gateway_for

log = logging.getLogger(__name__)


class PunchPortMapping:
    def __init__(self, server_ip: str, local_ip: str, *, on_change: Callable[[], Any]) -> None:
        gateway = gateway_for(server_ip)
        self._on_change = on_change
        self.mapper = (PortMapper(gateway, local_ip, on_change=lambda m: on_change())
                       if gateway is not None else None)
        self.mapping: Mapping | None = None
        self.port = 0

    def probe_task(self) -> asyncio.Task[Any] | None:
        """Start the probe (<= 250 ms) in the background, e.g. while the NAT is classified;
        ``follow`` waits for the same probe (and meets its error, if any)."""
        if self.mapper is None:
            return None
        mapper = self.mapper

        async def probe() -> None:
            with contextlib.suppress(PortMapError, OSError):
                await mapper.probe()
        return asyncio.create_task(probe())

    async def follow(self, port: int) -> None:
        """Have ``port`` mapped (once per port); failure only means no mapping."""
        if self.mapper is None or (port == self.port and self.mapping is not None
                                   and not self.mapping.lost):
            return
        old, self.port = self.mapping, port
        if old is not None:
            await self.mapper.unmap(old)
        try:
            self.mapping = await self.mapper.map(port)
        except (PortMapError, OSError) as exc:
            log.info("no router port mapping for punch port %d: %s", port, exc)
            self.mapping = None

    def profile(self, p: NatProfile) -> NatProfile:
        """``p`` with the live mapping of the current punch port (or none)."""
        m = self.mapping
        if m is None or m.lost or m.internal[1] != self.port:
            return p.evolve(port_mapping=None, mapped_by="")
        return p.evolve(port_mapping=m.external, mapped_by=m.label)

    async def close(self) -> None:
        if self.mapper is not None:
            await self.mapper.close()
