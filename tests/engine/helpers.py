"""Helpers for the engine contract tests: fd snapshots, free ports, wire capture, peer sides."""
from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pyholepunch import engine as engine_mod
from pyholepunch.address import family_of
from pyholepunch.errors import PunchError
from tests.helpers import free_port as free_port

A_IP, B_IP, C_IP = "127.0.0.2", "127.0.0.3", "127.0.0.4"
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4


@dataclass(frozen=True)
class Family:
    """The loopback addresses a test uses in one address family (fixture ``fam``)."""

    name: str
    af: socket.AddressFamily
    a: str
    b: str
    c: str
    any: str

    def sock(self, type: int = socket.SOCK_STREAM) -> socket.socket:
        return socket.socket(self.af, type)


# IPv6 has one loopback address: the sides differ by port only.
V4 = Family("v4", socket.AF_INET, A_IP, B_IP, C_IP, "0.0.0.0")
V6 = Family("v6", socket.AF_INET6, "::1", "::1", "::1", "::")


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def listening_ports() -> set[int]:
    """Every TCP port something listens on (any address), from /proc/net/tcp{,6}."""
    ports: set[int] = set()
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[3] == "0A":
                        ports.add(int(fields[1].rsplit(":", 1)[1], 16))
        except OSError:
            pass
    return ports


def closed_ports(n: int, low: int = 20000) -> list[int]:
    """``n`` ports below the ephemeral range that nothing listens on."""
    busy = listening_ports()
    out = [p for p in range(low, low + n + len(busy) + 1) if p not in busy][:n]
    assert len(out) == n
    return out


@contextlib.contextmanager
def silent_port(ip: str) -> Iterator[int]:
    """A port whose SYNs vanish: a listener with a full accept queue drops them, no RST."""
    lst = socket.socket(family_of(ip))
    fillers: list[socket.socket] = []
    try:
        lst.bind((ip, 0))
        lst.listen(0)
        port = lst.getsockname()[1]
        for _ in range(3):          # backlog 0 admits one; the rest fill it for sure
            c = socket.socket(family_of(ip))
            c.setblocking(False)
            c.connect_ex((ip, port))
            fillers.append(c)
        time.sleep(0.05)
        yield int(port)
    finally:
        for c in fillers:
            c.close()
        lst.close()


# --- on-the-wire capture (root: AF_PACKET) --------------------------------------------------

@dataclass(frozen=True)
class Seen:
    ttl: int
    src: tuple[str, int]
    dst: tuple[str, int]
    flags: int
    ip_ok: bool
    tcp_ok: bool
    raw: bytes


def checksum(data: bytes) -> int:
    """RFC 1071 sum, written independently of the engine's: 0 over a valid header."""
    if len(data) % 2:
        data += b"\0"
    s = 0
    for i in range(0, len(data), 2):
        s += (data[i] << 8) | data[i + 1]
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def parse_ipv4_tcp(pkt: bytes) -> Seen | None:
    if len(pkt) < 40 or pkt[0] >> 4 != 4 or pkt[9] != socket.IPPROTO_TCP:
        return None
    ihl = (pkt[0] & 0x0F) * 4
    total = struct.unpack("!H", pkt[2:4])[0]
    ip_hdr, tcp = pkt[:ihl], pkt[ihl:total]
    pseudo = pkt[12:20] + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(tcp))
    sport, dport = struct.unpack("!HH", tcp[:4])
    return Seen(
        ttl=pkt[8], src=(socket.inet_ntoa(pkt[12:16]), sport),
        dst=(socket.inet_ntoa(pkt[16:20]), dport), flags=tcp[13],
        ip_ok=checksum(ip_hdr) == 0, tcp_ok=checksum(pseudo + tcp) == 0, raw=pkt[:total],
    )


def parse_ipv6_tcp(pkt: bytes) -> Seen | None:
    """An IPv6 packet whose next header is TCP (no extension headers), checksums checked."""
    if len(pkt) < 60 or pkt[0] >> 4 != 6 or pkt[6] != socket.IPPROTO_TCP:
        return None
    plen = struct.unpack("!H", pkt[4:6])[0]
    tcp = pkt[40:40 + plen]
    pseudo = pkt[8:40] + struct.pack("!I3xB", len(tcp), socket.IPPROTO_TCP)
    sport, dport = struct.unpack("!HH", tcp[:4])
    return Seen(
        ttl=pkt[7], src=(socket.inet_ntop(socket.AF_INET6, pkt[8:24]), sport),
        dst=(socket.inet_ntop(socket.AF_INET6, pkt[24:40]), dport), flags=tcp[13],
        ip_ok=True, tcp_ok=checksum(pseudo + tcp) == 0, raw=pkt[:40 + plen],
    )


