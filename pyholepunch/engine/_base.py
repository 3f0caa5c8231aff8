"""The engine contract: what both backends (native C and pure Python) promise.

Times are absolute CLOCK_REALTIME seconds (``time.time()``), so two processes — or two
hosts with synced clocks — can agree on one ``start_at``. Every ``timeout`` counts from
``start_at``: the punch window is ``[start_at, start_at + timeout]``.

Calling from asyncio: ``await engine.simultaneous_open_async(...)`` and
``await engine.sweep_async(...)`` take the blocking calls' arguments and give their results
and errors, without a thread per punch (the native engine hands every punch of a loop to its
C scheduler threads, one per CPU; the pure engine runs them on the loop itself). Cancelling the awaiting
task closes every socket of that punch before CancelledError propagates. The other methods
block: run them in a worker thread (``asyncio.to_thread``); the native engine releases the
GIL for the whole call and the pure engine blocks only in ``select``/``sleep``.
"""
from __future__ import annotations

import errno
import ipaddress
import math
import resource
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Protocol, runtime_checkable

from ..address import Address, check_host, ip_of, route_source
from ..errors import PunchError, PunchTimeout

# Address: ``(host, port)``, the host an IPv4 or IPv6 literal (link-local IPv6 with its scope,
# ``fe80::1%eth0``); port 0 means "any" where a local port is allowed. One call's addresses
# are all of one family.

SweepPair = tuple[int, Address]
"""One sweep socket: ``(local_port, (remote_ip, remote_port))``; local port 0 = ephemeral."""

LATE_TOLERANCE = 0.5
"""A ``start_at`` up to this many seconds in the past starts at once; older is an error."""

MAX_TIMEOUT = 3600.0

MAX_RAW_COUNT = 1_000_000
"""Upper bound on ``raw_syn(count=...)``."""


