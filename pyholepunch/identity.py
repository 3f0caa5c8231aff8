"""Peer identity: an Ed25519 key per peer, and the peer_id derived from its public key.

``peer_id`` = lowercase base32 (no padding) of the first 20 bytes of SHA-256 over the raw
32-byte public key: 32 characters, safe in names, logs and URLs. Anyone holding a public key
can check it against a peer_id, so a server relaying keys cannot substitute its own.
"""
from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import AuthenticationError, ConfigDirInUse

KEY_FILE = "identity.key"


def default_config_dir() -> Path:
    """``$PYHOLEPUNCH_HOME``, else ``$XDG_CONFIG_HOME/pyholepunch``, else ``~/.config/pyholepunch``."""
    if home := os.environ.get("PYHOLEPUNCH_HOME"):
        return Path(home)
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "pyholepunch"


class ConfigLock:
    """An exclusive lock on a config directory for as long as one Peer runs from it.

    ``flock`` on ``peer.lock``: it conflicts between two open files even in one process, so
    the second Peer of one directory fails with ConfigDirInUse instead of registering the same
    identity again (the server would then drop the first). Released on ``release()`` or exit.
    """

    FILE = "peer.lock"

    def __init__(self, directory: Path) -> None:
        self.path = directory / self.FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ConfigDirInUse(
                f"config dir {self.path.parent} is in use by another running peer (pid {holder}): "
                "give each peer its own config_dir= (or $PYHOLEPUNCH_HOME, or --config-dir)",
                path=str(self.path.parent)) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)      # closing the file drops the flock
            self._fd = None


def peer_id_of(public_key: bytes) -> str:
    if len(public_key) != 32:
        raise AuthenticationError(f"an Ed25519 public key has 32 bytes, got {len(public_key)}")
    digest = hashlib.sha256(public_key).digest()[:20]
    return base64.b32encode(digest).decode("ascii").lower()


def verify_signature(public_key: bytes, signature: bytes, message: bytes) -> None:
    """Raise AuthenticationError unless ``signature`` is ``public_key``'s over ``message``."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        raise AuthenticationError("signature does not verify") from None


@dataclass(frozen=True)
class Identity:
    """A peer's private key, with its public key and peer_id."""

    private_key: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, directory: str | os.PathLike[str] | None = None) -> Identity:
        """Load ``identity.key`` from ``directory`` (created 0700, key 0600) or make one."""
        path = Path(directory) if directory is not None else default_config_dir()
        key_path = path / KEY_FILE
        if key_path.exists():
            mode = key_path.stat().st_mode & 0o777
            if mode & 0o077:
                raise AuthenticationError(
                    f"{key_path} is readable by others (mode {mode:o}); chmod 600 it"
                )
            raw = key_path.read_bytes()
            key = serialization.load_pem_private_key(raw, password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise AuthenticationError(f"{key_path} does not hold an Ed25519 key")
            return cls(key)
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        identity = cls.generate()
        pem = identity.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        # O_EXCL: two processes starting at once must not overwrite each other's key.
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        return identity

    @property
    def public_key(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @property
    def peer_id(self) -> str:
        return peer_id_of(self.public_key)

    def sign(self, message: bytes) -> bytes:
        return self.private_key.sign(message)
