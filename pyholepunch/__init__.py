"""pyholepunch: direct TCP connections between peers behind NATs, relay only when needed.

The public API lives here and nowhere else.
"""
from __future__ import annotations

import logging

from . import engine
from .errors import (
    AuthenticationError,
    HolePunchError,
    LabError,
    LocalProtocolError,
    NatNotTraversable,
    ProtocolError,
    PunchError,
    PunchTimeout,
    RelayError,
    RemoteProtocolError,
    SignalingError,
    TransactionError,
    TransactionFailed,
    TransactionTimeout,
)

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "AuthenticationError",
    "HolePunchError",
    "LabError",
    "LocalProtocolError",
    "NatNotTraversable",
    "ProtocolError",
    "PunchError",
    "PunchTimeout",
    "RelayError",
    "RemoteProtocolError",
    "SignalingError",
    "TransactionError",
    "TransactionFailed",
    "TransactionTimeout",
    "__version__",
    "engine",
]
