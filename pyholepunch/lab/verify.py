"""`lab verify`: measure each NAT type's real behaviour from inside the lab and compare it with
its row in docs/lab.md (the NAT types table).

Deliberately independent of the project's STUN code (which is tested against this): a tiny
probe server of its own (plain sockets made inside the server namespace) tells a client its
observed address ("MAP") and, on request, contacts it back from another address or port
("BACK"), over UDP by a datagram and over TCP by a connect-back. Sockets are created inside
the right namespace by this very process, so nothing forks and all types run concurrently.
"""
from __future__ import annotations

import logging
import random
import selectors
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from ..address import Address
from .lab import Lab
from .nat import NAT_TYPES, ROWS

M = TypeVar("M")

log = logging.getLogger(__name__)

P1, P2 = 3478, 3479


def _family(ip: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def _reuse(s: socket.socket) -> socket.socket:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    return s


def _connect(s: socket.socket, dst: Address, timeout: float) -> str:
    """ok | rst | timeout | the errno name: what a SYN to `dst` got back."""
    s.settimeout(timeout)
    try:
        s.connect(dst)
        return "ok"
    except ConnectionRefusedError:
        return "rst"
    except TimeoutError:
        return "timeout"
    except OSError as exc:
        return f"error:{exc.errno}"


class ProbeServer:
    """MAP / BACK responder on both server addresses and two ports, TCP and UDP."""

    def __init__(self, lab: Lab, back_timeout: float) -> None:
        self.lab, self.back_timeout = lab, back_timeout
        ips = [lab.server_ip, lab.server_alt_ip]
        if lab.describe()["public6"]:           # the lab has IPv6: serve it too
            ips += [lab.server_ip6, lab.server_alt_ip6]
        self.endpoints = [(ip, p) for ip in ips for p in (P1, P2)]
        self._sel = selectors.DefaultSelector()
        self._udp: dict[Address, socket.socket] = {}
        self._socks: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"probe-{lab.name}", daemon=True)

    def __enter__(self) -> ProbeServer:
        for ep in self.endpoints:
            family = _family(ep[0])
            u = _reuse(self.lab.socket("server", family, socket.SOCK_DGRAM))
            u.bind(ep)
            t = _reuse(self.lab.socket("server", family))
            t.bind(ep)
            t.listen(64)
            self._udp[ep] = u
            self._socks += [u, t]
            self._sel.register(u, selectors.EVENT_READ, ("udp", ep))
            self._sel.register(t, selectors.EVENT_READ, ("tcp", ep))
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)
        for s in self._socks:
            s.close()
        self._sel.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._sel.select(0.05):
                kind, ep = key.data
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                if kind == "udp":
                    self._on_datagram(sock, *sock.recvfrom(512))
                else:
                    conn, peer = sock.accept()
                    threading.Thread(target=self._on_stream, args=(conn, peer), daemon=True).start()

    def _on_datagram(self, sock: socket.socket, data: bytes, peer: Address) -> None:
        words = data.decode(errors="replace").split()
        if words[:1] == ["MAP"]:
            sock.sendto(f"{peer[0]} {peer[1]}".encode(), peer)
        elif words[:1] == ["BACK"] and len(words) == 4:
            src = (words[1], int(words[2]))
            if src in self._udp:
                self._udp[src].sendto(words[3].encode(), peer)

    def _on_stream(self, conn: socket.socket, peer: Address) -> None:
        """Line requests until EOF: "MAP" -> "ip port"; "BACK ip port" -> ok|rst|timeout."""
        with conn:
            conn.settimeout(5)
            try:
                for raw in conn.makefile("r"):
                    line = raw.split()
                    if line[:1] == ["MAP"]:
                        conn.sendall(f"{peer[0]} {peer[1]}\n".encode())
                    elif line[:1] == ["BACK"] and len(line) == 3:
                        with _reuse(self.lab.socket("server", _family(line[1]))) as s:
                            s.bind((line[1], int(line[2])))
                            conn.sendall((_connect(s, peer, self.back_timeout) + "\n").encode())
                    else:
                        return
            except OSError as exc:
                log.debug("probe stream from %s: %s", peer, exc)


@dataclass
class Measured:
    nat_type: str
    mapping: str = "?"
    allocation: str = "?"
    delta: int | None = None
    filtering: str = "?"
    unsolicited_syn: str = "?"
    hairpin: str = "?"          # "yes" with hairpin=True and "no" with hairpin=False, both seen
    raw: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


