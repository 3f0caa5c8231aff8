"""End-to-end TLS 1.3 between peers, mutually authenticated, pinned to peer ids (docs/architecture.md).

Each peer turns its Ed25519 :class:`~pyholepunch.identity.Identity` into a self-signed X.509
certificate (:func:`certificate_for`) and registers it with the rendezvous server, which
hands it to the other peer inside PUNCH. Python's ``ssl`` has no verification callback, so
each side *pins*: the expected peer certificate is the only trust anchor, both sides require
a certificate, TLS 1.3 only, no host names. Two checks make the server untrusted:

1. before the handshake, the certificate the server delivered must carry a key that hashes
   to the ``peer_id`` we meant to reach (a substituted certificate fails here);
2. after it, the certificate the peer presented must be that very certificate (a peer
   holding another key fails in the handshake already; this re-checks it).

The initiator is the TLS client, the responder the TLS server. In TLS 1.3 the client finishes
one round trip after its ClientHello, having authenticated the server, before the server has
checked the client's certificate. The initiator returns then (ordinary TLS 1.3 semantics):
a refusal of its certificate arrives as the responder's alert and surfaces as an
:class:`~pyholepunch.errors.AuthenticationError` on the initiator's first read (and on every
``drain()`` after it). The responder learns a bad initiator inside :func:`secure_stream`.
Measured at 40 ms RTT in the NAT lab (issue 18): this saves the half round trip (plus a
loop turn each side) that a confirmation byte from the responder used to cost; making the
initiator the TLS server instead would finish it 1.5 round trips after the TCP connection,
not 1 (it must wait for the client's Finished), so the initiator stays the client.
"""
from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import logging
import os
import socket
import ssl
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .errors import AuthenticationError
from .identity import Identity, peer_id_of
from .punch_passive import MARK
from .signal.tls import certificate_key
from .signal.tlsproto import TlsTransport

log = logging.getLogger(__name__)

DEFAULT_HANDSHAKE_TIMEOUT = 10.0
# A fixed window makes the certificate a pure function of the key (Ed25519 signatures are
# deterministic): the same identity always registers the same bytes. Validity is not the
# security here: the pin is.
_NOT_BEFORE = datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC)
_NOT_AFTER = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.UTC)

_cert_cache: dict[bytes, bytes] = {}
_CTX_CACHE_SIZE = 128
_ctx_cache: OrderedDict[tuple[bytes, bytes, bool], ssl.SSLContext] = OrderedDict()
_cert_lock = threading.Lock()


def certificate_for(identity: Identity) -> bytes:
    """The identity's self-signed X.509 certificate (DER), stable and cached per key."""
    public = identity.public_key
    with _cert_lock:
        cached = _cert_cache.get(public)
    if cached is not None:
        return cached
    peer_id = identity.peer_id
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pyholepunch"),
                      x509.NameAttribute(NameOID.COMMON_NAME, peer_id)])
    serial = int.from_bytes(hashlib.sha256(public).digest()[:16], "big") >> 1 or 1
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(identity.private_key.public_key()).serial_number(serial)
            .not_valid_before(_NOT_BEFORE).not_valid_after(_NOT_AFTER)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=False, crl_sign=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(identity.private_key, None))
    der = cert.public_bytes(serialization.Encoding.DER)
    with _cert_lock:
        _cert_cache[public] = der
    return der


def certificate_peer_id(cert_der: bytes) -> str:
    """The peer_id a certificate's Ed25519 key hashes to; AuthenticationError if it has none."""
    if not isinstance(cert_der, (bytes, bytearray)) or not cert_der:
        raise AuthenticationError("peer certificate missing (expected DER bytes)")
    return peer_id_of(certificate_key(cert_der, "peer certificate"))


def check_certificate(cert_der: bytes, peer_id: str) -> None:
    """Raise AuthenticationError unless ``cert_der``'s key is ``peer_id``'s."""
    actual = certificate_peer_id(cert_der)
    if actual != peer_id:
        raise AuthenticationError(
            f"certificate for peer {peer_id} carries the key of {actual}: substituted certificate")


def tls_context(identity: Identity, peer_cert: bytes, *, server_side: bool) -> ssl.SSLContext:
    """A TLS 1.3-only context presenting ``identity`` and trusting ``peer_cert`` alone.

    Cached (a few ms to build, on the event loop's thread): peers reconnecting to the same
    peer reuse it. A context holds no per-connection state.
    """
    key = (identity.public_key, bytes(peer_cert), server_side)
    with _cert_lock:
        ctx = _ctx_cache.get(key)
        if ctx is not None:
            _ctx_cache.move_to_end(key)
            return ctx
    ctx = _build_context(identity, peer_cert, server_side=server_side)
    with _cert_lock:
        _ctx_cache[key] = ctx
        while len(_ctx_cache) > _CTX_CACHE_SIZE:
            _ctx_cache.popitem(last=False)
    return ctx


