"""`lab verify` for IPv6: measure each side behaviour (none | open | firewall | firewall-rst |
blackhole) from inside a lab and compare it with its row (nat.V6_ROWS).

Like verify.py, and with its probe server, independent of the project's STUN code. Three
observations per behaviour, made with plain sockets created in the namespaces by this process:
an outbound TCP connect to the server (and the source address the server saw: IPv6 has no NAT,
so it must be the host's own), an unsolicited SYN from the server's other address, and a
simultaneous open (crossing SYNs, re-armed every 250 ms, no listener on either side) between the
host and the server — what a stateful firewall must let through for hole punching.
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from .lab import Lab
from .nat import V6_BEHAVIOURS, V6_ROWS
from .verify import P1, ProbeServer, _Client, _connect, _ports, _simultaneous_open

log = logging.getLogger(__name__)

_RST_TABLE = "hpl_verify6"
_UNREACHABLE = {"error:101", "error:113", "error:99"}   # ENETUNREACH, EHOSTUNREACH, EADDRNOTAVAIL


def _word(outcome: str) -> str:
    return "unreachable" if outcome in _UNREACHABLE else outcome


def measure6(lab: Lab, node: str = "a", wait: float = 1.0) -> dict[str, Any]:
    """Raw IPv6 observations for `node`'s side (the lab's probe server must be running)."""
    try:
        own: str | None = lab.public_ip6(node)
    except ValueError:
        own = None
    out: dict[str, Any] = {"behaviour": lab.v6_behaviour(node), "own": own}
    host = _Client(lab, node, wait, "::")
    lo, lu, ls, lh = _ports(4)
    with host.tcp(lo) as s:
        out["outbound"] = _word(_connect(s, (lab.server_ip6, P1), wait))
        if out["outbound"] == "ok":
            s.sendall(b"MAP\n")
            out["observed"] = s.makefile("r").readline().split()[0]
    if own is None:
        return out
    with host.tcp(lu) as listener:
        listener.listen(4)
        with _Client(lab, "server", wait, lab.server_alt_ip6).tcp(0) as s:
            out["unsolicited"] = _word(_connect(s, (own, lu), wait))
    # Crossing SYNs, the host's first. The server's kernel must not answer the host's SYN with
    # a RST (it would if it came before the server's own SYN left, and a NAT or firewall on the
    # server's side would drop it): so only the server's SYN can complete the connection, and
    # it passes only if the host's uplink lets a flow the host started come in.
    rules = (f"table inet {_RST_TABLE} {{\n chain out {{\n  type filter hook output priority 0;\n"
             f"  tcp sport {ls} tcp flags & rst == rst drop\n }}\n}}\n")
    r = lab.run("server", ["nft", "-f", "-"], input=rules)
    if r.returncode != 0:
        raise RuntimeError(f"nft: {r.stderr.strip()}")
    try:
        server = _Client(lab, "server", wait, lab.server_ip6)
        out["simultaneous_open"] = _simultaneous_open(
            [(host, lh, (lab.server_ip6, ls)), (server, ls, (own, lh))], [], 2.5 * wait)
    finally:
        lab.run("server", ["nft", "delete", "table", "inet", _RST_TABLE])
    return out


@dataclass
class Measured6:
    behaviour: str
    outbound: str = "?"
    unsolicited_syn: str = "?"
    simultaneous_open: str = "?"
    address: str = "?"          # "own" when the server saw the host's own address
    raw: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def interpret6(behaviour: str, raw: dict[str, Any]) -> Measured6:
    m = Measured6(behaviour, raw=raw)
    m.outbound = raw["outbound"]
    if "observed" in raw:
        m.address = "own" if raw["observed"] == raw["own"] else f"translated to {raw['observed']}"
        if m.address != "own":
            m.problems.append(f"the server saw {raw['observed']}, not the host's {raw['own']}")
    else:
        m.address = "n/a"
    if "unsolicited" in raw:
        m.unsolicited_syn = {"ok": "reaches-host", "rst": "rst", "timeout": "drop"}.get(
            raw["unsolicited"], raw["unsolicited"])
        m.simultaneous_open = "pass" if raw["simultaneous_open"] else "fail"
    else:
        m.unsolicited_syn = m.simultaneous_open = "n/a"
    row = V6_ROWS[behaviour]
    for name in ("outbound", "unsolicited_syn", "simultaneous_open"):
        if getattr(m, name) != getattr(row, name):
            m.problems.append(f"{name}: measured {getattr(m, name)}, expected {getattr(row, name)}")
    return m


def verify_behaviour(behaviour: str, wait: float = 1.0) -> Measured6:
    """One lab with `behaviour` on side a (side b open, so the server has IPv6 either way)."""
    with Lab(a="port-restricted", b="none", v6_a=behaviour, v6_b="open") as lab, \
            ProbeServer(lab, wait):
        return interpret6(behaviour, measure6(lab, "a", wait))


def verify6(behaviours: list[str] | None = None, wait: float = 1.0) -> list[Measured6]:
    """Verify every IPv6 behaviour, concurrently (each waits mostly on timeouts)."""
    todo = list(behaviours or V6_BEHAVIOURS)
    for b in todo:
        if b not in V6_BEHAVIOURS:
            raise ValueError(f"unknown IPv6 behaviour {b!r}; choose one of {', '.join(V6_BEHAVIOURS)}")
    with ThreadPoolExecutor(max_workers=len(todo)) as pool:
        futures = {b: pool.submit(_safe, b, wait) for b in todo}
        return [futures[b].result() for b in todo]


def _safe(behaviour: str, wait: float) -> Measured6:
    try:
        return verify_behaviour(behaviour, wait)
    except Exception as exc:  # noqa: BLE001 - reported as this behaviour's failure
        log.exception("verifying IPv6 behaviour %s failed", behaviour)
        return Measured6(behaviour, problems=[f"measurement failed: {exc}"])


def table6(results: list[Measured6]) -> str:
    rows = [["ipv6", "outbound", "address", "unsolicited SYN", "simultaneous open", "verdict"]]
    for m in results:
        rows.append([m.behaviour, m.outbound, m.address, m.unsolicited_syn, m.simultaneous_open,
                     "ok" if m.ok else "DIFFERS: " + "; ".join(m.problems)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1]
                     for r in rows)


def as_json6(results: list[Measured6]) -> list[dict[str, Any]]:
    return [{"v6_behaviour": m.behaviour} | asdict(m) | {"ok": m.ok} for m in results]
