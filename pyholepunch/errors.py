"""Every exception pyholepunch raises, in one place.

OS failures stay built-in (ConnectionRefusedError, TimeoutError, PermissionError, ...).
Exceptions carry their data as attributes; messages are short and name the offending value.
"""
from __future__ import annotations

from typing import Any


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


class OfferError(RemoteProtocolError):
    """A punch offer (``pyholepunch.Punch``) that cannot be used: another version, truncated or
    garbled bytes, a field out of bounds, a candidate in a forbidden range. ``field`` names the
    offending part."""


class StaleOffer(OfferError):
    """A punch offer too old (or dated too far ahead) to use, or one already used: a replay."""


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
    """A punch attempt failed; ``stats`` holds what the engine saw (an engine ``PunchStats``;
    typed loosely because errors.py is the package's bottom and imports nothing of it)."""

    def __init__(self, message: str, stats: Any = None) -> None:
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


class StartFailed(SignalingError):
    """A peer could not start with its rendezvous server: ``step`` is the step that failed
    (``signaling``, ``classify``, ``announce``, ``register``), ``reason`` what went wrong and
    ``advice`` what a person can do about it; ``code`` is the server's error code, if it sent
    one. The original exception is ``__cause__``."""

    def __init__(self, message: str, *, step: str, reason: str = "", advice: str = "",
                 code: int = 0) -> None:
        super().__init__(message, code=code)
        self.step, self.reason, self.advice = step, reason, advice


class StartTimeout(StartFailed, TimeoutError):
    """A start step got no answer in time (the CLI's exit code 4, like every timeout)."""


class Refusal(SignalingError):
    """The rendezvous server refusing one request of a peer (server side; it becomes an ERROR
    frame with ``code``, and ``fatal`` closes that peer's connection)."""

    def __init__(self, code: int, reason: str, *, session: str | None = None,
                 fatal: bool = True) -> None:
        super().__init__(reason, code=code)
        self.reason, self.session, self.fatal = reason, session, fatal


class AuthenticationError(HolePunchError):
    """A key, signature, token or certificate did not match what was expected."""


class QuotaError(HolePunchError):
    """A per-key or per-address bound was reached (e.g. names one key may hold)."""


class AddressError(HolePunchError, ValueError):
    """Text or a tuple that is not a usable ``host:port`` / ``[v6]:port`` address."""


class ProcessError(HolePunchError):
    """A child process (a server, a peer) did not come up or did not do its part; the message
    shows what it said last."""


class StateError(HolePunchError, RuntimeError):
    """An object was used in a state that does not allow it (a server not started, a client
    already closed): a bug in the caller."""


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


class StrategyError(HolePunchError, ValueError):
    """A ``strategies=[...]`` choice naming an unknown step kind, or none the plan has."""


class UsageError(HolePunchError):
    """A mistake in a command line found after parsing (the CLI exits 2, with one line)."""


class StreamFailed(HolePunchError):
    """The byte stream between two connect/listen commands did not end cleanly (the message
    says how)."""


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
    "OfferError",
    "PortMapError",
    "PortMapUnavailable",
    "ProcessError",
    "ProtocolError",
    "PunchError",
    "PunchTimeout",
    "QuotaError",
    "Refusal",
    "RelayError",
    "RemoteProtocolError",
    "SignalingError",
    "StaleOffer",
    "StartFailed",
    "StartTimeout",
    "StateError",
    "StrategyError",
    "StreamFailed",
    "TransactionError",
    "TransactionFailed",
    "TransactionTimeout",
    "UsageError",
]
