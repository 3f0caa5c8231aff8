"""Relay fallback: the built-in relay (server hub + client) and a TURN TCP-allocation client."""
from __future__ import annotations

from .builtin import RelayHub, RelayMetrics, RelayServer, open_builtin_relay
from .turn import TurnClient, TurnCredentials, accept_relayed, connect_relayed, offer_relayed

__all__ = [
    "RelayHub",
    "RelayMetrics",
    "RelayServer",
    "TurnClient",
    "TurnCredentials",
    "accept_relayed",
    "connect_relayed",
    "offer_relayed",
    "open_builtin_relay",
]