@dataclass(slots=True)
class PunchStats:
    """What one engine call saw. Filled in by both engines, field for field."""

    attempts: int = 0                   # connect() calls (re-arms included)
    syns_sent: int = 0                  # SYNs put on the wire (connects + raw SYNs)
    rsts_seen: int = 0                  # attempts ended by RST / ECONNREFUSED
    icmp_errors: int = 0                # attempts ended by EHOSTUNREACH / ENETUNREACH / ICMP
    sockets_opened: int = 0             # sockets created in total
    first_syn_delay_ns: int | None = None   # first SYN leaving, minus start_at
    time_to_established_ns: int | None = None  # established, minus start_at
    local_port: int | None = None       # winning local port
    remote: Address | None = None       # winning remote address
    accepted: bool = False              # won through listen+accept rather than connect
    first_syn_at: float | None = None   # absolute time of the first SYN (for cross-peer checks)

    def as_dict(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(slots=True)
class PunchResult:
    """A connected TCP socket (blocking mode) and how it was won."""

    sock: socket.socket
    stats: PunchStats


@dataclass(slots=True)
class RawSynStats:
    sent: int = 0
    first_send_delay_ns: int | None = None
    send_times: list[float] = field(default_factory=list)   # absolute, one per SYN


@dataclass(slots=True)
class RelayStats:
    bytes_a_to_b: int = 0
    bytes_b_to_a: int = 0
    reason: str = ""        # "eof", "idle", "limit", "error: ..."


@runtime_checkable
class Engine(Protocol):
    """One interface, two backends. See the module docstring for time and asyncio rules."""

    name: str

    def simultaneous_open(
        self,
        local: Address,
        remote: Address,
        start_at: float | None,
        timeout: float,
        *,
        interval: float = 0.01,
        syn_ttl: int | None = None,
        ttl_syns: int = 1,
        listen: bool = True,
    ) -> PunchResult:
        """Connect ``local`` → ``remote`` while the peer does the same towards us.

        Binds ``local`` (SO_REUSEADDR + SO_REUSEPORT) for every attempt, waits for
        ``start_at`` on an absolute clock, connects non-blocking, re-arms every ``interval``
        after RST / ECONNREFUSED / EHOSTUNREACH until established or the deadline. With
        ``listen`` it also accepts on ``local``. With ``syn_ttl`` the first ``ttl_syns``
        attempts leave with that IP TTL (opening our NAT, dying before the peer's), then the
        default TTL is restored. Raises PunchTimeout (with stats) at the deadline.
        """
        ...

    def sweep(
        self,
        pairs: Sequence[SweepPair],
        start_at: float | None,
        timeout: float,
        *,
        local_ip: str | None = None,
        max_inflight: int = 1024,
        rate: float = 0.0,
        interval: float = 0.0,
        syn_ttl: int | None = None,
    ) -> PunchResult:
        """Many concurrent non-blocking connects, first established wins, the rest closed.

        Every pair's remote is of one family; ``local_ip`` (the source address, of that family)
        defaults to the family's wildcard. ``rate`` paces SYNs per second (0 = as fast as
        possible); at most ``max_inflight`` sockets are open at once. ``interval`` > 0 re-arms
        a pair after RST/unreachable. ``syn_ttl`` sends each pair's first SYN with that TTL.
        Raises PunchTimeout.
        """
        ...

    async def simultaneous_open_async(
        self, local: Address, remote: Address, start_at: float | None, timeout: float, *,
        interval: float = 0.01, syn_ttl: int | None = None, ttl_syns: int = 1,
        listen: bool = True,
    ) -> PunchResult:
        """:meth:`simultaneous_open` on the running loop: same result, same errors; thousands
        may run at once, each first SYN at its ``start_at``. Cancelling closes its sockets."""
        ...

    async def sweep_async(
        self, pairs: Sequence[SweepPair], start_at: float | None, timeout: float, *,
        local_ip: str = "0.0.0.0", max_inflight: int = 1024, rate: float = 0.0,
        interval: float = 0.0, syn_ttl: int | None = None,
    ) -> PunchResult:
        """:meth:`sweep` on the running loop: same result, same errors. Cancelling closes its
        sockets."""
        ...

    def raw_syn(
        self,
        src: Address,
        dst: Address,
        *,
        ttl: int = 64,
        count: int = 1,
        spacing: float = 0.0,
        start_at: float | None = None,
    ) -> RawSynStats:
        """Send ``count`` hand-built TCP SYNs ``src`` → ``dst`` (IPv4 or IPv6, with the IP
        header) through a raw socket. Needs CAP_NET_RAW: PermissionError naming it otherwise.
        ``ttl`` is the IPv4 TTL or the IPv6 hop limit.
        """
        ...

    def relay_pump(
        self, fd_a: int, fd_b: int, *, idle_timeout: float = 300.0, max_bytes: int = 0
    ) -> RelayStats:
        """Copy bytes both ways between two connected sockets until EOF, idle or the limit.

        Half-closes are propagated. ``max_bytes`` = 0 means unlimited. The fds stay open.
        """
        ...


RST_ERRNOS = frozenset({errno.ECONNREFUSED, errno.ECONNRESET})
ICMP_ERRNOS = frozenset({errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN})


def count_failure(stats: PunchStats, err: int | None) -> str:
    """Account an attempt that ended with ``err`` (RST or ICMP); a short word for logs."""
    if err in RST_ERRNOS:
        stats.rsts_seen += 1
        return "rst"
    if err in ICMP_ERRNOS:
        stats.icmp_errors += 1
        return "icmp"
    return errno.errorcode.get(err or 0, str(err))


def punch_failure(op: str, what: str, stats: PunchStats, *, exhausted: bool) -> PunchError:
    """The one failure policy of both engines, and its message: a punch that ended without a
    connection is ``PunchTimeout`` when the deadline ran out, and ``PunchError`` when every
    pair failed before it and none is left to retry (the C sweep's -ECONNREFUSED).
    ``what`` names the attempt (``"10.0.0.1:4000 -> 198.51.100.7:4001"``, ``"over 64 pairs"``;
    empty when the caller cannot tell)."""
    counts = f"({stats.attempts} attempts, {stats.rsts_seen} RST, {stats.icmp_errors} ICMP)"
    head = f"{op} {what}" if what else op
    if exhausted:
        return PunchError(f"{head}: no connection {counts}; every pair failed and none "
                          "is left to retry", stats)
    return PunchTimeout(f"{head}: no connection by the deadline {counts}", stats)


def sweep_pairs(
    local_ports: Sequence[int], remote_ip: str, remote_ports: Sequence[int]
) -> list[SweepPair]:
    """The (local ports × remote ports) form of a sweep, as explicit pairs."""
    return [(lp, (remote_ip, rp)) for lp in local_ports for rp in remote_ports]


# --- argument checks shared by both engines: one place, one message per mistake ----------

def family_name(host: str) -> str:
    return "IPv6" if ":" in host else "IPv4"


def check_ip(host: object, what: str) -> str:
    """An IPv4 or IPv6 literal in canonical text (a link-local IPv6 with its scope written as
    the interface name, ``fe80::1%eth0``); ValueError naming ``what`` otherwise."""
    if not isinstance(host, str):
        raise ValueError(f"{what} host {host!r} is not an IP address")
    if host.startswith("["):
        raise ValueError(f"{what} host {host!r}: no brackets around an IPv6 address in a "
                         f"(host, port) tuple, e.g. ({host.strip('[]')!r}, port)")
    ip = ip_of(host)
    if ip is None:
        raise ValueError(f"{what} host {host!r} is not an IP address (an IPv4 or IPv6 literal)")
    if isinstance(ip, ipaddress.IPv4Address):
        return str(ip)
    try:
        check_host(host)                    # link-local without a scope id
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None
    if ip.ipv4_mapped is not None:
        raise ValueError(f"{what} host {host!r} is an IPv4-mapped IPv6 address; "
                         f"give the IPv4 address {ip.ipv4_mapped}")
    text = str(ip)
    if ip.scope_id:
        base, scope = text.split("%", 1)
        try:
            name = socket.if_indextoname(int(scope)) if scope.isdigit() else scope
            socket.if_nametoindex(name)
        except OSError:
            raise ValueError(f"{what} host {host!r}: no interface {scope!r} here") from None
        text = f"{base}%{name}"
    return text


def check_address(addr: object, what: str, *, allow_any_port: bool) -> Address:
    if not (isinstance(addr, tuple) and len(addr) == 2):
        raise ValueError(f"{what} must be a (host, port) tuple, got {addr!r}")
    host, port = addr
    ip = check_ip(host, what)
    if not isinstance(port, int) or isinstance(port, bool):
        raise ValueError(f"{what} port {port!r} is not an integer")
    low = 0 if allow_any_port else 1
    if not low <= port <= 65535:
        raise ValueError(f"{what} port {port} is out of range {low}..65535")
    return (ip, port)


def check_remote(addr: object, what: str = "remote") -> Address:
    host, port = check_address(addr, what, allow_any_port=False)
    if ipaddress.ip_address(host.split("%")[0]).is_unspecified:
        raise ValueError(f"{what} host {host} is unspecified")
    return (host, port)


def check_same_family(local: str, remote: str, what: str = "local", other: str = "remote") -> None:
    """One connection, one family: ValueError naming both addresses otherwise."""
    if family_name(local) != family_name(remote):
        raise ValueError(f"mixed address families: {what} {local} is {family_name(local)} but "
                         f"{other} {remote} is {family_name(remote)}")


def wildcard(family_of_host: str) -> str:
    """The unspecified address of ``family_of_host``'s family."""
    return "::" if ":" in family_of_host else "0.0.0.0"


def check_timing(start_at: float | None, timeout: float, *, now: float | None = None) -> float:
    """Validate a punch window; return the effective ``start_at`` (absolute seconds)."""
    now = time.time() if now is None else now
    if not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or timeout <= 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if timeout > MAX_TIMEOUT:
        raise ValueError(f"timeout {timeout} s exceeds {MAX_TIMEOUT:.0f} s")
    if start_at is None:
        return now
    if not isinstance(start_at, (int, float)) or not math.isfinite(start_at):
        raise ValueError(f"start_at must be absolute seconds (time.time()), got {start_at!r}")
    if start_at < now - LATE_TOLERANCE:
        raise ValueError(f"start_at is {now - start_at:.3f} s in the past")
    if start_at > now + MAX_TIMEOUT:
        raise ValueError(f"start_at is {start_at - now:.0f} s in the future")
    return float(start_at)


def check_ttl(ttl: object, what: str = "syn_ttl") -> None:
    if ttl is not None and (not isinstance(ttl, int) or not 1 <= ttl <= 255):
        raise ValueError(f"{what} {ttl!r} is out of range 1..255")


def check_fd_budget(needed: int) -> None:
    """Refuse up front a call that would need more descriptors than RLIMIT_NOFILE allows."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and needed > soft - 16:
        raise OSError(
            24, f"needs {needed} sockets at once but RLIMIT_NOFILE is {soft}; "
            f"raise the limit or lower max_inflight"
        )


def check_seconds(value: object, what: str, *, allow_zero: bool) -> float:
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value) and (value >= 0 if allow_zero else value > 0))
    if not ok:
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{what} must be a {kind} number, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def check_count(value: object, what: str, low: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{what} must be an integer >= {low}, got {value!r}")
    return value


def check_pairs(pairs: object) -> list[SweepPair]:
    """Validate sweep pairs; return them with canonical remote hosts."""
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence):
        raise ValueError(
            f"pairs must be a sequence of (local_port, (ip, port)), got {type(pairs).__name__}")
    if not pairs:
        raise ValueError("sweep needs at least one (local_port, (ip, port)) pair")
    out: list[SweepPair] = []
    hosts: dict[object, str] = {}      # validate each distinct remote host once
    first = ""
    for i, pair in enumerate(pairs):
        # Fast path (a sweep's thousand pairs cost ~3 % of its launch here): a plain pair
        # to a host seen and checked already; anything else takes the checks below.
        if type(pair) is tuple and len(pair) == 2:
            lport, remote = pair
            if type(lport) is int and 0 <= lport <= 65535 and type(remote) is tuple \
                    and len(remote) == 2 and type(remote[1]) is int and 1 <= remote[1] <= 65535:
                canon = hosts.get(remote[0]) if type(remote[0]) is str else None
                if canon is not None:
                    out.append(pair if canon is remote[0] else (lport, (canon, remote[1])))
                    continue
        if not (isinstance(pair, tuple) and len(pair) == 2):
            raise ValueError(f"pairs[{i}] must be (local_port, (ip, port)), got {pair!r}")
        lport, remote = pair
        if not isinstance(lport, int) or isinstance(lport, bool) or not 0 <= lport <= 65535:
            raise ValueError(f"pairs[{i}] local port {lport!r} is out of range 0..65535")
        if not (isinstance(remote, tuple) and len(remote) == 2):
            raise ValueError(f"pairs[{i}] remote must be a (host, port) tuple, got {remote!r}")
        host, port = remote
        try:
            canon = hosts[host]
        except (KeyError, TypeError):
            canon = check_remote((host, 1), f"pairs[{i}] remote")[0]
            try:
                hosts[host] = canon
            except TypeError:           # unhashable host: validated, just not cached
                pass
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            raise ValueError(f"pairs[{i}] remote port {port!r} is out of range 1..65535")
        if not first:
            first = canon
        elif (":" in canon) != (":" in first):
            raise ValueError(f"mixed address families: pairs[{i}] remote {canon} is "
                             f"{family_name(canon)} but pairs[0] remote {first} is "
                             f"{family_name(first)}; a sweep runs in one family")
        out.append((lport, (canon, port)))
    return out


@dataclass(frozen=True, slots=True)
class SimOpenArgs:
    local: Address
    remote: Address
    start: float            # effective start_at
    timeout: float
    interval: float
    syn_ttl: int | None
    ttl_syns: int
    listen: bool


SIMOPEN_FDS = 4   # listener + connecting socket + the accepted one + the native engine's epoll


def check_simopen_args(
    local: object, remote: object, start_at: float | None, timeout: float, interval: object,
    syn_ttl: int | None, ttl_syns: object, listen: object,
) -> SimOpenArgs:
    """Validate simultaneous_open's arguments, for both engines, in one order."""
    local_a = check_address(local, "local", allow_any_port=True)
    remote_a = check_remote(remote)
    check_same_family(local_a[0], remote_a[0])
    start = check_timing(start_at, timeout)
    every = check_seconds(interval, "interval", allow_zero=False)
    check_ttl(syn_ttl)
    n_ttl = check_count(ttl_syns, "ttl_syns", 0)
    check_fd_budget(SIMOPEN_FDS)
    return SimOpenArgs(local_a, remote_a, start, float(timeout), every, syn_ttl, n_ttl,
                       bool(listen))


@dataclass(frozen=True, slots=True)
class SweepArgs:
    pairs: list[SweepPair]
    local_ip: str
    start: float            # effective start_at
    timeout: float
    max_inflight: int       # already capped at len(pairs)
    rate: float
    interval: float
    syn_ttl: int | None


def check_sweep_args(
    pairs: object, start_at: float | None, timeout: float, local_ip: object,
    max_inflight: object, rate: object, interval: object, syn_ttl: int | None,
) -> SweepArgs:
    """Validate sweep's arguments, for both engines, in one order."""
    lip = None if local_ip is None else check_ip(local_ip, "local_ip")
    todo = check_pairs(pairs)
    if lip is None:
        lip = wildcard(todo[0][1][0])
    else:
        check_same_family(lip, todo[0][1][0], "local_ip", "pairs[0] remote")
    start = check_timing(start_at, timeout)
    inflight = min(check_count(max_inflight, "max_inflight", 1), len(todo))
    pace = check_seconds(rate, "rate", allow_zero=True)
    every = check_seconds(interval, "interval", allow_zero=True)
    check_ttl(syn_ttl)
    check_fd_budget(inflight)
    return SweepArgs(todo, lip, start, float(timeout), inflight, pace, every, syn_ttl)


def check_raw_args(
    src: object, dst: object, ttl: object, count: object, spacing: object,
    start_at: float | None,
) -> tuple[Address, Address, float]:
    """Validate raw_syn's arguments; return (src, dst, effective start).

    A wildcard source is resolved to the routed one: it is part of the TCP checksum.
    """
    src_a = check_address(src, "src", allow_any_port=False)
    dst_a = check_remote(dst, "dst")
    check_same_family(src_a[0], dst_a[0], "src", "dst")
    if src_a[0] in ("0.0.0.0", "::"):
        src_a = (route_source(dst_a[0]), src_a[1])
    if ttl is None:
        raise ValueError("ttl None is out of range 1..255")
    check_ttl(ttl, "ttl")
    if (not isinstance(count, int) or isinstance(count, bool)
            or not 1 <= count <= MAX_RAW_COUNT):
        raise ValueError(f"count {count!r} is out of range 1..{MAX_RAW_COUNT}")
    if (not isinstance(spacing, (int, float)) or isinstance(spacing, bool)
            or not math.isfinite(spacing) or spacing < 0):
        raise ValueError(f"spacing must be a non-negative number of seconds, got {spacing!r}")
    duration = spacing * (count - 1)
    start = check_timing(start_at, max(duration, 1.0))
    return src_a, dst_a, start


def check_fd(fd: object, what: str) -> int:
    if not isinstance(fd, int) or isinstance(fd, bool) or fd < 0:
        raise ValueError(f"{what} must be a non-negative file descriptor, got {fd!r}")
    return fd


def check_relay_args(
    fd_a: object, fd_b: object, idle_timeout: object, max_bytes: object
) -> tuple[int, int, float, int]:
    """Validate relay_pump's arguments; return them as (fd_a, fd_b, idle_timeout, max_bytes)."""
    if fd_a == fd_b and isinstance(fd_a, int):
        raise ValueError(f"fd_a and fd_b are the same descriptor ({fd_a})")
    if (not isinstance(idle_timeout, (int, float)) or isinstance(idle_timeout, bool)
            or not math.isfinite(idle_timeout) or idle_timeout < 0):
        raise ValueError(f"idle_timeout must be >= 0 seconds (0 = none), got {idle_timeout!r}")
    if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 0:
        raise ValueError(
            f"max_bytes must be a non-negative integer (0 = unlimited), got {max_bytes!r}")
    return check_fd(fd_a, "fd_a"), check_fd(fd_b, "fd_b"), float(idle_timeout), max_bytes
