"""STUN (RFC 8489) with the RFC 5780 NAT-behaviour extensions.

``codec`` is sans-IO (messages, attribute table, integrity, fingerprint, TCP framing);
``server`` and ``client`` are the asyncio drivers (the classification probes that use them
are ``pyholepunch.nat.probe``).
"""
from .client import BindingResult, StunTcpConnection, StunUdpClient, stun_binding
from .codec import AttrType, ChangeRequest, ErrorCode, MessageClass, Method, StunMessage
from .server import StunServer

__all__ = [
    "AttrType",
    "BindingResult",
    "ChangeRequest",
    "ErrorCode",
    "MessageClass",
    "Method",
    "StunMessage",
    "StunServer",
    "StunTcpConnection",
    "StunUdpClient",
    "stun_binding",
]
