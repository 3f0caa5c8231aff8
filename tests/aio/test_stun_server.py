"""StunServer + clients on loopback: answers, CHANGE-REQUEST, TCP connect-back, bad input."""
from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from pyholepunch.errors import TransactionFailed, TransactionTimeout
from pyholepunch.stun.client import (
    StunTcpConnection,
    StunUdpClient,
    new_transaction_id,
    retransmit_schedule,
    reusable_socket,
    stun_binding,
)
from pyholepunch.stun.codec import (
    MAGIC_COOKIE,
    AttrType,
    ChangeRequest,
    ConnectBack,
    MessageClass,
    Method,
    StunMessage,
    binding_request,
)
from pyholepunch.stun.server import StunServer

ALT = "127.0.0.2"


def test_retransmit_schedule_matches_rfc8489_example() -> None:
    sends, give_up = retransmit_schedule(0.5, 7, 16)
    assert sends == [0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5]
    assert give_up == 39.5
    with pytest.raises(ValueError, match="rto=0"):
        retransmit_schedule(0, 7, 16)


@pytest.mark.asyncio
async def test_udp_binding_and_rfc5780_attributes() -> None:
    async with StunServer(("127.0.0.1", 0), ALT) as srv:
        assert len(srv.addresses) == 4
        host, port = srv.primary
        other = srv.other_address
        assert other is not None and other[0] == ALT and other[1] != port
        async with await StunUdpClient.open(("127.0.0.1", 0), rto=0.1) as c:
            r = await c.binding(srv.primary)
            assert r.mapped == c.local and r.source == srv.primary
            assert r.response_origin == srv.primary and r.other_address == other
            assert r.software == "pyholepunch"
            for change, expect in [(ChangeRequest(True, True), other),
                                   (ChangeRequest(False, True), (host, other[1])),
                                   (ChangeRequest(True, False), (ALT, port))]:
                r = await c.binding(srv.primary, change=change)
                assert r.source == expect and r.response_origin == expect
            # asking the alternate address to change back lands on the primary
            r = await c.binding(other, change=ChangeRequest(True, True))
            assert r.source == srv.primary


@pytest.mark.asyncio
async def test_change_request_without_alternate_is_420() -> None:
    async with StunServer(("127.0.0.1", 0)) as srv:
        async with await StunUdpClient.open(("127.0.0.1", 0), rto=0.1) as c:
            r = await c.binding(srv.primary)
            assert r.other_address is None
            with pytest.raises(TransactionFailed) as info:
                await c.binding(srv.primary, change=ChangeRequest(False, True))
            assert info.value.code == 420
            assert info.value.response.get(AttrType.UNKNOWN_ATTRIBUTES) == (AttrType.CHANGE_REQUEST,)


@pytest.mark.asyncio
async def test_tcp_binding_and_connect_back() -> None:
    async with StunServer(("127.0.0.1", 0), ALT, connect_back_timeout=0.5) as srv:
        r = await stun_binding(srv.primary, transport="tcp", local=("127.0.0.1", 0))
        assert r.mapped == r.local and r.other_address == srv.other_address
        # listen on the local port, then ask for a connect-back from the other address+port
        lsock = reusable_socket(("127.0.0.1", 0))
        lsock.listen(4)
        got: asyncio.Future[tuple[bytes, tuple[str, int]]] = asyncio.get_running_loop().create_future()

        async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            data = await reader.read(4096)
            if not got.done():
                got.set_result((data, writer.get_extra_info("peername")[:2]))
            writer.close()
        listener = await asyncio.start_server(on_conn, sock=lsock)
        try:
            conn = await StunTcpConnection.open(srv.primary, local=lsock.getsockname())
            async with conn:
                req = binding_request(new_transaction_id(), change=ChangeRequest(True, True))
                conn.send(req)
                data, peer = await asyncio.wait_for(got, 3)
                msg = StunMessage.parse(data)
                assert msg.transaction_id == req.transaction_id and msg.cls is MessageClass.SUCCESS
                assert peer == srv.other_address
                assert msg.mapped_address == conn.local
        finally:
            listener.close()


