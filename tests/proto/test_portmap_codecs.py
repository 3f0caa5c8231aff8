"""The port-mapping codecs on bytes: requests laid out as RFC 6886 / RFC 6887 say, and the
answers a real miniupnpd 2.3.1 gave in the lab (tests/data/portmap/, captured once) parsed."""
from __future__ import annotations

import struct
from pathlib import Path

import pytest

from pyholepunch.errors import LocalProtocolError, PortMapError, RemoteProtocolError
from pyholepunch.portmap import natpmp, pcp, upnp
from pyholepunch.portmap.epoch import EpochSample, epoch_lost
from pyholepunch.portmap.gateway import gateway_for

DATA = Path(__file__).parent.parent / "data" / "portmap"


def data(name: str) -> bytes:
    return (DATA / name).read_bytes()


# -- NAT-PMP --------------------------------------------------------------------------------
def test_natpmp_requests() -> None:
    assert natpmp.encode_external_address_request() == b"\x00\x00"
    assert natpmp.encode_map_request("tcp", 40000, 40001, 7200) == \
        struct.pack("!BBHHHI", 0, 2, 0, 40000, 40001, 7200)
    assert natpmp.encode_map_request("udp", 5, 0, 0)[1] == 1
    with pytest.raises(LocalProtocolError, match="sctp"):
        natpmp.encode_map_request("sctp", 1, 1, 1)
    with pytest.raises(LocalProtocolError, match="internal port 0"):
        natpmp.encode_map_request("tcp", 0, 1, 1)


def test_natpmp_miniupnpd_answers() -> None:
    ext = natpmp.parse_response(data("natpmp_external_address.bin"))
    assert ext.ok and ext.opcode is natpmp.Opcode.EXTERNAL_ADDRESS and ext.external_ip == "198.51.100.2"
    m = natpmp.parse_response(data("natpmp_map_tcp.bin"))
    assert m.ok and m.opcode is natpmp.Opcode.MAP_TCP
    assert (m.internal_port, m.external_port, m.lifetime) == (42000, 42000, 600)
    assert m.epoch == ext.epoch or m.epoch >= ext.epoch


def test_natpmp_errors() -> None:
    short_error = struct.pack("!BBHI", 0, 130, natpmp.Result.NOT_AUTHORIZED, 5)
    r = natpmp.parse_response(short_error)
    assert not r.ok and r.result == 2 and natpmp.result_name(r.result) == "NOT_AUTHORIZED"
    for bad, msg in [(b"\x00\x80\x00", "3 bytes"), (b"\x02" + bytes(11), "version 2"),
                     (b"\x00\x02" + bytes(14), "request opcode"),
                     (b"\x00\x80" + bytes(6), "external address response of 8 bytes"),
                     (b"\x00\x82" + bytes(10), "mapping response of 12 bytes"),
                     (b"\x00\x87" + bytes(14), "unknown NAT-PMP opcode")]:
        with pytest.raises(RemoteProtocolError, match=msg):
            natpmp.parse_response(bad)


# -- PCP ------------------------------------------------------------------------------------
def test_pcp_announce_and_map_layout() -> None:
    a = pcp.encode_announce("10.0.1.2")
    assert len(a) == 24 and a[:8] == b"\x02\x00\x00\x00\x00\x00\x00\x00"
    assert a[8:] == bytes(10) + b"\xff\xff" + bytes([10, 0, 1, 2])
    nonce = bytes(range(12))
    m = pcp.encode_map(client_ip="10.0.1.2", nonce=nonce, transport="tcp", internal_port=40000,
                       external_port=40001, lifetime=7200)
    assert len(m) == 60
    assert m[:8] == struct.pack("!BBHI", 2, 1, 0, 7200)
    assert m[24:36] == nonce and m[36] == 6 and m[37:40] == bytes(3)
    assert struct.unpack("!HH", m[40:44]) == (40000, 40001)
    assert m[44:] == bytes(10) + b"\xff\xff" + bytes(4)          # no preferred external IPv4
    v6 = pcp.encode_map(client_ip="2001:db8::2", nonce=nonce, transport="udp", internal_port=1,
                        lifetime=60, prefer_failure=True)
    assert len(v6) == 64 and v6[36] == 17 and v6[44:60] == bytes(16)   # "::" suggested
    assert v6[8:24] == bytes.fromhex("20010db8000000000000000000000002")
    assert v6[60:] == b"\x02\x00\x00\x00"                          # PREFER_FAILURE
    with pytest.raises(LocalProtocolError, match="nonce"):
        pcp.encode_map(client_ip="10.0.1.2", nonce=b"x", transport="tcp", internal_port=1, lifetime=1)


def test_pcp_miniupnpd_answers() -> None:
    ann = pcp.parse_response(data("pcp_announce.bin"))
    assert ann.ok and ann.opcode is pcp.Opcode.ANNOUNCE
    m = pcp.parse_response(data("pcp_map_tcp.bin"))
    assert m.ok and m.opcode is pcp.Opcode.MAP and m.nonce == bytes(range(12))
    assert (m.protocol, m.internal_port, m.external_port, m.external_ip, m.lifetime) == \
        (6, 42001, 42001, "198.51.100.2", 600)
    refused = pcp.parse_response(data("pcp_map_address_mismatch.bin"))
    assert refused.result == pcp.Result.ADDRESS_MISMATCH and not refused.ok


