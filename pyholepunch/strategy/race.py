"""Dual stack: one plan per address family both peers have, raced as RFC 8305 does.

Each family both peers announced a public candidate in (strategy/candidates.py) gets the
plan :func:`planner.plan` chooses from that family's two TCP profiles (on IPv6 usually two
stateful firewalls, which punch like port-restricted cones, or an open host); its steps are
tagged with the family. punch.py runs the families as two lanes of a race: IPv6 at the
common start, IPv4 ``race_delay`` later (an RTT-derived "connection attempt delay"); the
first mutually authenticated connection wins and every other one is closed (race.py). The relay step
comes last, once, when every lane has failed. Peers with no family in common get a relay-only
plan whose reason says "no common address family". Pure and deterministic, like the planner.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from ..nat.profile import Family, NatProfile, Transport
from .candidates import FAMILIES, Candidate, families
from .planner import plan as plan_family
from .steps import Plan, Step, StepKind

# RFC 8305 §5: a "connection attempt delay" of 250 ms by default, at least 100 ms when taken
# from RTT history, never under 10 ms. Both peers start their lanes on the server's common
# schedule (no DNS, no unilateral connect), so the wait only has to cover the IPv6 lane's
# first SYN exchange: two RTTs, clamped to 50..250 ms (below the RFC's 100 ms floor on
# purpose: a blackholed IPv6 must cost IPv4 well under 300 ms).
MIN_RACE_DELAY = 0.05
MAX_RACE_DELAY = 0.25
NO_COMMON_FAMILY = "no common address family"


# The step budgets and start delays scale with the RTT. They were measured in the lab (40 ms)
# planned with 100 ms, the planner's default: below it the plan keeps those measured values
# (a mutual sequential sweep's probe allowance included); above it, a long path gets the
# budgets its round trips need (at 300 ms the probe alone takes 0.6 s).
PLANNED_RTT_FLOOR = 0.1


def race_delay(rtt: float) -> float:
    """The IPv4 lane's delay for a peer-to-peer round trip estimate ``rtt`` (seconds)."""
    return round(min(MAX_RACE_DELAY, max(MIN_RACE_DELAY, 2 * rtt)), 3)


def tcp_profile(profiles: Sequence[NatProfile], family: str) -> NatProfile:
    """The TCP profile of ``family`` (unknown when the peer sent none)."""
    for p in profiles:
        if p.transport is Transport.TCP and p.family == family:
            return p
    return NatProfile(family=Family(family))


def peer_families(candidates: Sequence[Candidate]) -> set[str]:
    """A peer's dialable families; a peer that announced nothing is taken as IPv4-only (a
    v1 peer registered before its first STUN answer)."""
    return families(candidates) if candidates else {"ipv4"}


def plan_race(initiator: Sequence[NatProfile], responder: Sequence[NatProfile],
              initiator_candidates: Sequence[Candidate] = (),
              responder_candidates: Sequence[Candidate] = (), *,
              rtt: float = 0.1, relay: bool = True) -> Plan:
    """The plan for a session: a lane per common family (IPv6 first), then the relay."""
    fam_i, fam_r = peer_families(initiator_candidates), peer_families(responder_candidates)
    common = [f for f in FAMILIES if f in fam_i and f in fam_r]
    if not common:
        reason = (f"{NO_COMMON_FAMILY}: the initiator has {_names(fam_i)}, the responder "
                  f"{_names(fam_r)}; " + ("relay" if relay else "no relay allowed"))
        steps: tuple[Step, ...] = ()
        if relay:   # the planner's relay step (its budget), with this reason
            fallback = plan_family(NatProfile(), NatProfile()).steps[-1]
            steps = (replace(fallback, reason=f"no direct path: {reason}"),)
        return Plan(steps, reason, _names(fam_i), _names(fam_r))
    lanes: list[tuple[str, Plan]] = []
    for fam in common:
        a, b = tcp_profile(initiator, fam), tcp_profile(responder, fam)
        # LAN step when the profiles show one public IPv4 address (the planner's rule); on
        # IPv6 the global addresses are the LAN addresses too.
        lanes.append((fam, plan_family(a, b, same_public_ip=None if fam == "ipv4" else False,
                                       relay=relay, rtt=max(rtt, PLANNED_RTT_FLOOR))))
    direct = [replace(s, family=fam) for fam, p in lanes for s in p.direct_steps]
    relays = [s for _, p in lanes for s in p.steps if s.kind is StepKind.RELAY]
    if len(lanes) == 1:
        fam, only = lanes[0]
        prefix = "" if fam == "ipv4" else f"{fam} "
        return Plan(tuple(direct + relays), f"{prefix}{only.reason}".strip(),
                    f"{prefix}{only.initiator_nat}", f"{prefix}{only.responder_nat}")
    delay = race_delay(rtt) if len({s.family for s in direct}) > 1 else 0.0
    parts = []
    for fam, p in lanes:
        when = f" (after {delay * 1000:.0f} ms)" if fam == "ipv4" and delay else ""
        parts.append(f"{fam}{when}: {p.reason}")
    relay_step = relays[:1]
    if relay_step and direct:
        relay_step = [replace(relay_step[0], reason="fallback when every direct step failed")]
    labels = [" / ".join(f"{fam} {getattr(p, side)}" for fam, p in lanes)
              for side in ("initiator_nat", "responder_nat")]
    return Plan(tuple(direct + relay_step), "; ".join(parts), labels[0], labels[1],
                race_delay=delay)


def _names(fams: set[str]) -> str:
    return "+".join(f for f in FAMILIES if f in fams) or "no address"