@pytest.mark.asyncio
async def test_tcp_connect_back_refused_is_reported_on_the_original_connection() -> None:
    async with StunServer(("127.0.0.1", 0), ALT) as srv:
        async with await StunTcpConnection.open(srv.primary, local=("127.0.0.1", 0)) as conn:
            req = binding_request(new_transaction_id(), change=ChangeRequest(False, True))
            conn.send(req)   # nobody listens on our port: the kernel answers RST
            msg = await conn.read_message(3)
            assert msg.transaction_id == req.transaction_id
            assert msg.error is not None and msg.error.code == 447
            assert msg.get(AttrType.CONNECT_BACK_RESULT) is ConnectBack.REFUSED


@pytest.mark.asyncio
async def test_timeouts_are_specific() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as hole:
        hole.bind(("127.0.0.1", 0))           # bound, never answers
        async with await StunUdpClient.open(("127.0.0.1", 0), rto=0.05, rc=3, rm=2) as c:
            with pytest.raises(TransactionTimeout, match="after 3 sends in 0.25 s"):
                await c.binding(hole.getsockname())
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    with pytest.raises(ConnectionRefusedError):
        await stun_binding(("127.0.0.1", port), transport="tcp")
    with pytest.raises(ValueError, match="transport must be"):
        await stun_binding(("127.0.0.1", port), transport="sctp")


def _raw_udp(data: bytes, server: tuple[str, int], wait: float = 0.3) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(wait)
        s.sendto(data, server)
        try:
            return s.recv(2048)
        except TimeoutError:
            return None


@pytest.mark.asyncio
async def test_bad_requests_get_errors_or_silence() -> None:
    async with StunServer(("127.0.0.1", 0), ALT) as srv:
        tid = bytes(12)
        ask = lambda d: asyncio.to_thread(_raw_udp, d, srv.primary)  # noqa: E731
        # unknown comprehension-required attribute -> 420 listing it
        req = StunMessage(Method.BINDING, MessageClass.REQUEST, tid, [(0x0777, b"x")])
        resp = StunMessage.parse(await ask(bytes(req)))
        assert resp.error.code == 420 and resp.get(AttrType.UNKNOWN_ATTRIBUTES) == (0x0777,)
        # a Binding request with a broken attribute -> 400 naming it
        body = struct.pack("!HH", AttrType.CHANGE_REQUEST, 2) + b"\0\0\0\0"
        bad = struct.pack("!HHI", 1, len(body), MAGIC_COOKIE) + tid + body
        resp = StunMessage.parse(await ask(bad))
        assert resp.error.code == 400 and "CHANGE-REQUEST" in resp.error.reason
        # other methods -> 400; indications, garbage and non-STUN -> silence
        resp = StunMessage.parse(await ask(bytes(StunMessage(Method.ALLOCATE, MessageClass.REQUEST, tid))))
        assert resp.error.code == 400
        assert await ask(bytes(StunMessage(Method.BINDING, MessageClass.INDICATION, tid))) is None
        assert await ask(b"\x16\x03\x01 hello") is None
        # and it still answers
        r = await stun_binding(srv.primary, rto=0.1)
        assert r.mapped[0] == "127.0.0.1"
        assert srv.stats["errors"] == 0


@pytest.mark.asyncio
async def test_tcp_garbage_closes_only_that_connection() -> None:
    async with StunServer(("127.0.0.1", 0)) as srv:
        reader, writer = await asyncio.open_connection(*srv.primary)
        writer.write(b"GET / HTTP/1.1\r\n\r\n")
        assert await asyncio.wait_for(reader.read(100), 3) == b""    # closed on us
        writer.close()
        r = await stun_binding(srv.primary, transport="tcp")
        assert r.mapped[0] == "127.0.0.1"


@pytest.mark.asyncio
async def test_serve_tcp_stream_embedding() -> None:
    """The combined server hands accepted connections (and bytes it already read) to us."""
    srv = StunServer(("127.0.0.1", 0))
    await srv.start_udp()
    try:
        async def demux(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            first = await reader.readexactly(1)
            await srv.serve_tcp_stream(reader, writer, initial=first)
        outer = await asyncio.start_server(demux, "127.0.0.1", srv.primary[1])
        try:
            r = await stun_binding(srv.primary, transport="tcp")
            assert r.mapped[0] == "127.0.0.1" and r.response_origin == srv.primary
        finally:
            outer.close()
    finally:
        await srv.close()


def test_alternate_ip_needs_a_specific_primary() -> None:
    with pytest.raises(ValueError, match="needs a specific primary address, not 0.0.0.0"):
        StunServer(("0.0.0.0", 3478), "127.0.0.2")
