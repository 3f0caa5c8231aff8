"""Choosing the plan: each NAT profile folds into a :class:`Behaviour`, one table maps each
pair of behaviours to its ordered tactics, :func:`plan` turns them into steps with budgets
from the measured RTT. Pure and deterministic: no sockets, no clock, no randomness."""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from ..nat.profile import Allocation, Filtering, Mapping, NatProfile, SynResponse
from .steps import (
    MAX_COUNT,
    PORT_SPAN,
    ROLES,
    Action,
    Plan,
    PortChoice,
    RoleInstruction,
    Step,
    StepKind,
    Target,
    other_role,
)


class Behaviour(Enum):
    """What matters about one NAT for punching, in planning order."""

    OPEN = "open"                 # unsolicited inbound reaches the host (no NAT, full cone)
    ADDR_CONE = "addr-cone"       # EIM, filters by address only (restricted cone)
    PORT_CONE = "port-cone"       # EIM, filters by address and port (or filtering unknown)
    SEQ_SYM = "seq-sym"           # per-destination mapping, sequential with a known delta
    RANDOM_SYM = "random-sym"     # per-destination mapping, unpredictable port
    UNKNOWN = "unknown"           # classification failed


def behaviour(p: NatProfile) -> Behaviour:
    # No translation but a stateful filter (an IPv6 firewall, RFC 6092) punches like a cone.
    filtered = p.filtering in (Filtering.ADDRESS_DEPENDENT, Filtering.ADDRESS_AND_PORT_DEPENDENT)
    if (p.mapping is Mapping.NONE and (not filtered or p.unsolicited_syn is SynResponse.ACCEPT)) \
            or (p.mapping is Mapping.ENDPOINT_INDEPENDENT and (
                p.filtering in (Filtering.NONE, Filtering.ENDPOINT_INDEPENDENT)
                or p.unsolicited_syn is SynResponse.ACCEPT)):
        return Behaviour.OPEN
    if p.mapping in (Mapping.NONE, Mapping.ENDPOINT_INDEPENDENT):
        # Unknown filtering: assume the strictest cone, whose tactics also work for the others.
        return Behaviour.ADDR_CONE if p.filtering is Filtering.ADDRESS_DEPENDENT else Behaviour.PORT_CONE
    if p.mapping in (Mapping.ADDRESS_DEPENDENT, Mapping.ADDRESS_AND_PORT_DEPENDENT):
        if p.allocation is Allocation.SEQUENTIAL and p.delta:
            return Behaviour.SEQ_SYM
        return Behaviour.RANDOM_SYM
    return Behaviour.UNKNOWN


def answers_unsolicited(p: NatProfile) -> bool:
    """Does the NAT answer an unsolicited SYN (RST or ICMP), killing an early simopen SYN?"""
    return p.unsolicited_syn in (SynResponse.RST, SynResponse.ICMP)


@dataclass(frozen=True)
class _Tactic:
    kind: StepKind
    side: str = ""                # "a" / "b": the listening (direct) or symmetric (sweeps) side


_B = Behaviour
_DIRECT_A, _DIRECT_B = _Tactic(StepKind.DIRECT, "a"), _Tactic(StepKind.DIRECT, "b")
_SIMOPEN, _LOW_TTL = _Tactic(StepKind.SIMOPEN), _Tactic(StepKind.SIMOPEN_LOW_TTL)
_PREDICT_A, _PREDICT_B = _Tactic(StepKind.PREDICT_SWEEP, "a"), _Tactic(StepKind.PREDICT_SWEEP, "b")
_MUTUAL = _Tactic(StepKind.PREDICT_SWEEP, "both")
_BIRTHDAY_A, _BIRTHDAY_B = _Tactic(StepKind.BIRTHDAY, "a"), _Tactic(StepKind.BIRTHDAY, "b")

