"""Who may talk to the HTTP API: loopback by default, a bearer token always, Host and Origin checked.

* Listening: a loopback address unless the operator names another one AND gives a token file
  of their own (``--token-file``); the auto-created token is for loopback only.
* Token: ``Authorization: Bearer <token>`` on every request, compared in constant time. The
  default file lives in the state directory (``api-token``), created with 32 random bytes
  (URL-safe base64) and mode 0600 when absent; a file readable by others is refused.
* DNS rebinding: a page on ``http://evil.example`` that resolves to 127.0.0.1 reaches us with
  ``Host: evil.example`` and ``Origin: http://evil.example``: both get 403. The accepted Host
  values are the listen address and, on loopback, ``localhost``/``127.0.0.1``/``[::1]`` with
  our port. An ``Origin`` must be our own origin; ``null`` (sandboxed frames of any site send
  it) is refused, unlike p2pd.
"""
from __future__ import annotations

import base64
import hmac
import ipaddress
import os
import stat
from pathlib import Path

from ..address import Address, format_address
from ..errors import ApiSetupError

TOKEN_FILE = "api-token"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def load_or_create_token(path: Path, *, create: bool) -> str:
    """The token in ``path``; with ``create``, a fresh random one (mode 0600) when absent."""
    if not path.exists():
        if not create:
            raise ApiSetupError(f"token file {path} does not exist")
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        token = base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        return token
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ApiSetupError(f"token file {path} is readable by others (mode {mode & 0o777:o}): "
                            "chmod 600 it")
    token = path.read_text().strip()
    if len(token) < 16:
        raise ApiSetupError(f"token file {path} holds no token of at least 16 characters")
    return token


def check_listen(listen: Address, token_file_given: bool) -> None:
    """Refuse a non-loopback listen address unless the operator supplied a token file."""
    if not is_loopback(listen[0]) and not token_file_given:
        raise ApiSetupError(f"--listen {format_address(listen)} is not a loopback address: "
                            "that needs a token of your own (--token-file FILE)")


class Gate:
    """The checks every request passes, in order: Host, Origin (403), token (401)."""

    def __init__(self, token: str, listen: Address) -> None:
        self._token = token.encode()
        self.listen = listen
        self.hosts: set[str] = set()
        self.origins: set[str] = set()
        self.set_port(listen[1])

    def set_port(self, port: int) -> None:
        """The accepted Host/Origin values once the real port is known (``--listen :0``)."""
        host = self.listen[0]
        names = {format_address((host, port))}
        if is_loopback(host):
            names |= {f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"}
        self.hosts = names | ({n.rsplit(":", 1)[0] for n in names} if port == 80 else set())
        self.origins = {f"http://{n}" for n in self.hosts}

    def refusal(self, host: str | None, origin: str | None,
                authorization: str | None) -> tuple[int, str, str] | None:
        """None when the request may proceed, else (status, error code, message)."""
        if host is None or host.lower() not in self.hosts:
            return (403, "bad_host", f"Host {host!r} is not this API's address "
                                     "(DNS rebinding protection)")
        if origin is not None and origin.lower() not in self.origins:
            return (403, "bad_origin", f"Origin {origin!r} may not use this API")
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            return (401, "unauthorized", "send Authorization: Bearer <token> (see --token-file)")
        if not hmac.compare_digest(given.strip().encode(), self._token):
            return (401, "unauthorized", "wrong token")
        return None
