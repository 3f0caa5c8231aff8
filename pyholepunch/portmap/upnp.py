"""UPnP IGD v1/v2, sans-IO: SSDP discovery, the device description, SOAP actions, and the
minimal HTTP/1.1 they ride on. XML is parsed by defusedxml with DTDs forbidden: an IGD
description or SOAP reply never needs one, and a DTD is where entity bombs and external
entities live.

Actions used: WANIPConnection (v1/v2; WANPPPConnection:1 alike) AddPortMapping,
AddAnyPortMapping (v2: the router picks a free port), GetExternalIPAddress,
DeletePortMapping; WANIPv6FirewallControl:1 AddPinhole, UpdatePinhole, DeletePinhole.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit
from xml.sax.saxutils import escape

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import fromstring

from ..address import format_address
from ..errors import LocalProtocolError, PortMapError, RemoteProtocolError

SSDP_PORT = 1900
SSDP_MULTICAST = "239.255.255.250"
IGD_DEVICE = "urn:schemas-upnp-org:device:InternetGatewayDevice:1"
WAN_SERVICES = ("urn:schemas-upnp-org:service:WANIPConnection:2",
                "urn:schemas-upnp-org:service:WANIPConnection:1",
                "urn:schemas-upnp-org:service:WANPPPConnection:1")
PINHOLE_SERVICE = "urn:schemas-upnp-org:service:WANIPv6FirewallControl:1"
MAX_SSDP = 2048
MAX_BODY = 64 * 1024
MAX_HEADER = 8 * 1024
SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"
CONTROL_NS = "urn:schemas-upnp-org:control-1-0"

# UPnP error codes a client acts on
CONFLICT_IN_MAPPING = 718
ONLY_PERMANENT_LEASES = 725
NO_SUCH_ENTRY = 714


def encode_msearch(st: str = IGD_DEVICE, *, host: str = SSDP_MULTICAST, mx: int = 1) -> bytes:
    return (f"M-SEARCH * HTTP/1.1\r\nHOST: {host}:{SSDP_PORT}\r\nST: {st}\r\n"
            f'MAN: "ssdp:discover"\r\nMX: {mx}\r\n\r\n').encode()


def _headers(lines: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if not sep or not name.strip() or name != name.strip():
            raise RemoteProtocolError(f"bad header line {line[:60]!r}", field="header")
        out[name.strip().lower()] = value.strip()
    return out


@dataclass(frozen=True)
class SsdpResponse:
    location: str
    st: str
    usn: str
    server: str


def parse_ssdp_response(data: bytes) -> SsdpResponse:
    """An M-SEARCH answer (HTTP/1.1 200 with a LOCATION)."""
    if len(data) > MAX_SSDP:
        raise RemoteProtocolError(f"SSDP answer of {len(data)} bytes (at most {MAX_SSDP})")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise RemoteProtocolError("SSDP answer is not ASCII") from None
    lines = text.split("\r\n")
    status = lines[0].split(" ", 2)
    if len(status) < 2 or not status[0].startswith("HTTP/1.") or status[1] != "200":
        raise RemoteProtocolError(f"not an SSDP answer: {lines[0][:60]!r}", field="status")
    end = lines.index("") if "" in lines else len(lines)
    headers = _headers(lines[1:end])
    location = headers.get("location", "")
    check_url(location)
    return SsdpResponse(location, headers.get("st", ""), headers.get("usn", ""),
                        headers.get("server", ""))


def check_url(url: str) -> tuple[str, int, str]:
    """(host, port, path) of an http:// URL with an IP-literal host; else RemoteProtocolError."""
    try:
        parts = urlsplit(url)
        port = parts.port or 80
    except ValueError:
        raise RemoteProtocolError(f"bad URL {url[:80]!r}", field="url") from None
    if parts.scheme != "http" or not parts.hostname:
        raise RemoteProtocolError(f"not an http:// URL: {url[:80]!r}", field="url")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return parts.hostname, port, path


def parse_xml(body: bytes, what: str) -> ET.Element:
    if len(body) > MAX_BODY:
        raise RemoteProtocolError(f"{what} of {len(body)} bytes (at most {MAX_BODY})")
    try:
        return fromstring(body, forbid_dtd=True)
    except DefusedXmlException as exc:
        raise RemoteProtocolError(f"{what} refused: {type(exc).__name__} (no DTDs or entities)",
                                  field="xml") from None
    except (ET.ParseError, ValueError) as exc:
        raise RemoteProtocolError(f"{what} is not well-formed XML: {exc}", field="xml") from None


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


@dataclass(frozen=True)
class Service:
    service_type: str
    control_url: str            # absolute

    @property
    def version(self) -> int:
        tail = self.service_type.rsplit(":", 1)[-1]
        return int(tail) if tail.isdigit() else 1