# One row per unordered pair of behaviours, key in Behaviour order (a <= b). When a == b, a is
# the initiator. DIRECT's side listens (the other dials); a sweep's side is the symmetric one.
# After a direct step, the next row entries are the fallback should the listener's mapping
# have expired. SIMOPEN_LOW_TTL is
# dropped when neither NAT answers unsolicited SYNs. An empty row means relay only.
_RULES: dict[tuple[Behaviour, Behaviour], tuple[_Tactic, ...]] = {
    (_B.OPEN, _B.OPEN): (_DIRECT_B, _SIMOPEN),
    (_B.OPEN, _B.ADDR_CONE): (_DIRECT_A, _SIMOPEN),
    (_B.OPEN, _B.PORT_CONE): (_DIRECT_A, _SIMOPEN, _LOW_TTL),
    (_B.OPEN, _B.SEQ_SYM): (_DIRECT_A, _PREDICT_B),
    (_B.OPEN, _B.RANDOM_SYM): (_DIRECT_A, _BIRTHDAY_B),
    (_B.OPEN, _B.UNKNOWN): (_DIRECT_A, _SIMOPEN),
    (_B.ADDR_CONE, _B.ADDR_CONE): (_SIMOPEN, _LOW_TTL),
    (_B.ADDR_CONE, _B.PORT_CONE): (_SIMOPEN, _LOW_TTL),
    (_B.ADDR_CONE, _B.SEQ_SYM): (_PREDICT_B,),
    (_B.ADDR_CONE, _B.RANDOM_SYM): (_BIRTHDAY_B,),
    (_B.ADDR_CONE, _B.UNKNOWN): (_SIMOPEN, _LOW_TTL),
    (_B.PORT_CONE, _B.PORT_CONE): (_SIMOPEN, _LOW_TTL),
    (_B.PORT_CONE, _B.SEQ_SYM): (_PREDICT_B,),
    (_B.PORT_CONE, _B.RANDOM_SYM): (_BIRTHDAY_B,),
    (_B.PORT_CONE, _B.UNKNOWN): (_SIMOPEN, _LOW_TTL),
    (_B.SEQ_SYM, _B.SEQ_SYM): (_MUTUAL,),
    (_B.SEQ_SYM, _B.RANDOM_SYM): (),
    (_B.SEQ_SYM, _B.UNKNOWN): (_DIRECT_B,),
    (_B.RANDOM_SYM, _B.RANDOM_SYM): (),
    (_B.RANDOM_SYM, _B.UNKNOWN): (_DIRECT_B,),
    (_B.UNKNOWN, _B.UNKNOWN): (_SIMOPEN, _LOW_TTL),
}
_ORDER = list(Behaviour)

_NO_DIRECT_REASON = {
    frozenset({_B.RANDOM_SYM}): "both NATs map every destination to a new unpredictable port",
    frozenset({_B.SEQ_SYM, _B.RANDOM_SYM}): (
        "both NATs map every destination to a new port and one of them picks it at random"),
}


def birthday_probability(n_local: int, n_remote: int, port_range: int | None = None) -> float:
    """Chance that a birthday sweep of ``n_local`` x ``n_remote`` sockets finds a common port."""
    size = port_range or PORT_SPAN
    return -math.expm1(-n_local * n_remote / size)