def parse_ip_tcp(frame: bytes) -> Seen | None:
    """An Ethernet frame carrying IPv4 or IPv6 TCP, or None."""
    if frame[12:14] == b"\x08\x00":
        return parse_ipv4_tcp(frame[14:])
    if frame[12:14] == b"\x86\xdd":
        return parse_ipv6_tcp(frame[14:])
    return None


# Classic BPF: keep only IPv4 or IPv6 TCP segments with SYN set and ACK clear, so the bulk
# traffic of other tests on a shared ``lo`` cannot overflow the capture buffer and hide our SYNs.
_SYN_ONLY_BPF = [
    (0x28, 0, 0, 12),          # ldh [12]            ethertype
    (0x15, 0, 6, 0x0800),      # jne IPv4 -> try IPv6
    (0x30, 0, 0, 23),          # ldb [23]            IP protocol
    (0x15, 0, 11, 6),          # jne TCP -> drop
    (0xB1, 0, 0, 14),          # ldxb 4*([14]&0xf)   IP header length
    (0x50, 0, 0, 27),          # ldb [x+27]          TCP flags
    (0x54, 0, 0, 0x12),        # and #(SYN|ACK)
    (0x15, 6, 7, 0x02),        # jeq SYN -> keep, else drop
    (0x15, 0, 6, 0x86DD),      # IPv6? else drop
    (0x30, 0, 0, 20),          # ldb [20]            next header
    (0x15, 0, 4, 6),           # jne TCP -> drop
    (0x30, 0, 0, 67),          # ldb [14+40+13]      TCP flags
    (0x54, 0, 0, 0x12),        # and #(SYN|ACK)
    (0x15, 0, 1, 0x02),        # jne SYN -> drop
    (0x06, 0, 0, 0x40000),     # keep
    (0x06, 0, 0, 0),           # drop
]
SO_ATTACH_FILTER = 26
SO_RCVBUFFORCE = 33


def capture_socket(ifname: str | None = None) -> socket.socket:
    """An AF_PACKET socket that queues only TCP SYNs (nothing captured before it returns)."""
    import ctypes

    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    try:
        prog = b"".join(struct.pack("HBBI", *ins) for ins in _SYN_ONLY_BPF)
        buf = ctypes.create_string_buffer(prog)
        fprog = struct.pack("HL", len(_SYN_ONLY_BPF), ctypes.addressof(buf))
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
        if ifname:
            sock.bind((ifname, 0))
        sock.setblocking(False)
        while True:                 # drop what slipped in before the filter was attached
            try:
                sock.recv(65535)
            except BlockingIOError:
                break
    except BaseException:
        sock.close()
        raise
    return sock


class LoCapture:
    """Outgoing TCP SYNs (IPv4 and IPv6) on ``lo`` (each loopback packet is seen once, as outgoing)."""

    def __init__(self, ifname: str = "lo") -> None:
        self.sock = capture_socket(ifname)

    def __enter__(self) -> LoCapture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def syns(self, match: Callable[[Seen], bool]) -> list[Seen]:
        """Drain what was captured; return the SYNs (no ACK) ``match`` accepts, in order."""
        out: list[Seen] = []
        while True:
            try:
                frame, addr = self.sock.recvfrom(65535)
            except BlockingIOError:
                return out
            if addr[2] != PACKET_OUTGOING:
                continue
            seen = parse_ip_tcp(frame)
            if seen and seen.flags & 0x12 == 0x02 and match(seen):
                out.append(seen)


# --- the two sides of a punch, run in separate processes --------------------------------------

def punch_side(engine_name: str, local: tuple[str, int], remote: tuple[str, int],
               start_at: float, timeout: float, listen: bool, interval: float,
               hello: bytes) -> dict[str, Any]:
    """One peer: simultaneous_open, then swap a hello over the connection; picklable."""
    eng = engine_mod.get(engine_name)
    try:
        res = eng.simultaneous_open(local, remote, start_at, timeout, listen=listen,
                                    interval=interval)
    except PunchError as exc:
        return {"error": repr(exc), "stats": exc.stats.as_dict() if exc.stats else None}
    with res.sock as s:
        s.settimeout(5)
        s.sendall(hello)
        got = b""
        while len(got) < len(hello):
            chunk = s.recv(len(hello) - len(got))
            if not chunk:
                break
            got += chunk
        return {"stats": res.stats.as_dict(), "got": got, "blocking": s.getblocking(),
                "sockname": s.getsockname()[:2], "peername": s.getpeername()[:2]}