class Client:
    """Sockets in `node`, bound to `ip` (its family; default the IPv4 wildcard)."""

    def __init__(self, lab: Lab, node: str, wait: float, ip: str = "0.0.0.0") -> None:
        self.lab, self.node, self.wait, self.ip = lab, node, wait, ip

    def udp(self, port: int) -> socket.socket:
        s = self.lab.socket(self.node, _family(self.ip), socket.SOCK_DGRAM)
        s.bind((self.ip, port))
        return s

    def tcp(self, port: int) -> socket.socket:
        s = _reuse(self.lab.socket(self.node, _family(self.ip)))
        s.bind((self.ip, port))
        return s

    @staticmethod
    def udp_map(s: socket.socket, dst: Address) -> Address:
        s.settimeout(0.4)
        for _ in range(5):
            s.sendto(b"MAP", dst)
            try:
                ip, port = s.recv(512).decode().split()
                return ip, int(port)
            except TimeoutError:
                continue
        raise TimeoutError(f"no UDP MAP answer from {dst}")

    def tcp_map(self, local: int, dst: Address, timeout: float = 3) -> tuple[Address, socket.socket]:
        s = self.tcp(local)
        res = _connect(s, dst, timeout)
        if res != "ok":
            s.close()
            raise OSError(f"TCP to {dst} from port {local}: {res}")
        s.settimeout(3)
        s.sendall(b"MAP\n")
        ip, port = s.makefile("r").readline().split()
        return (ip, int(port)), s

    def udp_tokens(self, s: socket.socket, want: set[str]) -> set[str]:
        got: set[str] = set()
        deadline = time.monotonic() + self.wait
        while got != want and (left := deadline - time.monotonic()) > 0:
            s.settimeout(left)
            try:
                got.add(s.recv(512).decode())
            except TimeoutError:
                break
        return got


def _ports(n: int) -> list[int]:
    return random.sample(range(40000, 50000), n)


def measure(lab: Lab, node: str = "a", wait: float = 1.0) -> dict[str, Any]:
    """Raw observations for the NAT in front of `node` (the lab's probe server must be running)."""
    c = Client(lab, node, wait)
    s1, s2, s3 = (lab.server_ip, P1), (lab.server_ip, P2), (lab.server_alt_ip, P1)
    lu, lt, lf, lb = _ports(4)
    out: dict[str, Any] = {"local": {"udp": lu, "tcp": lt}, "private": lab.private_ip(node),
                           "public": lab.public_ip(node)}
    with c.udp(lu) as u:
        out["udp_map"] = [c.udp_map(u, d) for d in (s1, s2, s3)]
    with c.udp(lf) as u:
        c.udp_map(u, s1)  # the outbound packet that opens the mapping
        for src, tok in ((s1, "same"), (s2, "port"), (s3, "addr")):
            u.sendto(f"BACK {src[0]} {src[1]} {tok}".encode(), s1)
        out["udp_back"] = sorted(c.udp_tokens(u, {"same", "port", "addr"}))
    maps, held = [], []
    try:
        for d in (s1, s2, s3):
            m, s = c.tcp_map(lt, d)
            maps.append(m)
            held.append(s)
    finally:
        for s in held:
            s.close()
    out["tcp_map"] = maps
    listener = c.tcp(lb)
    listener.listen(8)
    try:
        _, ctl = c.tcp_map(lb, s1)
        back = {}
        with ctl:
            rd = ctl.makefile("r")
            for src, label in ((s2, "port"), (s3, "addr")):
                ctl.sendall(f"BACK {src[0]} {src[1]}\n".encode())
                back[label] = rd.readline().strip() or "no-answer"
        listener.settimeout(0.2)
        accepted = 0
        while True:
            try:
                conn, _ = listener.accept()
                conn.close()
                accepted += 1
            except TimeoutError:
                break
        out["tcp_back"], out["tcp_back_accepted"] = back, accepted
    finally:
        listener.close()
    return out


