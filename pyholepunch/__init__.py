"""pyholepunch: direct TCP connections between peers behind NATs, relay only when needed.

The public API lives here and nowhere else.
"""
from __future__ import annotations

import logging

from . import engine, sync
from .backend import Punch
from .connection import Connection, KeepAlive
from .errors import (
    AddressError,
    AuthenticationError,
    ConfigDirInUse,
    HolePunchError,
    LabError,
    LocalProtocolError,
    NatNotTraversable,
    OfferError,
    ProtocolError,
    PunchError,
    PunchTimeout,
    RelayError,
    RemoteProtocolError,
    SignalingError,
    StaleOffer,
    StartFailed,
    StartTimeout,
    StrategyError,
    TransactionError,
    TransactionFailed,
    TransactionTimeout,
)
from .identity import Identity
from .nat.classify import classify_nat
from .nat.profile import NatProfile
from .offer import Offer
from .peer import Peer, create_peer
from .report import ConnectionReport
from .strategy import Plan, plan

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "AddressError",
    "AuthenticationError",
    "ConfigDirInUse",
    "Connection",
    "ConnectionReport",
    "Identity",
    "KeepAlive",
    "NatProfile",
    "Offer",
    "Peer",
    "Plan",
    "Punch",
    "classify_nat",
    "create_peer",
    "plan",
    "HolePunchError",
    "LabError",
    "LocalProtocolError",
    "NatNotTraversable",
    "OfferError",
    "ProtocolError",
    "PunchError",
    "PunchTimeout",
    "RelayError",
    "RemoteProtocolError",
    "SignalingError",
    "StaleOffer",
    "StartFailed",
    "StartTimeout",
    "StrategyError",
    "TransactionError",
    "TransactionFailed",
    "TransactionTimeout",
    "__version__",
    "engine",
    "sync",
]