def _build_context(identity: Identity, peer_cert: bytes, *, server_side: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    if server_side:
        ctx.num_tickets = 0              # no resumption: every connection is fully authenticated
    ctx.load_verify_locations(cadata=bytes(peer_cert))
    key_pem = identity.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    cert_pem = x509.load_der_x509_certificate(certificate_for(identity)).public_bytes(
        serialization.Encoding.PEM)
    # load_cert_chain only reads files: a private temporary file, removed at once.
    with tempfile.TemporaryDirectory(prefix="pyholepunch-") as tmp:
        path = Path(tmp) / "chain.pem"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem + cert_pem)
        ctx.load_cert_chain(path)
    return ctx


Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def warm_tls_context(identity: Identity, peer_cert: bytes, initiator: bool,
                           start_at: float) -> None:
    """Build (and cache) the TLS context once the engines are past ``start_at`` (a few ms of
    work that, before it, competes with their preparation), still a round trip before TLS
    needs it."""
    await asyncio.sleep(max(0.0, start_at - time.time()))
    await asyncio.to_thread(tls_context, identity, peer_cert, server_side=not initiator)


async def secure_stream(
    conn: socket.socket | Streams,
    *,
    identity: Identity,
    peer_id: str,
    peer_cert: bytes | None,
    initiator: bool,
    timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    insecure_plain: bool = False,
    limit: int = 2 ** 20,
) -> Streams:
    """Run the pinned TLS 1.3 handshake over ``conn``; return asyncio streams of plaintext.

    ``conn`` is a connected TCP socket (what the engine or a TURN client hands over; blocking
    or not, it is switched to non-blocking) or an asyncio ``(reader, writer)`` pair (what the
    built-in relay hands over; bytes already buffered in ``reader`` are used, so the peer may
    start the handshake as soon as it likes). The initiator is the TLS client. Raises
    AuthenticationError (wrong key, wrong peer_id, the peer refused us, not TLS 1.3),
    TimeoutError after ``timeout`` seconds, OSError when the connection breaks. On any
    failure ``conn`` is closed.

    ``insecure_plain`` skips TLS altogether — benchmarks only; it logs a WARNING each time.

    The initiator returns once it has authenticated the responder; the responder's refusal
    of the initiator's certificate then surfaces as AuthenticationError on the first read
    (or drain) of the returned streams.

    Cost: the initiator is done one round trip after the TCP connection, the responder one
    and a half. Call :func:`tls_context` as soon as the
    peer's certificate is known (e.g. on PUNCH): the context is cached, so the handshake
    then starts without the few milliseconds of building it.
    """
    try:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
                or not 0 < timeout <= 3600:
            raise ValueError(f"timeout must be 0..3600 seconds, got {timeout!r}")
        if insecure_plain:
            log.warning("insecure_plain: the connection to peer %s is NOT encrypted or "
                        "authenticated (benchmarks only)", peer_id)
            if isinstance(conn, socket.socket):
                return await _open_streams(conn, limit)
            return conn
        if peer_cert is None:
            raise AuthenticationError(f"no certificate for peer {peer_id}: cannot authenticate it")
        check_certificate(peer_cert, peer_id)
        ctx = tls_context(identity, peer_cert, server_side=not initiator)
    except BaseException:
        _abort(None, conn)
        raise

    writer: asyncio.StreamWriter | None = None
    sock = conn if isinstance(conn, socket.socket) else None
    try:
        async with asyncio.timeout(timeout):
            if isinstance(conn, socket.socket):
                # One TLS path for sockets and streams: ours, since asyncio's own drops the
                # alert that tells a refused peer why (it sees a bare reset instead).
                conn = await _open_streams(conn, limit)
            reader, writer = await _handshake_streams(conn, ctx, initiator=initiator,
                                                      limit=limit, peer_id=peer_id)
            _check_peer(writer, peer_cert, peer_id)
    except TimeoutError:
        _abort(writer, conn, sock)
        raise TimeoutError(f"TLS handshake with peer {peer_id} took longer than {timeout} s") from None
    except BaseException:
        _abort(writer, conn, sock)
        raise
    log.debug("TLS 1.3 with peer %s established (%s)", peer_id, "client" if initiator else "server")
    return reader, writer


async def _open_streams(sock: socket.socket, limit: int) -> Streams:
    """asyncio streams over a punched or relayed socket, with TCP_NODELAY as asyncio sets it on
    the sockets it makes: it does not on a socket made without ``IPPROTO_TCP`` (the pure
    engine's, a TURN data connection), where Nagle held the TLS server's flight behind the
    simultaneous open's unacknowledged lead MARK (punch.lead_mark) until its ACK came: the
    pure engine's cone pairs took 158 ms to connect instead of 138 (bench_punch)."""
    with contextlib.suppress(OSError):      # not TCP (a socketpair in tests): nothing to set
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return await asyncio.open_connection(sock=sock, limit=limit)