def measure_hairpin(lab: Lab, wait: float = 1.0) -> dict[str, bool]:
    """Can a and b, behind one NAT, reach each other at their public mappings (as learned from
    the server)?  Both sides send at once, as a punch does: UDP datagrams both ways; TCP
    connects both ways (re-armed every 250 ms) with listeners on the same ports."""
    ca, cb = Client(lab, "a", wait), Client(lab, "b", wait)
    s1 = (lab.server_ip, P1)
    pa, pb, la, lb = _ports(4)
    result = {}
    with ca.udp(pa) as ua, cb.udp(pb) as ub:
        ma, mb = ca.udp_map(ua, s1), cb.udp_map(ub, s1)
        got: set[str] = set()
        deadline = time.monotonic() + 2 * wait
        for s in (ua, ub):
            s.setblocking(False)
        while got != {"a", "b"} and time.monotonic() < deadline:
            ua.sendto(b"hairpin", mb)
            ub.sendto(b"hairpin", ma)
            time.sleep(0.05)
            for name, s in (("a", ua), ("b", ub)):
                try:
                    if s.recv(64) == b"hairpin":
                        got.add(name)
                except BlockingIOError:
                    pass
        result["udp"] = got == {"a", "b"}
    listeners = [ca.tcp(la), cb.tcp(lb)]
    try:
        for li in listeners:
            li.listen(8)
        ta, ctl_a = ca.tcp_map(la, s1)
        tb, ctl_b = cb.tcp_map(lb, s1)
        with ctl_a, ctl_b:
            result["tcp"] = simultaneous_open([(ca, la, tb), (cb, lb, ta)], listeners, 2.5 * wait)
    finally:
        for li in listeners:
            li.close()
    return result


def simultaneous_open(sides: list[tuple[Client, int, Address]], listeners: list[socket.socket],
                      budget: float) -> bool:
    sel = selectors.DefaultSelector()
    for li in listeners:
        li.setblocking(False)
        sel.register(li, selectors.EVENT_READ, None)
    pending: dict[int, socket.socket] = {}
    deadline = time.monotonic() + budget
    try:
        while time.monotonic() < deadline:
            for i, (client, port, dst) in enumerate(sides):  # (re-)arm a fresh SYN each round
                old = pending.pop(i, None)
                if old is not None:
                    if old.fileno() in sel.get_map():
                        sel.unregister(old)
                    old.close()
                s = client.tcp(port)
                s.setblocking(False)
                s.connect_ex(dst)
                pending[i] = s
                sel.register(s, selectors.EVENT_WRITE, i)
            round_end = min(deadline, time.monotonic() + 0.25)
            while (left := round_end - time.monotonic()) > 0:
                for key, _ in sel.select(left):
                    if key.data is None:
                        return True  # a listener got a connection through the NAT
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                        return True
                    sel.unregister(sock)  # refused: wait for the next round
        return False
    finally:
        for s in pending.values():
            s.close()
        sel.close()


def interpret(nat_type: str, raw: dict[str, Any]) -> Measured:
    m = Measured(nat_type, raw=raw)
    verdicts = {}
    for proto in ("udp", "tcp"):
        maps = [tuple(x) for x in raw[f"{proto}_map"]]
        local = raw["local"][proto]
        ports = [p for _, p in maps]
        if len(set(maps)) == 1:
            mapping = "public" if maps[0] == (raw["private"], local) else "endpoint-independent"
            alloc = "public" if mapping == "public" else ("preserving" if ports[0] == local else "other")
            delta = None
        elif maps[0] == maps[1]:
            mapping, alloc, delta = "address-dependent", "?", None
        else:
            mapping = "address-and-port-dependent"
            deltas = {b - a for a, b in zip(ports, ports[1:], strict=False)}
            delta = deltas.pop() if len(deltas) == 1 else None
            alloc = "sequential" if delta == 1 else "random"
        verdicts[proto] = (mapping, alloc, delta)
    if verdicts["udp"][:2] != verdicts["tcp"][:2]:
        m.problems.append(f"UDP and TCP mapping differ: {verdicts['udp']} vs {verdicts['tcp']}")
    m.mapping, m.allocation, m.delta = verdicts["tcp"]
    udp_back = set(raw["udp_back"])
    tcp_back = raw["tcp_back"]
    if "same" not in udp_back:
        m.problems.append("UDP control datagram from the contacted endpoint never arrived")
    filt = {}
    for proto, port_ok, addr_ok in (("udp", "port" in udp_back, "addr" in udp_back),
                                    ("tcp", tcp_back["port"] == "ok", tcp_back["addr"] == "ok")):
        if port_ok and addr_ok:
            filt[proto] = "open" if m.mapping == "public" else "endpoint-independent"
        elif port_ok:
            filt[proto] = "address-dependent"
        elif addr_ok:
            filt[proto] = "inconsistent"
        else:
            filt[proto] = "address-and-port-dependent"
    if filt["udp"] != filt["tcp"]:
        m.problems.append(f"UDP and TCP filtering differ: {filt['udp']} vs {filt['tcp']}")
    m.filtering = filt["tcp"]
    m.unsolicited_syn = {"ok": "reaches-host", "rst": "rst", "timeout": "drop"}.get(
        tcp_back["addr"], tcp_back["addr"])
    row = ROWS[nat_type]
    for name in ("mapping", "allocation", "filtering", "unsolicited_syn"):
        if getattr(m, name) != getattr(row, name):
            m.problems.append(f"{name}: measured {getattr(m, name)}, expected {getattr(row, name)}")
    if m.allocation == "sequential" and m.delta != 1:
        m.problems.append(f"sequential delta {m.delta}, expected 1")
    return m