def parse_description(body: bytes, location: str) -> list[Service]:
    """Every WAN connection / IPv6 firewall service of an IGD description, best first."""
    root = parse_xml(body, "IGD description")
    base = location
    found: dict[str, Service] = {}
    for el in root.iter():
        if _local(el.tag) == "URLBase" and el.text:
            base = el.text.strip()
    for el in root.iter():
        if _local(el.tag) != "service":
            continue
        fields = {_local(c.tag): (c.text or "").strip() for c in el}
        stype, control = fields.get("serviceType", ""), fields.get("controlURL", "")
        if stype in WAN_SERVICES + (PINHOLE_SERVICE,) and control and stype not in found:
            url = urljoin(base, control)
            check_url(url)
            found[stype] = Service(stype, url)
    order = WAN_SERVICES + (PINHOLE_SERVICE,)
    return [found[s] for s in order if s in found]


def encode_soap(service_type: str, action: str, args: list[tuple[str, str]]) -> bytes:
    if not action.isalnum():
        raise LocalProtocolError(f"bad SOAP action {action!r}")
    inner = "".join(f"<{k}>{escape(v)}</{k}>" for k, v in args)
    return ('<?xml version="1.0"?>\r\n'
            f'<s:Envelope xmlns:s="{SOAP_ENV}" s:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/">'
            f'<s:Body><u:{action} xmlns:u="{escape(service_type)}">{inner}</u:{action}></s:Body>'
            "</s:Envelope>\r\n").encode()


def parse_soap_response(status: int, body: bytes, action: str) -> dict[str, str]:
    """The out-arguments of ``action``'s response; PortMapError(code=UPnP errorCode) for a
    SOAP fault, RemoteProtocolError for anything else that is not a response to ``action``."""
    root = parse_xml(body, f"{action} response")
    body_el = next((el for el in root if _local(el.tag) == "Body"), None)
    if _local(root.tag) != "Envelope" or body_el is None or not len(body_el):
        raise RemoteProtocolError(f"{action}: not a SOAP envelope with a body", field="soap")
    first = body_el[0]
    if _local(first.tag) == "Fault":
        code, desc = None, ""
        for el in first.iter():
            if _local(el.tag) == "errorCode" and (el.text or "").strip().isdigit():
                code = int((el.text or "").strip())
            elif _local(el.tag) == "errorDescription":
                desc = (el.text or "").strip()
        raise PortMapError(f"UPnP {action} refused: {code} {desc}".strip(), protocol="upnp",
                           code=code)
    if status != 200 or _local(first.tag) != f"{action}Response":
        raise RemoteProtocolError(f"{action}: HTTP {status}, <{_local(first.tag)}> in the body",
                                  field="soap")
    return {_local(el.tag): (el.text or "").strip() for el in first}


def encode_http_request(method: str, url: str, *, body: bytes = b"",
                        headers: dict[str, str] | None = None) -> bytes:
    host, port, path = check_url(url)
    lines = [f"{method} {path} HTTP/1.1", f"Host: {format_address((host, port))}", "Connection: close",
             "User-Agent: pyholepunch UPnP/1.1"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def parse_http_response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of a complete HTTP/1.x response read until the server closed."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep or len(head) > MAX_HEADER:
        raise RemoteProtocolError("HTTP response without a complete header", field="http")
    lines = head.decode("latin-1").split("\r\n")
    status = lines[0].split(" ", 2)
    if len(status) < 2 or not status[0].startswith("HTTP/1.") or not status[1].isdigit():
        raise RemoteProtocolError(f"not an HTTP response: {lines[0][:60]!r}", field="http")
    headers = _headers(lines[1:])
    if headers.get("transfer-encoding", "").lower() == "chunked":
        rest = _dechunk(rest)
    elif (length := headers.get("content-length", "")).isdigit():
        if len(rest) < int(length):
            raise RemoteProtocolError(f"HTTP body of {len(rest)} bytes, {length} announced",
                                      field="http")
        rest = rest[:int(length)]
    if len(rest) > MAX_BODY:
        raise RemoteProtocolError(f"HTTP body of {len(rest)} bytes (at most {MAX_BODY})")
    return int(status[1]), headers, rest


def _dechunk(data: bytes) -> bytes:
    out, pos = bytearray(), 0
    while True:
        end = data.find(b"\r\n", pos)
        if end < 0:
            raise RemoteProtocolError("truncated chunked body", field="http")
        size_text = data[pos:end].split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise RemoteProtocolError(f"bad chunk size {size_text[:16]!r}", field="http") from None
        if size == 0:
            return bytes(out)
        if end + 2 + size > len(data) or len(out) + size > MAX_BODY:
            raise RemoteProtocolError("chunk overruns the body", field="http")
        out += data[end + 2:end + 2 + size]
        pos = end + 2 + size + 2