def _handshake_error(exc: BaseException, peer_id: str) -> BaseException:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return AuthenticationError(f"peer {peer_id} presented a certificate other than its "
                                   f"pinned one ({exc.verify_message})")
    if isinstance(exc, (ssl.SSLEOFError, ConnectionError)):   # no alert: the peer went away
        kind = type(exc) if isinstance(exc, ConnectionError) else ConnectionResetError
        return kind(f"peer {peer_id} dropped the connection during the TLS handshake "
                    "(it may have refused our certificate)")
    if isinstance(exc, ssl.SSLError):
        return AuthenticationError(_describe_ssl_error(exc, peer_id))
    return exc


async def _handshake_streams(conn: Streams, ctx: ssl.SSLContext, *, initiator: bool, limit: int,
                             peer_id: str) -> Streams:
    """TLS (signal.tlsproto's memory-BIO layer) on the transport under ``conn``: the layer
    takes over as that transport's protocol and first gets what the stream had already read."""
    inner_reader, inner_writer = conn
    if (broken := inner_reader.exception()) is not None:
        raise _handshake_error(broken, peer_id)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    protocol = _RefusalAware(reader, peer_id, loop=loop)
    # A simultaneous open's responder may lead with MARK (punch.lead_mark): dropped here.
    tls = TlsTransport(ctx, lambda: protocol, None, server_side=not initiator,
                       abort_on_failure=False, lead=MARK if initiator else b"")
    await tls.take_over(inner_reader, inner_writer)
    assert tls.handshake_done is not None
    try:
        await tls.handshake_done
    except (ConnectionError, ssl.SSLError) as exc:
        raise _handshake_error(exc, peer_id) from None
    return reader, asyncio.StreamWriter(tls, protocol, reader, loop)


def _describe_ssl_error(exc: ssl.SSLError, peer_id: str) -> str:
    reason = exc.reason or str(exc)
    text = reason.lower()
    if "version" in text or "unsupported_protocol" in text or "wrong_version" in text:
        return f"peer {peer_id} does not speak TLS 1.3 ({reason})"
    if "alert" in text:
        return f"peer {peer_id} refused the TLS handshake ({reason}): it did not accept our certificate"
    if "no_certificate" in text or "peer did not return a certificate" in text:
        return f"peer {peer_id} presented no certificate ({reason})"
    return f"TLS handshake with peer {peer_id} failed ({reason})"


def _check_peer(writer: asyncio.StreamWriter, peer_cert: bytes, peer_id: str) -> None:
    ssl_object = writer.get_extra_info("ssl_object")
    presented = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if presented is None:
        raise AuthenticationError(f"peer {peer_id} presented no certificate")
    if ssl_object.version() != "TLSv1.3":
        raise AuthenticationError(f"peer {peer_id} negotiated {ssl_object.version()}, not TLS 1.3")
    if presented != bytes(peer_cert):
        raise AuthenticationError(f"peer {peer_id} presented a certificate other than its pinned one")
    check_certificate(presented, peer_id)


class _RefusalAware(asyncio.StreamReaderProtocol):
    """The plaintext streams' protocol: a TLS alert after the handshake (the responder refusing
    the initiator's certificate, which TLS 1.3 tells the client only after it has finished)
    reaches the reader, and so every read and drain, as an AuthenticationError."""

    def __init__(self, reader: asyncio.StreamReader, peer_id: str,
                 loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(reader, loop=loop)
        self._peer_id = peer_id

    def connection_lost(self, exc: Exception | None) -> None:
        if isinstance(exc, ssl.SSLError) and not isinstance(exc, ssl.SSLEOFError):
            exc = AuthenticationError(_describe_ssl_error(exc, self._peer_id))
        super().connection_lost(exc)


def _abort(writer: asyncio.StreamWriter | None, conn: socket.socket | Streams,
           sock: socket.socket | None = None) -> None:
    """Close everything after a failure; ``sock`` is the caller's socket, if one was given."""
    if writer is not None:
        writer.transport.abort()
    if isinstance(conn, socket.socket):
        conn.close()
        return
    transport = conn[1].transport
    transport.close()           # not abort: a queued TLS alert still tells the peer why
    if sock is not None and not transport.get_write_buffer_size():
        sock.close()            # nothing left to flush: closed now, not a loop turn later


__all__ = ["certificate_for", "certificate_peer_id", "check_certificate",
           "secure_stream", "tls_context", "warm_tls_context"]
