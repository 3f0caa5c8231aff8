"""Fuzzing the port-mapping parsers: whatever a router (or anyone on the LAN) sends, a parser
returns a result or raises RemoteProtocolError (a SOAP fault: PortMapError) — never anything
else, so the mapper logs it and the connection proceeds by punching."""
from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from pyholepunch.errors import PortMapError, RemoteProtocolError
from pyholepunch.portmap import natpmp, pcp, upnp

DATA = Path(__file__).parent.parent / "data" / "portmap"
SEEDS = {name: (DATA / name).read_bytes() for name in (
    "natpmp_map_tcp.bin", "natpmp_external_address.bin", "pcp_map_tcp.bin", "pcp_announce.bin",
    "ssdp_response.bin", "igd_description.http", "soap_fault_718.http",
    "soap_get_external_ip.http")}


def mutated(seed: bytes) -> st.SearchStrategy[bytes]:
    """The seed with a few bytes flipped, cut or extended."""
    return st.tuples(st.lists(st.tuples(st.integers(0, max(len(seed) - 1, 0)), st.integers(0, 255)),
                              max_size=6),
                     st.integers(0, len(seed)), st.binary(max_size=16)).map(
        lambda t: _apply(seed, *t))


def _apply(seed: bytes, flips: list[tuple[int, int]], cut: int, tail: bytes) -> bytes:
    b = bytearray(seed)
    for i, v in flips:
        if i < len(b):
            b[i] = v
    return bytes(b[:cut]) + tail


def _natpmp(data: bytes) -> None:
    try:
        natpmp.parse_response(data)
    except RemoteProtocolError:
        pass


def _pcp(data: bytes) -> None:
    try:
        pcp.parse_response(data)
    except RemoteProtocolError:
        pass


def _http_soap(data: bytes) -> None:
    try:
        status, _, body = upnp.parse_http_response(data)
        upnp.parse_soap_response(status, body, "GetExternalIPAddress")
    except (RemoteProtocolError, PortMapError):
        pass


def _description(data: bytes) -> None:
    try:
        _, _, body = upnp.parse_http_response(data)
        upnp.parse_description(body, "http://10.0.1.1:5555/rootDesc.xml")
    except RemoteProtocolError:
        pass


def _ssdp(data: bytes) -> None:
    try:
        upnp.parse_ssdp_response(data)
    except RemoteProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=80), mutated(SEEDS["natpmp_map_tcp.bin"]),
                 mutated(SEEDS["natpmp_external_address.bin"])))
def test_natpmp_parser(data: bytes) -> None:
    _natpmp(data)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=200), mutated(SEEDS["pcp_map_tcp.bin"]),
                 mutated(SEEDS["pcp_announce.bin"])))
def test_pcp_parser(data: bytes) -> None:
    _pcp(data)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.binary(max_size=600), mutated(SEEDS["ssdp_response.bin"])))
def test_ssdp_parser(data: bytes) -> None:
    _ssdp(data)


@settings(max_examples=200, deadline=None)
@given(st.one_of(mutated(SEEDS["soap_fault_718.http"]), mutated(SEEDS["soap_get_external_ip.http"]),
                 st.binary(max_size=300)))
def test_soap_parser(data: bytes) -> None:
    _http_soap(data)


@settings(max_examples=150, deadline=None)
@given(mutated(SEEDS["igd_description.http"]))
def test_description_parser(data: bytes) -> None:
    _description(data)