def plan(
    initiator: NatProfile,
    responder: NatProfile,
    *,
    same_public_ip: bool | None = None,
    relay: bool = True,
    rtt: float = 0.1,
    clock_error: float = 0.02,
    birthday_size: int = 1024,
    predict_count: int = 32,
    low_ttl: int = 2,
) -> Plan:
    """The ordered punch plan for ``initiator`` -> ``responder`` (both TCP profiles).

    ``same_public_ip``: the server saw both peers from one address (None: compare the
    profiles' public addresses). ``rtt``: peer-to-peer round trip estimate (s), scales budgets
    and start delays. ``clock_error``: how far apart the two peers' clocks may be (s).
    ``birthday_size``: sockets on the symmetric side of a birthday sweep, the cone side opens
    half as many (1024 x 1024 measured 20/20 in the lab, 512 x 512 only 16-20/20 when the
    symmetric side still waited for the cone's SYNs; 1024 x 512 80/80 in bench_punch).
    ``predict_count``: fresh sockets of a sequential prediction
    sweep; the cone side aims at twice as many predicted ports, allowing that many other
    connections through the NAT between the server's observation and the sweep (drift).
    ``low_ttl``: TTL that passes our own NAT but dies before the peer's (2: one NAT hop, then
    the first router beyond it; behind two NATs the SYN then opens only the inner one and the
    step degrades to a plain simultaneous open). Raises ValueError on a bad argument.
    """
    for name, value, lo, hi in (("rtt", rtt, 0.0, 10.0), ("clock_error", clock_error, 0.0, 5.0)):
        if not isinstance(value, (int, float)) or not math.isfinite(value) or not lo <= value <= hi:
            raise ValueError(f"{name} must be {lo}..{hi} seconds, got {value!r}")
    for name, ivalue, lo, hi in (("birthday_size", birthday_size, 1, MAX_COUNT),
                                 ("predict_count", predict_count, 1, MAX_COUNT // 2),
                                 ("low_ttl", low_ttl, 1, 255)):
        if not isinstance(ivalue, int) or isinstance(ivalue, bool) or not lo <= ivalue <= hi:
            raise ValueError(f"{name} must be an integer {lo}..{hi}, got {ivalue!r}")
    for name, p in (("initiator", initiator), ("responder", responder)):
        if not isinstance(p, NatProfile):
            raise ValueError(f"{name} must be a NatProfile, got {type(p).__name__}")
    ctx = _Context(initiator, responder, rtt, clock_error, birthday_size, predict_count, low_ttl)
    bi, br = behaviour(initiator), behaviour(responder)
    swapped = _ORDER.index(bi) > _ORDER.index(br)
    tactics = _RULES[(br, bi) if swapped else (bi, br)]
    # Map the table's sides to roles: "a" is the lower behaviour in the key.
    side_role = {"a": "responder" if swapped else "initiator",
                 "b": "initiator" if swapped else "responder"}

    if same_public_ip is None:
        same_public_ip = bool(set(initiator.public_ips) & set(responder.public_ips))
    steps: list[Step] = []
    if same_public_ip:
        steps.append(ctx.lan_step())
    # A router mapping makes its side as good as open: the other dials it first, and the
    # punching tactics of the pair stay behind it as the fallback.
    mapped = ctx.mapped_step()
    if mapped is not None:
        steps.append(mapped)
    for t in tactics:
        step = ctx.build(t, side_role)
        if step is not None:
            steps.append(step)
    # No parallel groups yet: the LAN step and the first public step would both listen on the
    # announced port, and a simultaneous open accepts only its own peer endpoint, so one could
    # swallow (and drop) the other's connection. LAN first costs at most its short budget.

    labels = f"{initiator.label} -> {responder.label}"
    no_direct = _NO_DIRECT_REASON.get(frozenset({bi, br}))
    if no_direct and not tactics and mapped is None:
        reason = (f"{labels}: no direct method short of brute force: {no_direct}; "
                  + ("relay" if relay else "no relay allowed, the pair cannot connect"))
    elif not steps:
        reason = f"{labels}: no direct method applies and no relay allowed"
    else:
        kinds = ", ".join(str(s.kind) for s in steps)
        reason = f"{labels}: {kinds}" + (", then relay if every direct step fails" if relay else "")
        if bi is _B.UNKNOWN or br is _B.UNKNOWN:
            reason += " (a NAT could not be classified: conservative plan)"
    if relay:
        steps.append(ctx.relay_step(no_direct if not tactics and mapped is None else None))
    return Plan(tuple(steps), reason, initiator.label, responder.label)


@dataclass(frozen=True)
class _Context:
    ini: NatProfile
    res: NatProfile
    rtt: float
    clock_error: float
    birthday_size: int
    predict_count: int
    low_ttl: int

    def profile(self, role: str) -> NatProfile:
        return self.ini if role == "initiator" else self.res

    def budget(self, base: float) -> float:
        # Dropped first SYNs are retransmitted by the kernel after ~1 s: base covers that.
        return round(base + 2 * self.rtt + self.clock_error, 3)

    def first_delay(self, sends: int) -> float:
        """Delay for the side whose SYNs must arrive after the other's ``sends`` SYNs left."""
        # ~20k connects/s covers both engines; only a quarter of the RTT is credited, since
        # the estimate may be high. Waiting too long costs only the wait.
        send_time = sends * 50e-6
        return round(max(0.0, send_time + self.clock_error - self.rtt / 4) + 0.005, 3)

    def sym_delay(self, cone: str, sends: int) -> float:
        """The symmetric side's start delay in a sweep against the cone side ``cone``.

        It must wait for the cone's ``sends`` SYNs only when the cone's NAT could kill its
        early SYNs (answering RST/ICMP, or not known to drop): behind a NAT known to drop
        them, whichever SYN of a matching pair comes second passes both NATs (the earlier
        one opened its own NAT's entry), so both sides start together; waiting cost the
        birthday sweep ~65 ms of its time to connect at 40 ms RTT (issue 18)."""
        if self.profile(cone).unsolicited_syn is SynResponse.DROP:
            return 0.0
        return self.first_delay(sends)

    def step(self, kind: StepKind, base: float, reason: str,
             by_role: dict[str, RoleInstruction]) -> Step:
        return Step(kind, self.budget(base), reason, by_role["initiator"], by_role["responder"])

    def mapped_step(self) -> Step | None:
        """DIRECT to a router port mapping, when a side has one and is not open already (the
        responder's first: it would listen in a DIRECT step anyway)."""
        for role in ROLES[::-1]:
            p = self.profile(role)
            if p.port_mapping is None or behaviour(p) is Behaviour.OPEN:
                continue
            other = other_role(role)
            host, port = p.port_mapping
            reason = (f"the {role}'s router mapped its punch port via {p.mapped_by or 'a port-mapping'} "
                      f"protocol to {host}:{port}: it listens, the {other} dials the mapping")
            dial = RoleInstruction(Action.CONNECT, target=Target.MAPPED, start_delay=self.first_delay(1))
            return self.step(StepKind.DIRECT, 1.0, reason,
                             {role: RoleInstruction(Action.LISTEN), other: dial})
        return None

    def lan_step(self) -> Step:
        ins = RoleInstruction(Action.SIMOPEN, target=Target.LAN)
        return Step(StepKind.LAN, round(1.0 + self.clock_error, 3),
                    "both peers appear from one public address: try their local addresses",
                    ins, ins)

    def relay_step(self, why: str | None) -> Step:
        ins = RoleInstruction(Action.RELAY)
        reason = f"no direct path: {why}" if why else "fallback when every direct step failed"
        return Step(StepKind.RELAY, round(5.0 + 4 * self.rtt, 3), reason, ins, ins)

    def build(self, t: _Tactic, side_role: dict[str, str]) -> Step | None:
        if t.kind is StepKind.DIRECT:
            return self._direct(side_role[t.side])
        if t.kind is StepKind.SIMOPEN:
            ins = RoleInstruction(Action.SIMOPEN)
            return self.step(StepKind.SIMOPEN, 1.5, "simultaneous open on the announced ports "
                             "(endpoint-independent mappings keep them)",
                             {"initiator": ins, "responder": ins})
        if t.kind is StepKind.SIMOPEN_LOW_TTL:
            return self._low_ttl()
        if t.kind is StepKind.PREDICT_SWEEP:
            if t.side == "both":
                return self._mutual()
            return self._predict(side_role[t.side])
        if t.kind is StepKind.BIRTHDAY:
            return self._birthday(side_role[t.side])
        raise AssertionError(t)  # pragma: no cover - the table holds only the kinds above

    def _direct(self, listener: str) -> Step:
        # The listener accepts from any port of the peer's address: the dialer comes from a
        # fresh port, which a symmetric NAT then maps to a port nobody can know in advance.
        # A full cone forwards it while the announced port's mapping lives (the announced
        # port was observed by the server, so it does). A listener behind an address-
        # filtering cone would have to open its filter first; the sweeps cover those pairs.
        other = other_role(listener)
        lp = self.profile(listener)
        if lp.mapping is Mapping.NONE:
            reason = f"the {listener} has a public address: it listens, the {other} connects"
        elif behaviour(lp) is Behaviour.OPEN:
            reason = (f"the {listener}'s NAT ({lp.label}) lets unsolicited SYNs in: it listens on "
                      f"its announced port, the {other} connects")
        else:
            reason = (f"the {listener}'s NAT ({lp.label}) may let unsolicited SYNs in: it listens, "
                      f"the {other} connects")
        dial = RoleInstruction(Action.CONNECT, start_delay=self.first_delay(1))
        return self.step(StepKind.DIRECT, 1.0, reason,
                         {listener: RoleInstruction(Action.LISTEN), other: dial})

    def _low_ttl(self) -> Step | None:
        by_role: dict[str, RoleInstruction] = {}
        for role in ROLES:
            peer = self.profile(other_role(role))
            # Only the role whose *peer* answers unsolicited SYNs needs its first SYN to die early.
            ttl = self.low_ttl if answers_unsolicited(peer) else None
            by_role[role] = RoleInstruction(Action.SIMOPEN, syn_ttl=ttl)
        if all(i.syn_ttl is None for i in by_role.values()):
            return None
        return self.step(StepKind.SIMOPEN_LOW_TTL, 1.5,
                         f"a NAT answers unsolicited SYNs with {self._answer()}: first SYN with "
                         f"TTL {self.low_ttl} opens our own NAT but dies before the peer's", by_role)

    def _answer(self) -> str:
        return "/".join(sorted({str(p.unsolicited_syn) for p in (self.ini, self.res)
                                if answers_unsolicited(p)}))

    def _predict(self, sym: str) -> Step:
        cone = other_role(sym)
        sp = self.profile(sym)
        n = self.predict_count
        # The cone aims from its one port at the ports the symmetric NAT will hand out next;
        # its SYNs leave first (behind a NAT that answers unsolicited SYNs: sym_delay) so the
        # symmetric side's SYNs meet open conntrack entries.
        # The cone targets 8n ports: up to 7n foreign mappings may land between the symmetric
        # side's announcement and its sweep (drift; 50 other flows/s behind a responder that
        # announced 3 s earlier is 150, and SYNs from one port cost little; bench_hard_pairs).
        cone_ins = RoleInstruction(Action.SWEEP_REMOTE_PORTS, ports=PortChoice.PREDICTED,
                                   count=min(MAX_COUNT, 8 * n), delta=sp.delta)
        sym_ins = RoleInstruction(Action.SWEEP_LOCAL_PORTS, count=n,
                                  start_delay=self.sym_delay(cone, n))
        reason = (f"the {sym}'s NAT allocates sequentially (delta {sp.delta:+d}): it opens {n} "
                  f"fresh ports towards the {cone}, which targets the predicted ports")
        return self.step(StepKind.PREDICT_SWEEP, 2.5, reason, {cone: cone_ins, sym: sym_ins})

    def probe_allowance(self) -> float:
        """Time for a sequential side's STUN probe (TCP handshake + binding) before its sweep."""
        return round(2.5 * self.rtt + 0.04, 3)

    def _mutual(self) -> Step:
        n = 2 * self.predict_count
        probe = self.probe_allowance()
        # Each side first re-measures its own NAT's position (other hosts take ports too) and
        # aims from there (strategy/sequential.py). The responder follows (punch.py): its SYNs
        # open its NAT first; the initiator's arrive after them, cycling through offsets for
        # the allocations nobody saw, over n/2 more sockets so every offset meets every shift.
        by_role = {role: RoleInstruction(
            Action.SWEEP_PAIRS, ports=PortChoice.PREDICTED,
            count=min(MAX_COUNT, n + n // 2) if role == "initiator" else min(MAX_COUNT, n),
            delta=self.profile(other_role(role)).delta,
            start_delay=round(probe + (self.first_delay(n) if role == "initiator" else 0.0), 3))
            for role in ROLES}
        return self.step(StepKind.PREDICT_SWEEP, 3.0 + probe,
                         f"both NATs allocate sequentially: each re-measures its position, then "
                         f"opens {n} fresh ports in order, aimed at the peer's predicted ports "
                         "shifted by its own drift", by_role)

    def _birthday(self, sym: str) -> Step:
        cone = other_role(sym)
        n, m = self.birthday_size, max(1, self.birthday_size // 2)
        # The cone side opens half as many: its sockets cost more (the follower runs on the
        # event loop and closes its losers before TLS can start); 1024 x 512 still finds a
        # pair with p = 1 - e^-8.1 and took 160 ms instead of 220 at 40 ms RTT (issue 18).
        cone_ins = RoleInstruction(Action.SWEEP_REMOTE_PORTS, ports=PortChoice.RANDOM, count=m)
        sym_ins = RoleInstruction(Action.SWEEP_LOCAL_PORTS, count=n,
                                  start_delay=self.sym_delay(cone, m))
        reason = (f"the {sym}'s NAT picks random ports: birthday sweep {n} x {m} "
                  f"(p = 1 - e^-{n * m / PORT_SPAN:.1f} over {PORT_SPAN} ports)"
                  + ("" if sym_ins.start_delay == 0 else f"; the {cone}'s SYNs leave first"))
        return self.step(StepKind.BIRTHDAY, 3.0, reason, {cone: cone_ins, sym: sym_ins})
