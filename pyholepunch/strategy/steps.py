"""The punch plan as data: steps, what each role does in them, and the wire form PUNCH
carries (:meth:`Plan.to_dict`; :meth:`Plan.from_dict` validates what arrived). See the
package docstring for the vocabulary."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

PLAN_VERSION = 2                    # 2: steps carry a family, the plan a race_delay
READABLE_VERSIONS = (1, 2)          # a v1 plan is all IPv4, no race
FAMILIES = ("ipv6", "ipv4")
MAX_RACE_DELAY = 2.0
ROLES = ("initiator", "responder")
PORT_RANGE = (1024, 65535)          # where NATs allocate ports; birthday targets are drawn here
MAX_STEPS = 16
MAX_BUDGET = 60.0
MAX_COUNT = 4096
PORT_SPAN = PORT_RANGE[1] - PORT_RANGE[0] + 1


class StepKind(StrEnum):
    LAN = "lan"
    DIRECT = "direct"
    SIMOPEN = "simopen"
    SIMOPEN_LOW_TTL = "simopen-low-ttl"
    PREDICT_SWEEP = "predict-sweep"
    BIRTHDAY = "birthday"
    RELAY = "relay"


class Action(StrEnum):
    LISTEN = "listen"                          # accept on the announced port, from any peer port
    CONNECT = "connect"                        # one connect from a fresh port to the peer's port
    SIMOPEN = "simopen"                        # bind, listen and connect from one port
    SWEEP_LOCAL_PORTS = "sweep-local-ports"    # `count` fresh local ports -> the peer's one port
    SWEEP_REMOTE_PORTS = "sweep-remote-ports"  # one local port -> `count` peer ports (predicted/random)
    SWEEP_PAIRS = "sweep-pairs"                # `count` fresh local ports, the i-th -> predicted port i
    RELAY = "relay"                            # join the relay session the server offers
    NONE = "none"                              # sit this step out


class Target(StrEnum):
    PUBLIC = "public"                          # the peer's public (server-observed) address
    LAN = "lan"                                # the peer's local addresses
    MAPPED = "mapped"                          # the peer's router port mapping (NAT-PMP/PCP/UPnP)


class PortChoice(StrEnum):
    ANNOUNCED = "announced"                    # the peer's announced port
    PREDICTED = "predicted"                    # announced + delta * i, i = 1..count
    RANDOM = "random"                          # `count` distinct random ports in PORT_RANGE


_DIALS = {Action.CONNECT, Action.SIMOPEN, Action.SWEEP_LOCAL_PORTS, Action.SWEEP_REMOTE_PORTS,
          Action.SWEEP_PAIRS}


@dataclass(frozen=True)
class RoleInstruction:
    """What one role does during one step. Times are seconds after the step's ``start_at``."""

    action: Action
    target: Target = Target.PUBLIC
    ports: PortChoice = PortChoice.ANNOUNCED
    count: int = 1                   # sockets (sweep-local-ports/sweep-pairs) or targets (sweep-remote-ports)
    delta: int | None = None         # for PortChoice.PREDICTED
    syn_ttl: int | None = None       # first SYN(s) leave with this TTL (opens our NAT only)
    start_delay: float = 0.0         # so that one side's SYNs leave before the other's arrive
    rate: float = 0.0                # SYNs per second for sweeps, 0 = as fast as possible

    def to_dict(self) -> dict[str, Any]:
        return {"action": str(self.action), "target": str(self.target), "ports": str(self.ports),
                "count": self.count, "delta": self.delta, "syn_ttl": self.syn_ttl,
                "start_delay": self.start_delay, "rate": self.rate}

    @classmethod
    def from_dict(cls, data: object, where: str = "instruction") -> RoleInstruction:
        d = _mapping(data, where, required={"action"},
                     optional={"target", "ports", "count", "delta", "syn_ttl", "start_delay", "rate"})
        action = _enum(Action, d["action"], f"{where}.action")
        target = _enum(Target, d.get("target", "public"), f"{where}.target")
        ports = _enum(PortChoice, d.get("ports", "announced"), f"{where}.ports")
        count = _int(d.get("count", 1), f"{where}.count", 1, MAX_COUNT)
        delta = d.get("delta")
        if delta is not None:
            delta = _int(delta, f"{where}.delta", -1000, 1000)
            if delta == 0:
                raise ValueError(f"{where}.delta must not be 0")
        if ports is PortChoice.PREDICTED and delta is None:
            raise ValueError(f"{where}: ports 'predicted' needs a delta")
        ttl = d.get("syn_ttl")
        if ttl is not None:
            ttl = _int(ttl, f"{where}.syn_ttl", 1, 255)
        start_delay = _float(d.get("start_delay", 0.0), f"{where}.start_delay", 0.0, MAX_BUDGET)
        rate = _float(d.get("rate", 0.0), f"{where}.rate", 0.0, 1e7)
        return cls(action, target, ports, count, delta, ttl, start_delay, rate)


