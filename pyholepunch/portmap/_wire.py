"""What NAT-PMP (RFC 6886) and PCP (RFC 6887) share on the wire: one port, a version byte, the
response bit on the opcode and a result code. Sans-IO, used by ``natpmp`` and ``pcp``."""
from __future__ import annotations

from enum import IntEnum
from typing import TypeVar

from ..errors import RemoteProtocolError

PORT = 5351
RESPONSE_BIT = 0x80

_Op = TypeVar("_Op", bound=IntEnum)


def code_name(codes: type[IntEnum], code: int) -> str:
    """The enum name of a result ``code`` (``NOT_AUTHORIZED``), else ``result N``."""
    try:
        return codes(code).name
    except ValueError:
        return f"result {code}"


def response_opcode(protocol: str, version: int, expected: int, op: int, opcodes: type[_Op]) -> _Op:
    """Check a response header's ``version`` and ``op`` byte; the opcode it answers."""
    if version != expected:
        raise RemoteProtocolError(f"{protocol} response of version {version}", field="version")
    if not op & RESPONSE_BIT:
        raise RemoteProtocolError(f"{protocol} request opcode {op} where a response was expected",
                                  field="opcode")
    try:
        return opcodes(op & ~RESPONSE_BIT)
    except ValueError:
        raise RemoteProtocolError(f"unknown {protocol} opcode {op & ~RESPONSE_BIT}",
                                  field="opcode") from None