def test_pcp_options_and_bad_bytes() -> None:
    with_option = data("pcp_map_tcp.bin") + b"\x02\x00\x00\x00" + b"\x03\x00\x00\x02ab\x00\x00"
    r = pcp.parse_response(with_option)
    assert [(o.code, o.data) for o in r.options] == [(2, b""), (3, b"ab")]
    for bad, msg in [(bytes(20), "20 bytes"), (b"\x02\x81" + bytes(22), "of 24 bytes"),
                     (b"\x01\x80" + bytes(22), "version 1"), (b"\x02\x01" + bytes(22), "request"),
                     (b"\x02\x85" + bytes(22), "unknown PCP opcode"),
                     (data("pcp_map_tcp.bin") + b"\x01\x00\x00\x10", "overruns"),
                     (b"\x02\x80" + bytes(22) + b"\x01\x00", "multiple of 4")]:
        with pytest.raises(RemoteProtocolError, match=msg):
            pcp.parse_response(bad)


def test_epoch_rule() -> None:
    first = EpochSample(100.0, 1000)
    assert not epoch_lost(None, first)
    assert not epoch_lost(first, EpochSample(160.0, 1060))        # both moved 60 s
    assert not epoch_lost(first, EpochSample(160.0, 1061))        # within the slack
    assert epoch_lost(first, EpochSample(160.0, 3))               # went back: rebooted
    assert epoch_lost(first, EpochSample(160.0, 1010))            # far behind our clock
    assert epoch_lost(first, EpochSample(110.0, 1300))            # far ahead of it


# -- UPnP -----------------------------------------------------------------------------------
def test_ssdp_and_description_of_miniupnpd() -> None:
    ssdp = upnp.parse_ssdp_response(data("ssdp_response.bin"))
    assert ssdp.location == "http://10.0.1.1:5555/rootDesc.xml"
    assert ssdp.st == upnp.IGD_DEVICE and "MiniUPnPd/2.3.1" in ssdp.server
    status, headers, body = upnp.parse_http_response(data("igd_description.http"))
    assert status == 200 and headers["content-type"].startswith("text/xml")
    services = upnp.parse_description(body, ssdp.location)
    assert services[0] == upnp.Service("urn:schemas-upnp-org:service:WANIPConnection:2",
                                       "http://10.0.1.1:5555/ctl/IPConn")
    assert services[0].version == 2
    assert upnp.encode_msearch(host="10.0.1.1").startswith(b"M-SEARCH * HTTP/1.1\r\nHOST: 10.0.1.1:1900")


def test_soap_of_miniupnpd() -> None:
    status, _, body = upnp.parse_http_response(data("soap_get_external_ip.http"))
    assert upnp.parse_soap_response(status, body, "GetExternalIPAddress") == \
        {"NewExternalIPAddress": "198.51.100.2"}
    status, _, body = upnp.parse_http_response(data("soap_add_port_mapping.http"))
    assert upnp.parse_soap_response(status, body, "AddPortMapping") == {}
    status, _, body = upnp.parse_http_response(data("soap_fault_718.http"))
    with pytest.raises(PortMapError, match="718") as info:
        upnp.parse_soap_response(status, body, "AddPortMapping")
    assert info.value.code == 718 and info.value.protocol == "upnp"
    with pytest.raises(RemoteProtocolError, match="AddPortMapping: HTTP 200"):
        status, _, body = upnp.parse_http_response(data("soap_delete_port_mapping.http"))
        upnp.parse_soap_response(status, body, "AddPortMapping")


def test_soap_request_escapes_values() -> None:
    body = upnp.encode_soap("urn:x:service:WANIPConnection:1", "AddPortMapping",
                            [("NewPortMappingDescription", "<a&b>")])
    assert b"&lt;a&amp;b&gt;" in body and b"<u:AddPortMapping" in body
    with pytest.raises(LocalProtocolError):
        upnp.encode_soap("x", "Add Port", [])


BOMB = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>
<root><URLBase>&lol3;</URLBase></root>"""
EXTERNAL = b"""<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]><r>&x;</r>"""


@pytest.mark.parametrize("doc", [BOMB, EXTERNAL], ids=["billion-laughs", "external-entity"])
def test_xml_bombs_are_refused(doc: bytes) -> None:
    with pytest.raises(RemoteProtocolError, match="refused"):
        upnp.parse_description(doc, "http://10.0.1.1/")
    with pytest.raises(RemoteProtocolError, match="refused"):
        upnp.parse_soap_response(200, doc, "GetExternalIPAddress")


def test_http_framing() -> None:
    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5\r\nhello\r\n6;x=y\r\n world\r\n0\r\n\r\n")
    assert upnp.parse_http_response(chunked)[2] == b"hello world"
    for bad, msg in [(b"HTTP/1.1 200 OK\r\n", "complete header"),
                     (b"SIP/2.0 200 OK\r\n\r\n", "not an HTTP response"),
                     (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", "10 announced"),
                     (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "chunk size"),
                     (b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n", "bad header")]:
        with pytest.raises(RemoteProtocolError, match=msg):
            upnp.parse_http_response(bad)


def test_urls_must_be_plain_http() -> None:
    assert upnp.check_url("http://10.0.1.1:5555/ctl?a=1") == ("10.0.1.1", 5555, "/ctl?a=1")
    for url in ("https://10.0.1.1/", "file:///etc/passwd", "http://10.0.1.1:99999/", ""):
        with pytest.raises(RemoteProtocolError):
            upnp.check_url(url)


def test_gateway_from_a_route_table(tmp_path: Path) -> None:
    table = tmp_path / "route"
    table.write_text(
        "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n"
        "eth0\t00000000\t0101000A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"       # default via 10.0.1.1
        "eth0\t0001000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n")      # 10.0.1.0/24 on-link
    assert gateway_for("203.0.113.10", str(table)) == "10.0.1.1"
    assert gateway_for("10.0.1.7", str(table)) is None
    assert gateway_for("127.0.0.1", str(table)) is None
    assert gateway_for("2001:db8::1", str(table)) is None
    assert gateway_for("203.0.113.10", str(tmp_path / "missing")) is None
