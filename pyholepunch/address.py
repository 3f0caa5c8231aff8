"""Addresses: the one type and the one parser every part and every command uses.

``Address`` is ``(host, port)``; an IPv6 host is written without brackets and may carry a
scope id (``fe80::1%eth0``). Text forms: ``host:port``, ``[v6]:port``, ``[v6%scope]:port``
and, where the caller names a default port, ``host`` / ``[v6]`` alone. An IPv6 literal is
always bracketed in text: ``2001:db8::1:3478`` is refused rather than guessed at.
This module is the bottom of the package: it imports nothing of it but ``errors``.
"""
from __future__ import annotations

import functools
import ipaddress
import re
import socket

from .errors import AddressError

Address = tuple[str, int]

# RFC 1123 host names (labels of letters, digits and hyphens), for what is not an IP literal.
_HOSTNAME = re.compile(r"(?=.{1,253}\Z)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?)+")


def parse_address(value: str | tuple[object, object], *, default_port: int | None = None,
                  allow_zero: bool = False) -> Address:
    """User text or a tuple -> a checked ``Address``; ``AddressError`` names what is wrong.

    ``default_port`` is used when the text has none (without it a port is required);
    ``allow_zero`` admits port 0 ("any port", for listening and binding).
    """
    if isinstance(value, tuple):
        if len(value) != 2:
            raise AddressError(f"an address is (host, port), got {value!r}")
        host, port = value
        if not isinstance(host, str) or isinstance(port, bool) or not isinstance(port, int):
            raise AddressError(f"an address is (str host, int port), got {value!r}")
        return (check_host(host), _check_port(port, repr(value), allow_zero))
    if not isinstance(value, str):
        raise AddressError(f"an address is 'host:port' text or a (host, port) tuple, got {value!r}")
    text = value.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise AddressError(f"bad address {value!r}: missing ']'")
        host, rest = text[1:end], text[end + 1:]
        if ":" not in host:
            raise AddressError(f"bad address {value!r}: brackets are for IPv6 literals")
        if rest and not rest.startswith(":"):
            raise AddressError(f"bad address {value!r}: expected ':PORT' after ']'")
        port_text = rest[1:] if rest else None
    elif text.count(":") > 1:
        raise AddressError(f"bad address {value!r}: an IPv6 literal needs brackets, "
                           f"e.g. [{text.rsplit(':', 1)[0]}]:{text.rsplit(':', 1)[1]}")
    else:
        host, sep, port_text_or_empty = text.partition(":")
        port_text = port_text_or_empty if sep else None
    if port_text is None:
        if default_port is None:
            raise AddressError(f"bad address {value!r}: no port (HOST:PORT)")
        port = default_port
    elif not port_text.isdigit() or len(port_text) > 5:
        raise AddressError(f"bad port in {value!r}")
    else:
        port = int(port_text)
    if not host:
        raise AddressError(f"bad address {value!r}: no host")
    return (check_host(host), _check_port(port, repr(value), allow_zero))


def check_host(host: str) -> str:
    """An IP literal (IPv6 with its scope id when link-local) or a host name; else AddressError."""
    ip = ip_of(host)
    if ip is None:
        if ":" in host or not _HOSTNAME.fullmatch(host):
            raise AddressError(f"bad host {host!r}: neither an IP address nor a host name")
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_link_local and not ip.scope_id:
        raise AddressError(f"link-local address {host!r} needs a scope id, e.g. {host}%eth0")
    return host


def _check_port(port: int, where: str, allow_zero: bool) -> int:
    if not (0 if allow_zero else 1) <= port <= 65535:
        raise AddressError(f"bad port {port} in {where}: 1..65535"
                           + (" (0 = any)" if allow_zero else ""))
    return port


def ip_of(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP literal ``host`` names, or None for a host name."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def family_of(host: str) -> socket.AddressFamily:
    """AF_INET6 for an IPv6 literal, AF_INET otherwise (IPv4 literals and host names)."""
    return socket.AF_INET6 if ":" in host else socket.AF_INET


@functools.lru_cache(maxsize=64)
def _scope_index(scope: str) -> int:
    return int(scope) if scope.isdigit() else socket.if_nametoindex(scope)


def sockaddr(addr: Address) -> tuple[str, int] | tuple[str, int, int, int]:
    """What a Python socket's bind/connect/sendto take for ``addr``. A scoped IPv6 host
    (``fe80::1%eth0``) becomes the 4-tuple form: CPython's 2-tuple form drops the scope id."""
    host, port = addr
    if "%" not in host:
        return addr
    base, scope = host.split("%", 1)
    return (base, port, 0, _scope_index(scope))


def route_source(dest_ip: str) -> str:
    """The local IP the kernel would use towards ``dest_ip``, of its family, a scoped IPv6
    one included (a UDP connect chooses the route and sends nothing)."""
    with socket.socket(family_of(dest_ip), socket.SOCK_DGRAM) as s:
        s.connect(sockaddr((dest_ip, 9)))
        return str(s.getsockname()[0])


def format_address(address: Address) -> str:
    """``host:port``, IPv6 in brackets: the inverse of ``parse_address``."""
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def unusable_peer_ip(host: str) -> str | None:
    """Why ``host`` cannot be an address a remote peer really has, or None when it can.

    A peer's candidates are dialled by the other peer: loopback, unspecified, multicast,
    broadcast and reserved addresses would make it dial itself or nothing. Private and
    documentation ranges stay usable (LAN candidates, the lab).
    """
    ip = ip_of(host)
    if ip is None:
        return "not an IP address"
    if ip.is_loopback:
        return "loopback"
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_multicast:
        return "multicast"
    if isinstance(ip, ipaddress.IPv4Address):
        if ip == ipaddress.IPv4Address("255.255.255.255") or ip in _IPV4_RESERVED:
            return "reserved"
    elif ip.ipv4_mapped is not None:
        return "IPv4-mapped IPv6"
    return None


_IPV4_RESERVED = ipaddress.IPv4Network("240.0.0.0/4")
