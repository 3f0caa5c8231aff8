"""TLS for signaling: the server's self-signed certificate, fingerprints, pinning and TOFU.

The server's certificate *is* its identity: generated once into the state directory (key
0600), its SHA-256 fingerprint printed and written to ``server.fingerprint``. Clients check
the fingerprint after the handshake: pinned (``--server-fingerprint``) or trust-on-first-use
in a known_hosts-like file (``host:port sha256-hex`` per line). The registration signature
also covers the fingerprint, so a man in the middle with its own certificate gets nothing a
real server would accept.
"""
from __future__ import annotations

import datetime
import hashlib
import logging
import os
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from ..errors import AuthenticationError

log = logging.getLogger(__name__)

CERT_FILE, KEY_FILE, FINGERPRINT_FILE = "server.crt", "server.key", "server.fingerprint"
KNOWN_SERVERS = "known_servers"


def fingerprint(cert_der: bytes) -> bytes:
    return hashlib.sha256(cert_der).digest()


def format_fingerprint(fp: bytes) -> str:
    return fp.hex()


def parse_fingerprint(text: str) -> bytes:
    """Accept hex with or without colons, optionally prefixed ``sha256:``."""
    cleaned = text.strip().lower().removeprefix("sha256:").replace(":", "")
    try:
        raw = bytes.fromhex(cleaned)
    except ValueError:
        raise AuthenticationError(f"bad server fingerprint {text!r:.80}: not hex") from None
    if len(raw) != 32:
        raise AuthenticationError(f"bad server fingerprint {text!r:.80}: need 32 bytes (SHA-256)")
    return raw


@dataclass(frozen=True)
class ServerCredentials:
    cert_pem: bytes
    key_pem: bytes

    @property
    def cert_der(self) -> bytes:
        return x509.load_pem_x509_certificate(self.cert_pem).public_bytes(serialization.Encoding.DER)

    @property
    def fingerprint(self) -> bytes:
        return fingerprint(self.cert_der)

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        # No TLS 1.3 session tickets: signaling clients never resume (a fresh context per
        # connection), and two tickets per handshake cost the server CPU at every registration.
        ctx.num_tickets = 0
        # load_cert_chain only reads files: a private temporary file, removed at once.
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "chain.pem"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(self.key_pem + self.cert_pem)
            ctx.load_cert_chain(path)
        return ctx


def certificate_key(cert_der: bytes, what: str = "certificate") -> bytes:
    """The raw Ed25519 public key in DER X.509 ``cert_der``; AuthenticationError names
    ``what`` and what is wrong. The one parser of peer certificates (server and peers)."""
    try:
        key = x509.load_der_x509_certificate(bytes(cert_der)).public_key()
    except ValueError as exc:
        raise AuthenticationError(f"{what} is not valid DER X.509 (not DER, or not an X.509 "
                                  f"certificate): {str(exc)[:80]}") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise AuthenticationError(f"{what} holds a {type(key).__name__.lstrip('_')}, "
                                  "not an Ed25519 key")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def check_peer_cert(cert_der: bytes, public_key: bytes) -> None:
    """A peer's registered certificate must be DER X.509 holding the very Ed25519 key it
    registered with: the server forwards it to other peers as their only trust anchor, so
    it stores nothing else. AuthenticationError says what is wrong."""
    if certificate_key(cert_der) != public_key:
        raise AuthenticationError("certificate key is not the registering key")


def generate_credentials(common_name: str = "pyholepunch rendezvous") -> ServerCredentials:
    # P-256: cheap handshakes (thousands of peers reconnect at once after a restart).
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .sign(key, hashes.SHA256()))
    return ServerCredentials(
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption()))


def load_or_create_credentials(state_dir: str | os.PathLike[str] | None) -> ServerCredentials:
    """The server identity from ``state_dir`` (made on first start); ephemeral without one."""
    if state_dir is None:
        return generate_credentials()
    path = Path(state_dir)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    cert_path, key_path = path / CERT_FILE, path / KEY_FILE
    if cert_path.exists() and key_path.exists():
        if key_path.stat().st_mode & 0o077:
            raise AuthenticationError(f"{key_path} is readable by others; chmod 600 it")
        creds = ServerCredentials(cert_path.read_bytes(), key_path.read_bytes())
    else:
        creds = generate_credentials()
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(creds.key_pem)
        cert_path.write_bytes(creds.cert_pem)
        log.info("generated server certificate in %s", path)
    (path / FINGERPRINT_FILE).write_text(format_fingerprint(creds.fingerprint) + "\n")
    return creds


def client_context() -> ssl.SSLContext:
    """No CA check: the server is authenticated by fingerprint after the handshake."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


class KnownServers:
    """Trust on first use: ``host:port hex-fingerprint`` lines, like SSH's known_hosts."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def _entries(self) -> dict[str, str]:
        entries: dict[str, str] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                parts = line.split()
                if len(parts) == 2 and not line.startswith("#"):
                    entries[parts[0]] = parts[1]
        return entries

    def check(self, host: str, port: int, fp: bytes) -> None:
        """Accept a known match, record a first sighting, refuse a changed key."""
        key = f"{host}:{port}"
        known = self._entries().get(key)
        if known is None:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            with open(self.path, "a") as f:
                f.write(f"{key} {format_fingerprint(fp)}\n")
            log.warning("trusting new rendezvous server %s on first use: sha256 %s",
                        key, format_fingerprint(fp))
            return
        if known != format_fingerprint(fp):
            raise AuthenticationError(
                f"rendezvous server {key} changed its certificate (sha256 {format_fingerprint(fp)}, "
                f"expected {known}); remove its line from {self.path} if that is intended")


def verify_server(cert_der: bytes | None, host: str, port: int, *, pin: bytes | None,
                  known: KnownServers | None) -> bytes:
    """Check the server's certificate against the pin or the known-servers file."""
    if not cert_der:
        raise AuthenticationError(f"rendezvous server {host}:{port} sent no certificate")
    fp = fingerprint(cert_der)
    if pin is not None:
        if fp != pin:
            raise AuthenticationError(
                f"rendezvous server {host}:{port} fingerprint {format_fingerprint(fp)} does not match "
                f"the pinned {format_fingerprint(pin)}")
    elif known is not None:
        known.check(host, port, fp)
    else:
        raise AuthenticationError("no server fingerprint and no known-servers file: nothing to trust")
    return fp
