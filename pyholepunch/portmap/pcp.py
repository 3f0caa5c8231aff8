"""PCP, the Port Control Protocol (RFC 6887), sans-IO: ANNOUNCE and MAP for IPv4 and IPv6.

Requests go to the gateway's UDP port 5351 (the NAT-PMP port: a router speaking only NAT-PMP
answers a PCP request with NAT-PMP's UNSUPPORTED_VERSION). Every address on the wire is 16
bytes, IPv4 as IPv4-mapped IPv6. A MAP request carries a random 12-byte nonce that the router
binds to the mapping: renewing or deleting it (lifetime 0) needs the same nonce. A response
has the request's opcode with the R bit, a result code, the granted lifetime and the server's
epoch (see ``epoch``). An IPv6 MAP opens a pinhole in the router's firewall.
"""
from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field
from enum import IntEnum

from ..errors import LocalProtocolError, RemoteProtocolError
from ._wire import PORT as PORT  # noqa: F401  (re-exported: one port for both protocols)
from ._wire import RESPONSE_BIT as RESPONSE_BIT  # noqa: F401
from ._wire import code_name, response_opcode

VERSION = 2
HEADER_LEN = 24
MAP_LEN = 36
MAX_MESSAGE = 1100
NONCE_LEN = 12
PROTOCOLS = {"tcp": 6, "udp": 17}
MAX_LIFETIME = 0xFFFFFFFF


class Opcode(IntEnum):
    ANNOUNCE = 0
    MAP = 1
    PEER = 2


class Result(IntEnum):
    SUCCESS = 0
    UNSUPP_VERSION = 1
    NOT_AUTHORIZED = 2
    MALFORMED_REQUEST = 3
    UNSUPP_OPCODE = 4
    UNSUPP_OPTION = 5
    MALFORMED_OPTION = 6
    NETWORK_FAILURE = 7
    NO_RESOURCES = 8
    UNSUPP_PROTOCOL = 9
    USER_EX_QUOTA = 10
    CANNOT_PROVIDE_EXTERNAL = 11
    ADDRESS_MISMATCH = 12
    EXCESSIVE_REMOTE_PEERS = 13


class OptionCode(IntEnum):
    THIRD_PARTY = 1
    PREFER_FAILURE = 2
    FILTER = 3


def result_name(code: int) -> str:
    return code_name(Result, code)


def pack_ip(ip: str) -> bytes:
    """16 bytes: IPv6 as is, IPv4 as IPv4-mapped (``::ffff:a.b.c.d``)."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        raise LocalProtocolError(f"not an IP address: {ip!r}") from None
    if isinstance(addr, ipaddress.IPv4Address):
        return b"\x00" * 10 + b"\xff\xff" + addr.packed
    return addr.packed


def unpack_ip(data: bytes) -> str:
    addr = ipaddress.IPv6Address(data)
    mapped = addr.ipv4_mapped
    return str(mapped) if mapped is not None else str(addr)


def any_address(family_of_ip: str) -> str:
    """The all-zeros "no preference" address of ``family_of_ip``'s family."""
    return "::" if ":" in family_of_ip else "0.0.0.0"


def _header(opcode: Opcode, lifetime: int, client_ip: str) -> bytes:
    if not 0 <= lifetime <= MAX_LIFETIME:
        raise LocalProtocolError(f"bad lifetime {lifetime}")
    return struct.pack("!BBHI", VERSION, opcode, 0, lifetime) + pack_ip(client_ip)


def encode_announce(client_ip: str) -> bytes:
    """ANNOUNCE: no payload; the answer tells the router speaks PCP, and its epoch."""
    return _header(Opcode.ANNOUNCE, 0, client_ip)


def encode_map(*, client_ip: str, nonce: bytes, transport: str, internal_port: int,
               external_port: int = 0, external_ip: str | None = None, lifetime: int,
               prefer_failure: bool = False) -> bytes:
    """MAP ``internal_port`` of ``client_ip`` (IPv4: a NAT mapping; IPv6: a firewall pinhole).

    ``external_port``/``external_ip`` are suggestions (0 / None: any); ``lifetime`` 0 deletes
    the mapping of this nonce. ``prefer_failure``: fail rather than take another port."""
    if len(nonce) != NONCE_LEN:
        raise LocalProtocolError(f"a PCP nonce is {NONCE_LEN} bytes, got {len(nonce)}")
    if transport not in PROTOCOLS:
        raise LocalProtocolError(f"PCP maps tcp or udp, not {transport!r}")
    if not 1 <= internal_port <= 0xFFFF or not 0 <= external_port <= 0xFFFF:
        raise LocalProtocolError(f"bad port {internal_port}/{external_port}")
    suggested = external_ip if external_ip is not None else any_address(client_ip)
    body = nonce + struct.pack("!B3xHH", PROTOCOLS[transport], internal_port, external_port) \
        + pack_ip(suggested)
    options = struct.pack("!BBH", OptionCode.PREFER_FAILURE, 0, 0) if prefer_failure else b""
    return _header(Opcode.MAP, lifetime, client_ip) + body + options


@dataclass(frozen=True)
class PcpOption:
    code: int
    data: bytes


@dataclass(frozen=True)
class PcpResponse:
    opcode: Opcode
    result: int
    lifetime: int
    epoch: int
    nonce: bytes = b""                   # MAP
    protocol: int = 0
    internal_port: int = 0
    external_port: int = 0
    external_ip: str = ""
    options: tuple[PcpOption, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return self.result == Result.SUCCESS


def parse_response(data: bytes) -> PcpResponse:
    """A PCP response; RemoteProtocolError names what is wrong with bad bytes."""
    if len(data) < HEADER_LEN or len(data) > MAX_MESSAGE or len(data) % 4:
        raise RemoteProtocolError(f"PCP response of {len(data)} bytes (24..1100, a multiple of 4)")
    version, op, result, lifetime, epoch = struct.unpack_from("!BBxBII", data)
    opcode = response_opcode("PCP", version, VERSION, op, Opcode)
    offset = HEADER_LEN
    fields: dict[str, object] = {}
    if opcode is Opcode.MAP and (result == Result.SUCCESS or len(data) >= HEADER_LEN + MAP_LEN):
        if len(data) < HEADER_LEN + MAP_LEN:
            raise RemoteProtocolError(f"PCP MAP response of {len(data)} bytes (at least 60)")
        nonce = data[offset:offset + NONCE_LEN]
        proto, internal, external = struct.unpack_from("!B3xHH", data, offset + NONCE_LEN)
        ext_ip = unpack_ip(data[offset + 20:offset + 36])
        fields = {"nonce": nonce, "protocol": proto, "internal_port": internal,
                  "external_port": external, "external_ip": ext_ip}
        offset += MAP_LEN
    elif opcode is Opcode.PEER:
        raise RemoteProtocolError("unexpected PCP PEER response (we send no PEER)", field="opcode")
    options = []
    while offset < len(data):
        if offset + 4 > len(data):
            raise RemoteProtocolError("truncated PCP option header", field="options")
        code, length = struct.unpack_from("!BxH", data, offset)
        end = offset + 4 + length
        if end > len(data):
            raise RemoteProtocolError(f"PCP option {code} of {length} bytes overruns the message",
                                      field="options")
        options.append(PcpOption(code, bytes(data[offset + 4:end])))
        offset = end + (-length % 4)
    return PcpResponse(opcode, result, lifetime, epoch, options=tuple(options),
                       **fields)  # type: ignore[arg-type]
