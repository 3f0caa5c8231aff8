"""NAT-PMP (RFC 6886), sans-IO: requests as bytes, responses parsed into dataclasses.

Every message goes to the gateway's UDP port 5351. Version 0; opcode 0 asks the external
address, 1/2 map a UDP/TCP port for a lifetime (0 deletes). A response echoes the opcode + 128,
a result code and the gateway's epoch (seconds since its mapping table started: a value that
went back means the router lost every mapping, see ``epoch.epoch_lost``).
"""
from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from enum import IntEnum

from ..errors import LocalProtocolError, RemoteProtocolError
from ._wire import PORT as PORT  # noqa: F401  (re-exported: one port for both protocols)
from ._wire import RESPONSE_BIT as RESPONSE_BIT  # noqa: F401
from ._wire import code_name, response_opcode

VERSION = 0
MAX_LIFETIME = 0xFFFFFFFF


class Opcode(IntEnum):
    EXTERNAL_ADDRESS = 0
    MAP_UDP = 1
    MAP_TCP = 2


class Result(IntEnum):
    SUCCESS = 0
    UNSUPPORTED_VERSION = 1
    NOT_AUTHORIZED = 2          # refused (e.g. mapping disabled by the administrator)
    NETWORK_FAILURE = 3         # e.g. no external address yet
    OUT_OF_RESOURCES = 4
    UNSUPPORTED_OPCODE = 5


def result_name(code: int) -> str:
    return code_name(Result, code)


def map_opcode(transport: str) -> Opcode:
    if transport == "tcp":
        return Opcode.MAP_TCP
    if transport == "udp":
        return Opcode.MAP_UDP
    raise LocalProtocolError(f"NAT-PMP maps tcp or udp, not {transport!r}")


def encode_external_address_request() -> bytes:
    return struct.pack("!BB", VERSION, Opcode.EXTERNAL_ADDRESS)


def encode_map_request(transport: str, internal_port: int, external_port: int, lifetime: int) -> bytes:
    """Map (or with ``lifetime`` 0 and ``external_port`` 0: delete) ``internal_port``."""
    if not 1 <= internal_port <= 0xFFFF:
        raise LocalProtocolError(f"bad internal port {internal_port}")
    if not 0 <= external_port <= 0xFFFF:
        raise LocalProtocolError(f"bad external port {external_port}")
    if not 0 <= lifetime <= MAX_LIFETIME:
        raise LocalProtocolError(f"bad lifetime {lifetime}")
    return struct.pack("!BBHHHI", VERSION, map_opcode(transport), 0, internal_port, external_port,
                       lifetime)


@dataclass(frozen=True)
class NatPmpResponse:
    opcode: Opcode              # of the request this answers
    result: int
    epoch: int
    external_ip: str | None = None       # EXTERNAL_ADDRESS
    internal_port: int | None = None     # MAP_*
    external_port: int | None = None
    lifetime: int | None = None

    @property
    def ok(self) -> bool:
        return self.result == Result.SUCCESS


def parse_response(data: bytes) -> NatPmpResponse:
    """A NAT-PMP response; RemoteProtocolError names what is wrong with bad bytes.

    A non-zero result may come as the 8-byte header alone (e.g. UNSUPPORTED_VERSION from a
    router answering a request of a version it does not speak)."""
    if len(data) < 8:
        raise RemoteProtocolError(f"NAT-PMP response of {len(data)} bytes (at least 8)")
    version, op, result, epoch = struct.unpack_from("!BBHI", data)
    opcode = response_opcode("NAT-PMP", version, VERSION, op, Opcode)
    if result != Result.SUCCESS:
        return NatPmpResponse(opcode, result, epoch)
    if opcode is Opcode.EXTERNAL_ADDRESS:
        if len(data) < 12:
            raise RemoteProtocolError(f"NAT-PMP external address response of {len(data)} bytes (12)")
        ip = str(ipaddress.IPv4Address(data[8:12]))
        return NatPmpResponse(opcode, result, epoch, external_ip=ip)
    if len(data) < 16:
        raise RemoteProtocolError(f"NAT-PMP mapping response of {len(data)} bytes (16)")
    internal, external, lifetime = struct.unpack_from("!HHI", data, 8)
    if internal == 0:
        raise RemoteProtocolError("NAT-PMP mapping response for internal port 0", field="port")
    return NatPmpResponse(opcode, result, epoch, internal_port=internal, external_port=external,
                          lifetime=lifetime)
