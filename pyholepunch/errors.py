"""Every exception pyholepunch raises, in one place.

OS failures stay built-in (ConnectionRefusedError, TimeoutError, PermissionError, ...).
Exceptions carry their data as attributes; messages are short and name the offending value.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .engine._base import PunchStats


class HolePunchError(Exception):
    """Base of every pyholepunch error."""


class ProtocolError(HolePunchError, ValueError):
    """Bad bytes on the wire. ``code`` hints the STUN/signaling error code to answer with."""

    def __init__(self, message: str, *, code: int = 400, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.field = field


class LocalProtocolError(ProtocolError):
    """We broke the protocol (an illegal state transition, an unencodable value)."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol."""


class TransactionError(HolePunchError):
    """A request/response transaction did not succeed."""


class TransactionTimeout(TransactionError, TimeoutError):
    """No response after every retransmission."""


class TransactionFailed(TransactionError):
    """The server answered with an error response (kept in ``response``)."""

    def __init__(self, message: str, response: Any = None, *, code: int | None = None) -> None:
        super().__init__(message)
        self.response = response
        self.code = code


class PunchError(HolePunchError):
    """A punch attempt failed; ``stats`` holds what the engine saw."""

    def __init__(self, message: str, stats: PunchStats | None = None) -> None:
        super().__init__(message)
        self.stats = stats


class PunchTimeout(PunchError, TimeoutError):
    """No connection was established before the deadline."""


class NatNotTraversable(PunchError):
    """No direct method can work for this pair of NATs (the relay is the way)."""


class RelayError(HolePunchError):
    """A relay (built-in or TURN) refused, expired or failed."""


class SignalingError(HolePunchError):
    """The rendezvous server refused a request; ``code`` is the wire error code."""

    def __init__(self, message: str, *, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


class AuthenticationError(HolePunchError):
    """A key, signature, token or certificate did not match what was expected."""


class QuotaError(HolePunchError):
    """A per-key or per-address bound was reached (e.g. names one key may hold)."""


class AddressError(HolePunchError, ValueError):
    """Text or a tuple that is not a usable ``host:port`` / ``[v6]:port`` address."""


class ConfigDirInUse(HolePunchError):
    """Another running Peer (in this process or another) uses the same config directory:
    they would share one identity, and the server would let the second replace the first."""

    def __init__(self, message: str, *, path: str) -> None:
        super().__init__(message)
        self.path = path


class PortMapError(HolePunchError):
    """A router refused a port mapping or failed to make one (NAT-PMP, PCP, UPnP IGD).

    ``protocol`` is "pcp", "nat-pmp" or "upnp"; ``code`` the router's result/error code
    (PCP/NAT-PMP result code, UPnP errorCode, HTTP status), None when it did not answer."""

    def __init__(self, message: str, *, protocol: str = "", code: int | None = None) -> None:
        super().__init__(message)
        self.protocol = protocol
        self.code = code


class PortMapUnavailable(PortMapError, TimeoutError):
    """No router on the path answered any port-mapping protocol within the budget."""


class LabError(HolePunchError):
    """The NAT lab cannot be built here (not root, no nft, no netns) or failed to build."""


class ApiSetupError(HolePunchError):
    """The HTTP API cannot start as configured (listen address, token file)."""


class ApiError(HolePunchError):
    """An HTTP API request fails: ``status`` (4xx/5xx) and a short ``code`` for the JSON body."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


__all__ = [
    "AddressError",
    "ApiError",
    "ApiSetupError",
    "AuthenticationError",
    "ConfigDirInUse",
    "HolePunchError",
    "LabError",
    "LocalProtocolError",
    "NatNotTraversable",
    "PortMapError",
    "PortMapUnavailable",
    "ProtocolError",
    "PunchError",
    "QuotaError",
    "PunchTimeout",
    "RelayError",
    "RemoteProtocolError",
    "SignalingError",
    "TransactionError",
    "TransactionFailed",
    "TransactionTimeout",
]