# Children come from a fork server: a clean single-threaded process, so a child never
# inherits a lock that one of pytest's threads held at fork time (a plain fork from the test
# process once hung a child for the whole test timeout), and multiprocessing.Pool's
# terminate() cannot hang on a worker that never answers: a late child is killed.
_PROCESSES = multiprocessing.get_context("forkserver")
_PROCESSES.set_forkserver_preload(["pyholepunch.engine", __name__])


def start_process_server() -> None:
    """Start the fork server now (it imports the engine once, ~0.3 s), so a test that sets a
    start instant before forking does not spend its margin on that."""
    from multiprocessing import forkserver
    forkserver.ensure_running()


def _child(out: Any, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        out.send(("ok", fn(*args)))
    except BaseException as exc:  # noqa: BLE001 - reported to the test, which raises it
        out.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        out.close()


def run_in_processes(*calls: tuple[Callable[..., Any], tuple[Any, ...]],
                     timeout: float = 15) -> list[Any]:
    """Run each (fn, args) in its own process at once; return their results in order.

    A child that raises, or gives nothing within ``timeout`` s, fails the call with its name;
    every child is gone when this returns."""
    start_process_server()
    procs: list[Any] = []
    pipes: list[Any] = []
    try:
        for fn, args in calls:
            reader, writer = _PROCESSES.Pipe(duplex=False)
            proc = _PROCESSES.Process(target=_child, args=(writer, fn, args),
                                      name=f"{fn.__name__}#{len(procs)}", daemon=True)
            pipes.append(reader)
            try:
                proc.start()
            finally:
                writer.close()
            procs.append(proc)
        deadline = time.monotonic() + timeout
        results = []
        for proc, reader in zip(procs, pipes, strict=True):
            if not reader.poll(max(0.0, deadline - time.monotonic())):
                raise AssertionError(f"{proc.name} gave no result within {timeout} s")
            try:
                kind, value = reader.recv()
            except EOFError:
                proc.join(1)
                raise AssertionError(f"{proc.name} died (exit code {proc.exitcode})") from None
            if kind == "error":
                raise AssertionError(f"{proc.name} raised {value}")
            results.append(value)
        return results
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join(5)
            proc.close()
        for reader in pipes:
            reader.close()


# --- a private loopback whose RSTs are dropped, as a NAT drops unsolicited SYNs ---------------

CLONE_NEWNET = 0x40000000


def drop_rst_rules(ports: tuple[int, ...], table: str = "hpe") -> str:
    """An nft ruleset dropping outgoing TCP RSTs sent from ``ports``."""
    plist = ", ".join(str(p) for p in ports)
    return (f"table inet {table} {{\n chain out {{\n  type filter hook output priority 0;\n"
            f"  tcp sport {{ {plist} }} tcp flags & rst == rst drop\n }}\n}}\n")


@contextlib.contextmanager
def private_loopback(drop_rst_from: tuple[int, ...]) -> Iterator[str]:
    """A fresh network namespace (root): ``lo`` up, outgoing RSTs from these ports dropped.

    Two sockets punching each other on a plain loopback race: whichever SYN comes first is
    answered with RST, and both re-arm in lockstep. Behind real NATs that SYN is dropped
    instead, the first socket stays in SYN_SENT, and the peer's SYN completes a simultaneous
    open deterministically. Dropping our own RSTs recreates exactly that.
    """
    import secrets
    import subprocess

    name = f"hpe{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        if drop_rst_from:
            subprocess.run(["ip", "netns", "exec", name, "nft", "-f", "-"],
                           input=drop_rst_rules(drop_rst_from), text=True, check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def in_netns(name: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Call ``fn(*args)`` from inside namespace ``name`` (this thread moves there for good)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({name}): {os.strerror(err)}")
    finally:
        os.close(fd)
    return fn(*args)


def listen_later(sock: socket.socket, addr: tuple[str, int], delay: float,
                 backlog: int = 1) -> threading.Thread:
    """Bind ``sock`` to ``addr`` and listen after ``delay`` s, in a thread (started: join it);
    until then the port answers RST."""
    def come_up() -> None:
        time.sleep(delay)
        sock.bind(addr)
        sock.listen(backlog)

    t = threading.Thread(target=come_up)
    t.start()
    return t


async def ticks_during(work: Awaitable[object]) -> int:
    """How many 10 ms sleeps the running loop completed while ``work`` ran: a blocking call
    made from asyncio must leave the loop free."""
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    try:
        await work
    finally:
        task.cancel()
    return ticks