@dataclass(frozen=True)
class Step:
    kind: StepKind
    budget: float                    # seconds from the step's start_at to giving up
    reason: str
    initiator: RoleInstruction
    responder: RoleInstruction
    parallel: int | None = None      # steps sharing a group number may run concurrently
    family: str = "ipv4"             # the address family of both ends ("ipv6" | "ipv4")

    def for_role(self, role: str) -> RoleInstruction:
        if role == "initiator":
            return self.initiator
        if role == "responder":
            return self.responder
        raise ValueError(f"role must be 'initiator' or 'responder', got {role!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": str(self.kind), "budget": self.budget, "reason": self.reason,
                "parallel": self.parallel, "family": self.family,
                "initiator": self.initiator.to_dict(), "responder": self.responder.to_dict()}

    @classmethod
    def from_dict(cls, data: object, where: str = "step") -> Step:
        d = _mapping(data, where, required={"kind", "budget", "initiator", "responder"},
                     optional={"reason", "parallel", "family"})
        kind = _enum(StepKind, d["kind"], f"{where}.kind")
        budget = _float(d["budget"], f"{where}.budget", 0.0, MAX_BUDGET)
        if budget <= 0:
            raise ValueError(f"{where}.budget must be positive, got {budget}")
        reason = d.get("reason", "")
        if not isinstance(reason, str):
            raise ValueError(f"{where}.reason must be text, got {type(reason).__name__}")
        parallel = d.get("parallel")
        if parallel is not None:
            parallel = _int(parallel, f"{where}.parallel", 0, MAX_STEPS)
        family = d.get("family", "ipv4")
        if family not in FAMILIES:
            raise ValueError(f"{where}.family {family!r} is not one of {', '.join(FAMILIES)}")
        ini = RoleInstruction.from_dict(d["initiator"], f"{where}.initiator")
        res = RoleInstruction.from_dict(d["responder"], f"{where}.responder")
        for role, ins in (("initiator", ini), ("responder", res)):
            if ins.start_delay >= budget:
                raise ValueError(f"{where}.{role}.start_delay {ins.start_delay} is not below "
                                 f"the budget {budget}")
        if (kind is StepKind.RELAY) != (ini.action is Action.RELAY) or \
                (kind is StepKind.RELAY) != (res.action is Action.RELAY):
            raise ValueError(f"{where}: the action 'relay' belongs to relay steps, and only it")
        if ini.action not in _DIALS and res.action not in _DIALS and kind is not StepKind.RELAY:
            raise ValueError(f"{where}: neither role dials the other, the step cannot connect")
        return cls(kind, budget, reason, ini, res, parallel, family)


