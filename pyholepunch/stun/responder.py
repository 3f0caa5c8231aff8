"""Sans-IO STUN Binding responder with RFC 5780 CHANGE-REQUEST support.

``Responder.answer(data, local, remote)`` decides what to send back and *from which of the
server's addresses*; the asyncio driver (server.py) only moves bytes. The server has up to
two IPs x two ports; ``local`` says which one the request reached.
"""
from __future__ import annotations

import ipaddress
import logging
import struct
from dataclasses import dataclass

from ..errors import ProtocolError
from .codec import (
    HEADER_SIZE,
    MAGIC_COOKIE,
    Address,
    AttrType,
    ChangeRequest,
    ErrorCode,
    MessageClass,
    Method,
    StunMessage,
    error_response,
    split_message_type,
)

log = logging.getLogger(__name__)

# Comprehension-required attributes this server understands but does not honour.
_UNSUPPORTED = (AttrType.RESPONSE_PORT,)


@dataclass(frozen=True, slots=True)
class Layout:
    """The server's addresses: ``ips[0]``/``ports[0]`` primary, index 1 alternate (or None)."""

    ips: tuple[str, str | None]
    ports: tuple[int, int | None]

    def locate(self, local: Address) -> tuple[int, int] | None:
        """(ip index, port index) of ``local``, or None when it is none of ours."""
        host, port = local
        ip_idx = next((i for i, ip in enumerate(self.ips)
                       if ip is not None and (ip == host or _unspecified(ip))), None)
        port_idx = next((i for i, p in enumerate(self.ports) if p == port), None)
        if ip_idx is None or port_idx is None:
            return None
        return ip_idx, port_idx

    def address(self, ip_idx: int, port_idx: int) -> Address | None:
        ip, port = self.ips[ip_idx], self.ports[port_idx]
        if ip is None or port is None:
            return None
        return (ip, port)

    def changed(self, local: Address, change: ChangeRequest) -> Address | None:
        """The address a CHANGE-REQUEST answer must leave from, or None if we lack it."""
        where = self.locate(local)
        if where is None:
            return None
        ip_idx, port_idx = where
        if change.change_ip:
            ip_idx = 1 - ip_idx
        if change.change_port:
            port_idx = 1 - port_idx
        return self.address(ip_idx, port_idx)

    def other(self, local: Address) -> Address | None:
        """OTHER-ADDRESS (RFC 5780 §7.4): differs in IP and port; needs both alternates."""
        if self.ips[1] is None or self.ports[1] is None:
            return None
        where = self.locate(local)
        if where is None:
            return None
        return self.address(1 - where[0], 1 - where[1])

    def all(self) -> list[Address]:
        out = []
        for i in (0, 1):
            for p in (0, 1):
                addr = self.address(i, p)
                if addr is not None:
                    out.append(addr)
        return out


def _unspecified(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_unspecified
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class Reply:
    data: bytes
    source: Address          # which of our addresses must send it
    changed: bool            # True when it must leave from another address than it came to
    request: StunMessage | None = None


class Responder:
    def __init__(self, layout: Layout, *, software: str | None = "pyholepunch",
                 other_family: Address | None = None) -> None:
        self.layout = layout
        self.software = software
        self.other_family = other_family   # sent as OTHER-FAMILY-ADDRESS (dual-stack server)

    def answer(self, data: bytes, local: Address, remote: Address) -> Reply | None:
        """The reply to one datagram/frame, or None to drop it silently."""
        try:
            req = StunMessage.parse(data)
        except ProtocolError as exc:
            log.debug("bad STUN from %s: %s", remote, exc)
            return self._reject_unparsable(data, local, exc)
        if req.cls is not MessageClass.REQUEST:
            return None                       # indications and stray responses: drop
        if req.method != Method.BINDING:
            return self._error(req, local, ErrorCode.BAD_REQUEST, "Unsupported Method")
        unknown = list(req.unknown_required) + [t for t in _UNSUPPORTED if t in req]
        if unknown:
            return self._error(req, local, ErrorCode.UNKNOWN_ATTRIBUTE, unknown=unknown)
        change = req.get(AttrType.CHANGE_REQUEST, ChangeRequest())
        source = local
        if change.change_ip or change.change_port:
            alt = self.layout.changed(local, change)
            if alt is None:   # RFC 5780 §6.1: no such alternate -> 420
                return self._error(req, local, ErrorCode.UNKNOWN_ATTRIBUTE,
                                   unknown=[AttrType.CHANGE_REQUEST])
            source = alt
        resp = StunMessage(Method.BINDING, MessageClass.SUCCESS, req.transaction_id)
        resp.add(AttrType.XOR_MAPPED_ADDRESS, remote)
        resp.add(AttrType.MAPPED_ADDRESS, remote)
        if not _unspecified(source[0]):
            resp.add(AttrType.RESPONSE_ORIGIN, source)
        other = self.layout.other(source)
        if other is not None:
            resp.add(AttrType.OTHER_ADDRESS, other)
        if self.other_family is not None:
            resp.add(AttrType.OTHER_FAMILY_ADDRESS, self.other_family)
        if self.software:
            resp.add(AttrType.SOFTWARE, self.software)
        return Reply(resp.encode(fingerprint=True), source, source != local, req)

    def _error(self, req: StunMessage, local: Address, code: int, reason: str = "", *,
               unknown: list[int] | None = None) -> Reply:
        resp = error_response(req, code, reason, unknown=unknown or (), software=self.software)
        return Reply(resp.encode(fingerprint=True), local, False, req)

    def _reject_unparsable(self, data: bytes, local: Address, exc: ProtocolError) -> Reply | None:
        """400 to what is clearly a Binding request with a bad body; drop everything else
        (answering non-STUN noise would make us a reflector)."""
        if len(data) < HEADER_SIZE or exc.field in ("header", "magic cookie", "message type"):
            return None
        mtype, _, cookie = struct.unpack_from("!HHI", data)
        if cookie != MAGIC_COOKIE or split_message_type(mtype) != (Method.BINDING, MessageClass.REQUEST):
            return None
        req = StunMessage(Method.BINDING, MessageClass.REQUEST, bytes(data[8:20]))
        reason = f"bad {exc.field}" if exc.field else "Bad Request"
        return self._error(req, local, exc.code if 400 <= exc.code < 500 else 400, reason[:100])
