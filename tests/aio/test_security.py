"""Pinned TLS 1.3 between two peers over real loopback TCP sockets."""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from pyholepunch import security as sec
from pyholepunch.errors import AuthenticationError
from pyholepunch.identity import Identity
from pyholepunch.signal.tls import generate_credentials

ALICE, BOB, MALLORY = Identity.generate(), Identity.generate(), Identity.generate()


@pytest.fixture
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected TCP pair on 127.0.0.1, blocking like the engine's result."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        client = socket.create_connection(srv.getsockname(), timeout=5)
        server, _ = srv.accept()
    client.settimeout(None)
    try:
        yield client, server
    finally:
        client.close()
        server.close()


def side(sock: socket.socket, me: Identity, peer: Identity, *, initiator: bool,
         cert_of: Identity | None = None, peer_id: str | None = None, **kw: Any) -> Any:
    return sec.secure_stream(sock, identity=me, peer_id=peer_id or peer.peer_id,
                             peer_cert=sec.certificate_for(cert_of or peer),
                             initiator=initiator, timeout=kw.pop("timeout", 5.0), **kw)


@pytest.mark.asyncio
async def test_mutual_authentication_and_data(tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = tcp_pair
    (ra, wa), (rb, wb) = await asyncio.gather(side(a, ALICE, BOB, initiator=True),
                                              side(b, BOB, ALICE, initiator=False))
    try:
        for w in (wa, wb):
            obj = w.get_extra_info("ssl_object")
            assert obj.version() == "TLSv1.3"
        assert wa.get_extra_info("ssl_object").getpeercert(True) == sec.certificate_for(BOB)
        assert wb.get_extra_info("ssl_object").getpeercert(True) == sec.certificate_for(ALICE)
        payload = os.urandom(200_000)
        wa.write(payload)
        await wa.drain()
        assert await rb.readexactly(len(payload)) == payload
        wb.write(b"pong")
        await wb.drain()
        assert await ra.readexactly(4) == b"pong"
        wa.close()
        await wa.wait_closed()
        assert await rb.read() == b""
    finally:
        wa.close()
        wb.close()


@pytest.mark.asyncio
async def test_responder_with_another_key_is_refused(tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = tcp_pair
    # Mallory answers in Bob's place with its own key; Alice pins Bob's certificate.
    res = await asyncio.gather(side(a, ALICE, BOB, initiator=True),
                               side(b, MALLORY, ALICE, initiator=False), return_exceptions=True)
    assert isinstance(res[0], AuthenticationError)
    assert f"peer {BOB.peer_id} presented a certificate other than its pinned one" in str(res[0])
    # Mallory learns why from the TLS alert.
    assert isinstance(res[1], AuthenticationError), res[1]
    assert f"peer {ALICE.peer_id} refused the TLS handshake" in str(res[1])
    assert a.fileno() == -1 and b.fileno() == -1       # both sockets closed on failure


@pytest.mark.asyncio
async def test_initiator_with_another_key_is_refused(tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = tcp_pair
    res = await asyncio.gather(side(a, MALLORY, BOB, initiator=True),
                               side(b, BOB, ALICE, initiator=False), return_exceptions=True)
    assert isinstance(res[1], AuthenticationError)
    assert f"peer {ALICE.peer_id} presented a certificate other than its pinned one" in str(res[1])
    # The TLS 1.3 client finishes first (one round trip): the refusal reaches it as the
    # responder's alert, on its first read and on every drain after it.
    assert not isinstance(res[0], BaseException), res[0]
    await _assert_refused_later(res[0])
    assert a.fileno() == -1 or res[0][1].is_closing()


async def _assert_refused_later(streams: Any) -> None:
    reader, writer = streams
    try:
        with pytest.raises(AuthenticationError, match="refused the TLS handshake"):
            await asyncio.wait_for(reader.read(1), 5)
        writer.write(b"x")
        with pytest.raises(AuthenticationError, match="did not accept our certificate"):
            await writer.drain()
    finally:
        writer.close()


@pytest.mark.asyncio
async def test_substituted_certificate_is_caught_before_any_io(
        tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = tcp_pair
    # The server delivers Mallory's certificate as Bob's: the key does not hash to Bob's id.
    with pytest.raises(AuthenticationError, match=f"certificate for peer {BOB.peer_id} carries "
                       f"the key of {MALLORY.peer_id}: substituted"):
        await side(a, ALICE, BOB, initiator=True, cert_of=MALLORY)
    assert a.fileno() == -1
    b.settimeout(1)
    assert b.recv(10) == b""          # nothing was sent, the connection was just closed


@pytest.mark.asyncio
async def test_right_certificate_wrong_peer_id(tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    a, _ = tcp_pair
    with pytest.raises(AuthenticationError, match=f"carries the key of {BOB.peer_id}"):
        await side(a, ALICE, BOB, initiator=False, peer_id=MALLORY.peer_id)


@pytest.mark.asyncio
@pytest.mark.parametrize(("cert", "message"), [
    (None, "no certificate for peer"),
    (b"", "peer certificate missing"),
    (b"\x30\x03\x02\x01\x00", "not valid DER X.509"),
    ("p256", "not an Ed25519 key"),
])
async def test_unusable_pinned_certificates(tcp_pair: tuple[socket.socket, socket.socket],
                                            cert: Any, message: str) -> None:
    a, _ = tcp_pair
    if cert == "p256":
        cert = generate_credentials().cert_der
    with pytest.raises(AuthenticationError, match=message):
        await sec.secure_stream(a, identity=ALICE, peer_id=BOB.peer_id, peer_cert=cert,
                                initiator=True, timeout=5)
    assert a.fileno() == -1


def _tls12_context(server_side: bool, identity: Identity, peer: Identity) -> ssl.SSLContext:
    """A well-behaved peer except that it stops at TLS 1.2."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cadata=sec.certificate_for(peer))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.pem"
        path.write_bytes(identity.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()) + ssl.DER_cert_to_PEM_cert(
                sec.certificate_for(identity)).encode())
        ctx.load_cert_chain(path)
    return ctx


@pytest.mark.asyncio
@pytest.mark.parametrize("we_initiate", [True, False])
async def test_tls12_peer_is_refused(tcp_pair: tuple[socket.socket, socket.socket],
                                     we_initiate: bool) -> None:
    a, b = tcp_pair
    ctx = _tls12_context(server_side=we_initiate, identity=BOB, peer=ALICE)

    def old_peer() -> str:
        try:
            with ctx.wrap_socket(b, server_side=we_initiate) as s:
                return s.version() or ""
        except (ssl.SSLError, OSError) as exc:
            return f"failed: {exc}"

    thread = asyncio.create_task(asyncio.to_thread(old_peer))
    with pytest.raises(AuthenticationError, match=f"peer {BOB.peer_id} does not speak TLS 1.3"):
        await side(a, ALICE, BOB, initiator=we_initiate)
    assert (await thread).startswith("failed")


@pytest.mark.asyncio
async def test_stalled_handshake_times_out(tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = tcp_pair        # b never answers
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError, match=f"TLS handshake with peer {BOB.peer_id} took longer "
                       "than 0.3 s"):
        await side(a, ALICE, BOB, initiator=True, timeout=0.3)
    assert loop.time() - started < 2
    assert a.fileno() == -1
    b.settimeout(2)
    assert b.recv(4096)[:1] == b"\x16"          # a ClientHello was sent, then the socket closed
    with pytest.raises(TimeoutError):
        other = socket.socketpair()
        try:
            await side(other[0], BOB, ALICE, initiator=False, timeout=0.2)
        finally:
            other[1].close()


@pytest.mark.asyncio
async def test_bad_timeout_closes_the_socket(tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    a, _ = tcp_pair
    with pytest.raises(ValueError, match="timeout must be"):
        await side(a, ALICE, BOB, initiator=True, timeout=0)
    assert a.fileno() == -1


@pytest.mark.asyncio
async def test_insecure_plain_says_so(tcp_pair: tuple[socket.socket, socket.socket],
                                      caplog: pytest.LogCaptureFixture) -> None:
    a, b = tcp_pair
    caplog.set_level(logging.WARNING, logger="pyholepunch.security")
    (ra, wa), (rb, wb) = await asyncio.gather(
        sec.secure_stream(a, identity=ALICE, peer_id=BOB.peer_id, peer_cert=None, initiator=True,
                          insecure_plain=True),
        sec.secure_stream(b, identity=BOB, peer_id=ALICE.peer_id, peer_cert=None, initiator=False,
                          insecure_plain=True))
    try:
        assert wa.get_extra_info("ssl_object") is None
        wa.write(b"clear")
        await wa.drain()
        assert await rb.readexactly(5) == b"clear"
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 2 and all("NOT encrypted" in r.getMessage() for r in warnings)
    finally:
        wa.close()
        wb.close()


def test_certificate_is_stable_and_pins_the_key() -> None:
    ident = Identity.generate()
    first = sec.certificate_for(ident)
    assert sec.certificate_for(ident) is first                   # cached
    sec._cert_cache.clear()
    again = sec.certificate_for(Identity(ident.private_key))
    assert again == first                                        # same bytes from the same key
    assert sec.certificate_peer_id(first) == ident.peer_id
    assert sec.certificate_for(Identity.generate()) != first
    sec.check_certificate(first, ident.peer_id)
    with pytest.raises(AuthenticationError, match="substituted"):
        sec.check_certificate(first, BOB.peer_id)


# --- over asyncio streams: the built-in relay's way -----------------------------------------

@pytest.mark.asyncio
async def test_through_the_builtin_relay_which_sees_only_ciphertext() -> None:
    from pyholepunch.relay.builtin import RelayHub, RelayServer, open_builtin_relay

    seen: list[bytes] = []
    hub = RelayHub(tap=lambda _direction, chunk: seen.append(chunk))
    async with RelayServer(hub, ("127.0.0.1", 0)) as server:
        tok_a, tok_b = hub.issue("session-1")
        conn_a, conn_b = await asyncio.gather(open_builtin_relay(server.address, tok_a, timeout=5),
                                              open_builtin_relay(server.address, tok_b, timeout=5))

        async def late_responder() -> Any:
            # The initiator's ClientHello is surely buffered in conn_b's reader by now.
            await asyncio.sleep(0.2)
            return await side(conn_b, BOB, ALICE, initiator=False)  # type: ignore[arg-type]

        (ra, wa), (rb, wb) = await asyncio.gather(
            side(conn_a, ALICE, BOB, initiator=True), late_responder())  # type: ignore[arg-type]
        try:
            assert wa.get_extra_info("ssl_object").version() == "TLSv1.3"
            assert wb.get_extra_info("ssl_object").getpeercert(True) == sec.certificate_for(ALICE)
            secret = b"attack at dawn " * 1000
            big = os.urandom(3 << 20)         # more than every buffer: exercises flow control
            wa.write(secret)
            sender = asyncio.create_task(_send(wb, big))
            assert await rb.readexactly(len(secret)) == secret
            assert await ra.readexactly(len(big)) == big
            await sender
            assert wa.get_extra_info("peername") == conn_a[1].get_extra_info("peername")
            wa.close()
            await wa.wait_closed()
            assert await rb.read() == b""      # close_notify / FIN reach the other side as EOF
        finally:
            wa.close()
            wb.close()
    relayed = b"".join(seen)
    assert len(relayed) > len(big) and b"attack at dawn" not in relayed


async def _send(writer: asyncio.StreamWriter, data: bytes) -> None:
    for i in range(0, len(data), 100_000):
        writer.write(data[i:i + 100_000])
        await writer.drain()


async def _stream_pair() -> tuple[Any, Any, asyncio.AbstractServer]:
    accepted: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    server = await asyncio.start_server(lambda r, w: accepted.set_result((r, w)), "127.0.0.1", 0)
    client = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
    return client, await accepted, server


@pytest.mark.asyncio
@pytest.mark.parametrize("impostor", ["initiator", "responder"])
async def test_streams_refuse_another_key(impostor: str) -> None:
    a, b, server = await _stream_pair()
    try:
        res = await asyncio.gather(
            side(a, MALLORY if impostor == "initiator" else ALICE, BOB, initiator=True),
            side(b, MALLORY if impostor == "responder" else BOB, ALICE, initiator=False),
            return_exceptions=True)
        refuser = res[1] if impostor == "initiator" else res[0]
        assert isinstance(refuser, AuthenticationError)
        assert "other than its pinned one" in str(refuser)
        refused = res[0] if impostor == "initiator" else res[1]
        if impostor == "initiator":        # TLS 1.3: the client hears of it after finishing
            await _assert_refused_later(refused)
        else:
            assert isinstance(refused, AuthenticationError), refused
            assert "refused the TLS handshake" in str(refused)
        assert a[1].is_closing() and b[1].is_closing()
    finally:
        server.close()


@pytest.mark.asyncio
async def test_streams_handshake_timeout() -> None:
    a, b, server = await _stream_pair()
    try:
        with pytest.raises(TimeoutError, match="took longer than 0.2 s"):
            await side(a, ALICE, BOB, initiator=True, timeout=0.2)
        assert a[1].is_closing()
        assert (await b[0].read(1)) == b"\x16"
    finally:
        b[1].close()
        server.close()


def test_contexts_are_cached_per_peer_and_side() -> None:
    ctx = sec.tls_context(ALICE, sec.certificate_for(BOB), server_side=False)
    assert sec.tls_context(ALICE, sec.certificate_for(BOB), server_side=False) is ctx
    assert sec.tls_context(ALICE, sec.certificate_for(BOB), server_side=True) is not ctx
    assert sec.tls_context(ALICE, sec.certificate_for(MALLORY), server_side=False) is not ctx
    assert ctx.minimum_version is ssl.TLSVersion.TLSv1_3 and ctx.verify_mode is ssl.CERT_REQUIRED
    assert not ctx.check_hostname
