"""Who may talk to the HTTP API: loopback by default, a bearer token always, Host and Origin checked.

* Listening: a loopback address unless the operator names another one AND gives a token file
  of their own (``--token-file``); the auto-created token is for loopback only.
* Token: ``Authorization: Bearer <token>`` on every request, compared in constant time. The
  default file lives in the state directory (``api-token``), created with 32 random bytes
  (URL-safe base64) and mode 0600 when absent; a file readable by others is refused.
* DNS rebinding: a page on ``http://evil.example`` that resolves to 127.0.0.1 reaches us with
  ``Host: evil.example`` and ``Origin: http://evil.example``: both get 403 (see ``Gate``). An
  ``Origin`` must be our own origin; ``null`` (sandboxed frames of any site send it) is
  refused, unlike p2pd.
"""
from __future__ import annotations

import base64
import hmac
import ipaddress
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from ..address import Address, format_address, parse_address
from ..errors import AddressError, ApiSetupError

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
    """The checks every request passes, in order: Host, Origin (403), token (401).

    A Host is accepted when its port is ours and its name is an IP literal (a rebinding page
    always arrives under a domain name), ``localhost`` while we listen on loopback, or one of
    ``allow_hosts`` (names an operator serves the API under). An Origin must be
    ``http://`` + an accepted Host.
    """

    def __init__(self, token: str, listen: Address, allow_hosts: Iterable[str] = ()) -> None:
        self._token = token.encode()
        self.listen = listen
        self.port = listen[1]
        self.allow_hosts = {h.lower() for h in allow_hosts}

    def set_port(self, port: int) -> None:
        """Once the real port is known (``--listen HOST:0``)."""
        self.port = port

    def host_ok(self, host: str | None) -> bool:
        if not host:
            return False
        try:
            name, port = parse_address(host.lower(), default_port=80)
        except AddressError:
            return False
        if port != self.port:
            return False
        if name in self.allow_hosts or (name == "localhost" and is_loopback(self.listen[0])):
            return True
        try:
            ipaddress.ip_address(name.split("%")[0])
        except ValueError:
            return False
        return True

    def refusal(self, host: str | None, origin: str | None,
                authorization: str | None) -> tuple[int, str, str] | None:
        """None when the request may proceed, else (status, error code, message)."""
        if not self.host_ok(host):
            return (403, "bad_host", f"Host {host!r} is not this API's address "
                                     "(DNS rebinding protection)")
        if origin is not None and not (origin.lower().startswith("http://")
                                       and self.host_ok(origin[7:])):
            return (403, "bad_origin", f"Origin {origin!r} may not use this API")
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            return (401, "unauthorized", "send Authorization: Bearer <token> (see --token-file)")
        if not hmac.compare_digest(given.strip().encode(), self._token):
            return (401, "unauthorized", "wrong token")
        return None