@dataclass(frozen=True)
class Plan:
    """Ordered steps, tried in order (same ``parallel`` group: together), and why."""

    steps: tuple[Step, ...]
    reason: str                       # summary; says why relay when no direct path exists
    initiator_nat: str = ""           # profile labels, for reports
    responder_nat: str = ""
    race_delay: float = 0.0           # Happy Eyeballs: the IPv4 steps start this much later

    @property
    def families(self) -> tuple[str, ...]:
        """The families of the direct steps, in race order (IPv6 first)."""
        have = {s.family for s in self.direct_steps}
        return tuple(f for f in FAMILIES if f in have)

    def track(self, family: str) -> tuple[Step, ...]:
        """The direct steps of one family, in order: one lane of the race."""
        return tuple(s for s in self.direct_steps if s.family == family)

    def track_offset(self, family: str) -> float:
        """When ``family``'s lane starts, after the common start: IPv4 waits ``race_delay``
        when IPv6 races it (RFC 8305), else nothing."""
        return self.race_delay if family == "ipv4" and len(self.families) > 1 else 0.0

    @property
    def relay_only(self) -> bool:
        return bool(self.steps) and all(s.kind is StepKind.RELAY for s in self.steps)

    @property
    def has_relay(self) -> bool:
        return any(s.kind is StepKind.RELAY for s in self.steps)

    @property
    def direct_steps(self) -> tuple[Step, ...]:
        return tuple(s for s in self.steps if s.kind is not StepKind.RELAY)

    @property
    def total_budget(self) -> float:
        """Upper bound on the plan's duration if run strictly in order."""
        return round(sum(s.budget for s in self.steps), 3)

    def to_dict(self) -> dict[str, Any]:
        return {"version": PLAN_VERSION, "reason": self.reason,
                "initiator_nat": self.initiator_nat, "responder_nat": self.responder_nat,
                "race_delay": self.race_delay, "steps": [s.to_dict() for s in self.steps]}

    @classmethod
    def from_dict(cls, data: object) -> Plan:
        """Inverse of to_dict; raises ValueError naming the bad field."""
        d = _mapping(data, "plan", required={"version", "steps"},
                     optional={"reason", "initiator_nat", "responder_nat", "race_delay"})
        if d["version"] not in READABLE_VERSIONS:
            raise ValueError(f"plan.version {d['version']!r} is not supported (want {PLAN_VERSION})")
        race_delay = _float(d.get("race_delay", 0.0), "plan.race_delay", 0.0, MAX_RACE_DELAY)
        raw_steps = d["steps"]
        if not isinstance(raw_steps, (list, tuple)):
            raise ValueError(f"plan.steps must be a list, got {type(raw_steps).__name__}")
        if len(raw_steps) > MAX_STEPS:
            raise ValueError(f"plan.steps has {len(raw_steps)} steps, at most {MAX_STEPS} allowed")
        steps = tuple(Step.from_dict(s, f"plan.steps[{i}]") for i, s in enumerate(raw_steps))
        for i, s in enumerate(steps[:-1]):
            if s.kind is StepKind.RELAY:
                raise ValueError(f"plan.steps[{i}]: relay must be the last step")
        texts = {k: d.get(k, "") for k in ("reason", "initiator_nat", "responder_nat")}
        for k, v in texts.items():
            if not isinstance(v, str):
                raise ValueError(f"plan.{k} must be text, got {type(v).__name__}")
        return cls(steps, texts["reason"], texts["initiator_nat"], texts["responder_nat"],
                   race_delay)



def other_role(role: str) -> str:
    """The role that is not ``role``."""
    return "responder" if role == "initiator" else "initiator"


def remote_ports(ins: RoleInstruction, announced: int, rng: random.Random | None = None) -> list[int]:
    """The peer ports ``ins`` aims at, given the peer's announced port.

    ANNOUNCED: ``[announced]``; PREDICTED: ``announced + delta * i`` for i = 1..count (wrapping
    inside PORT_RANGE); RANDOM: ``count`` distinct ports from PORT_RANGE drawn with ``rng``.
    """
    if not isinstance(announced, int) or not 1 <= announced <= 65535:
        raise ValueError(f"announced port {announced!r} is out of range 1..65535")
    if ins.ports is PortChoice.ANNOUNCED:
        return [announced]
    lo, hi = PORT_RANGE
    if ins.ports is PortChoice.PREDICTED:
        if not ins.delta:
            raise ValueError("predicted ports need a non-zero delta")
        span = hi - lo + 1
        return [lo + (announced - lo + ins.delta * i) % span for i in range(1, ins.count + 1)]
    rng = rng or random.Random()
    return rng.sample(range(lo, hi + 1), min(ins.count, hi - lo + 1))



# --- validation helpers for from_dict -------------------------------------------------------

def _mapping(data: object, where: str, *, required: set[str], optional: set[str]) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping, got {type(data).__name__}")
    missing = sorted(required - data.keys())
    if missing:
        raise ValueError(f"{where} lacks {', '.join(missing)}")
    unknown = sorted(str(k) for k in data.keys() - required - optional)
    if unknown:
        raise ValueError(f"{where} has unknown field(s) {', '.join(unknown)}")
    return data


def _enum(cls: type[Any], value: object, where: str) -> Any:
    try:
        return cls(value)
    except ValueError:
        allowed = ", ".join(str(m) for m in cls)
        raise ValueError(f"{where} {value!r} is not one of {allowed}") from None


def _int(value: object, where: str, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ValueError(f"{where} must be an integer {lo}..{hi}, got {value!r}")
    return value


def _float(value: object, where: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not lo <= value <= hi:
        raise ValueError(f"{where} must be a number {lo}..{hi}, got {value!r}")
    return float(value)