def _behaviour(nat_type: str, wait: float) -> Measured:
    with Lab(a=nat_type, b="none") as lab, ProbeServer(lab, wait):
        return interpret(nat_type, measure(lab, "a", wait))


def _hairpin(nat_type: str, hairpin: bool, wait: float) -> dict[str, bool]:
    with Lab(a=nat_type, same_nat=True, hairpin=hairpin) as lab, ProbeServer(lab, wait):
        return measure_hairpin(lab, wait)


def verify_type(nat_type: str, wait: float = 1.0) -> Measured:
    """Build this type's labs (behaviour; same NAT with hairpin on; off), measure them at once,
    and compare with the type's row."""
    if nat_type == "none":
        m = _behaviour(nat_type, wait)
        m.hairpin = "n/a"
        return m
    with ThreadPoolExecutor(max_workers=3) as pool:
        behaviour = pool.submit(_behaviour, nat_type, wait)
        hairpins = {h: pool.submit(_hairpin, nat_type, h, wait) for h in (True, False)}
        m = behaviour.result()
        seen = {h: f.result() for h, f in hairpins.items()}
    m.raw["hairpin"] = {str(k): v for k, v in seen.items()}
    on, off = all(seen[True].values()), not any(seen[False].values())
    m.hairpin = "yes/no" if on and off else f"on:{seen[True]} off:{seen[False]}"
    if not (on and off):
        m.problems.append(f"hairpin: with hairpin=True {seen[True]}, with hairpin=False {seen[False]}")
    return m


def verify(types: list[str] | None = None, wait: float = 1.0) -> list[Measured]:
    """Verify every type (concurrently: each waits mostly on timeouts)."""
    return verify_each(list(types or NAT_TYPES), NAT_TYPES, "NAT type",
                       lambda t: verify_type(t, wait),
                       lambda t, exc: Measured(t, problems=[f"measurement failed: {exc}"]))


def verify_each(names: list[str], known: Sequence[str], what: str, one: Callable[[str], M],
                failed: Callable[[str, Exception], M]) -> list[M]:
    """``one(name)`` for every name, concurrently (each waits mostly on timeouts): an unknown
    name is a ValueError up front; one that raises becomes ``failed(name, exc)`` and the others
    go on. The IPv4 types and the IPv6 behaviours (verify6) are verified this way."""
    for name in names:
        if name not in known:
            raise ValueError(f"unknown {what} {name!r}; choose one of {', '.join(known)}")

    def safe(name: str) -> M:
        try:
            return one(name)
        except Exception as exc:  # noqa: BLE001 - reported as this one's failure, others go on
            log.exception("verifying %s %s failed", what, name)
            return failed(name, exc)

    with ThreadPoolExecutor(max_workers=len(names)) as pool:
        return list(pool.map(safe, names))


COLUMNS = ("nat_type", "mapping", "allocation", "filtering", "unsolicited_syn", "hairpin")


def table(results: list[Measured]) -> str:
    def short(v: object) -> str:
        return {"endpoint-independent": "EI", "address-dependent": "AD",
                "address-and-port-dependent": "APD"}.get(str(v), str(v))

    rows = [["type", "mapping", "allocation", "filtering", "unsolicited SYN", "hairpin on/off", "verdict"]]
    for m in results:
        alloc = m.allocation + (f" (delta {m.delta})" if m.delta is not None else "")
        rows.append([m.nat_type, short(m.mapping), alloc, short(m.filtering), m.unsolicited_syn,
                     m.hairpin, "ok" if m.ok else "DIFFERS: " + "; ".join(m.problems)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1] for r in rows]
    return "\n".join(lines)


def as_json(results: list[Measured]) -> list[dict[str, Any]]:
    return [asdict(m) | {"ok": m.ok} for m in results]

