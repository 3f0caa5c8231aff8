"""Router port mapping (docs/architecture.md): NAT-PMP (RFC 6886), PCP (RFC 6887) and UPnP IGD v1/v2.

Sans-IO codecs (``natpmp``, ``pcp``, ``upnp``), the epoch rule (``epoch``), and an asyncio
driver (``client.PortMapper``) that probes all three at once, maps a port with the first that
grants it, renews at half life, re-creates after a router reboot and deletes on close, at exit
and on SIGTERM (``cleanup``). Imports nothing above ``address``/``errors``.
"""
from .client import LABELS, PROTOCOLS, Mapping, PortMapper, ProbeResult
from .gateway import gateway_for

__all__ = ["LABELS", "PROTOCOLS", "Mapping", "PortMapper", "ProbeResult", "gateway_for"]
