"""The connection report: the plan, what every step did, the route, and how long it all took.

Built incrementally by the peer while it connects (:meth:`ConnectionReport.step_started` ...
:meth:`ConnectionReport.finish`), then read by the application (``conn.report``), the CLI
(:meth:`ConnectionReport.summary`, ``--json`` via :meth:`ConnectionReport.to_dict`) and the
matrix tests. Times are absolute wall-clock seconds (``time.time()``) supplied by the caller
(``None`` = now), so reports from two peers line up with each other and with the engine's
``start_at``. Plain data: no I/O.

``to_dict()`` follows a written, versioned JSON Schema shipped with the package
(``pyholepunch/schemas/report-1.json``, ``SCHEMA_ID``); a change that breaks a reader gets a new
version. Observers (``report.observers``) hear each change as it happens — the HTTP API turns
them into server-sent events.
"""
from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from .engine._base import PunchStats

log = logging.getLogger(__name__)


class Outcome(StrEnum):
    SUCCESS = "success"
    TIMEOUT = "timeout"
    ERROR = "error"
    SKIPPED = "skipped"          # not run: an earlier (or parallel) step won, or it cannot apply
    RUNNING = "running"


class Route(StrEnum):
    DIRECT = "direct"
    RELAY = "relay"


SCHEMA_VERSION = 1
SCHEMA_ID = f"https://pyholepunch.invalid/schemas/report-{SCHEMA_VERSION}.json"
# Why a connection fell back to the relay, as a closed set (metrics label it; the text of the
# reason is in relay_reason): the plan had no direct step; every direct step failed; TLS over
# the punched socket failed; the other peer moved to the relay first; a socket error.
RELAY_CAUSES = ("no_direct_plan", "punch_failed", "tls_failed", "peer_relayed", "socket_error",
                "direct_pending")   # the relay took over while direct steps still ran (relay_race)
ReportObserver = Callable[[str, dict[str, Any]], None]


def parse_route(route: object) -> Route:
    """``Route(route)`` with an error that names the choices."""
    if isinstance(route, str):          # a Route is a str too
        try:
            return Route(route)
        except ValueError:
            pass
    raise ValueError(f"route must be 'direct' or 'relay', got {route!r}")


def _now(t: float | None) -> float:
    return time.time() if t is None else float(t)


def _json_safe(value: Any) -> Any:
    """Tuples to lists, enums to their values, non-finite floats to None: JSON-safe output."""
    if isinstance(value, StrEnum):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


@dataclass
class StepRecord:
    """One plan step as it happened."""

    index: int
    kind: str
    started: float
    ended: float | None = None
    outcome: Outcome = Outcome.RUNNING
    error: str = ""
    stats: dict[str, Any] = field(default_factory=dict)   # engine PunchStats.as_dict()
    local_port: int | None = None                          # winning ports, on success
    remote: tuple[str, int] | None = None
    family: str = ""                                       # "ipv6" | "ipv4" ("" = relay)
    pair: tuple[str, str] | None = None                    # the candidate pair tried:
                                                           # (our address, the peer's)

    @property
    def duration(self) -> float | None:
        return None if self.ended is None else max(0.0, self.ended - self.started)

    def to_dict(self) -> dict[str, Any]:
        return _json_safe({  # type: ignore[no-any-return]
            "index": self.index, "kind": self.kind, "started": self.started, "ended": self.ended,
            "duration": self.duration, "outcome": self.outcome, "error": self.error,
            "stats": self.stats, "local_port": self.local_port, "remote": self.remote,
            "family": self.family, "pair": self.pair})


@dataclass
class ConnectionReport:
    """Everything about one peer connection, from the connect()/accept() call to TLS."""

    role: str                                   # "initiator" | "responder"
    peer_id: str = ""
    peer_name: str = ""
    started: float = field(default_factory=time.time)   # the connect()/accept() call
    plan: dict[str, Any] | None = None          # Plan.to_dict()
    local_nat: dict[str, Any] | None = None     # NatProfile.to_dict() of both sides
    remote_nat: dict[str, Any] | None = None
    steps: list[StepRecord] = field(default_factory=list)
    route: Route | None = None
    relay_reason: str = ""
    relay_cause: str = ""                       # one of RELAY_CAUSES when route is relay
    direct_after_relay_s: float | None = None   # a direct path came up while relayed (relay_race)
    established: float | None = None            # TLS established
    ended: float | None = None                  # established, or the attempt failed
    tls: bool = True                            # False only with insecure_plain
    error: str = ""                             # why the whole connect failed, if it did
    observers: list[ReportObserver] = field(default_factory=list, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.role not in ("initiator", "responder"):
            raise ValueError(f"role must be 'initiator' or 'responder', got {self.role!r}")

    def emit(self, event: str, data: dict[str, Any]) -> None:
        """Tell the observers (``plan``, ``step``, ``fallback``, ``route``, ``failed``)."""
        for observer in list(self.observers):
            try:
                observer(event, data)
            except Exception:      # a listener's bug must never break a connection
                log.exception("report observer failed on %s", event)

    # --- building --------------------------------------------------------------------------

    def step_started(self, kind: str, at: float | None = None, *, family: str = "",
                     local: tuple[str, int] | None = None, remote: str = "") -> StepRecord:
        """A step begins; ``family``, ``local`` (our address and punch port) and ``remote``
        (the peer's candidate(s) it aims at, as text) name the candidate pair it tries."""
        record = StepRecord(len(self.steps), str(kind), _now(at), family=family)
        if local is not None:
            host, port = local
            ours = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            record.pair = (ours, remote)
        self.steps.append(record)
        self.emit("step", record.to_dict())
        return record

    def step_finished(self, record: StepRecord, outcome: Outcome | str, *, at: float | None = None,
                      stats: PunchStats | dict[str, Any] | None = None, error: str | BaseException = "",
                      ) -> StepRecord:
        """Close ``record``. ``stats``: the engine's PunchStats (from the result or the error)."""
        if record.outcome is not Outcome.RUNNING:
            raise ValueError(f"step {record.index} ({record.kind}) already finished: {record.outcome}")
        outcome = Outcome(outcome)
        if outcome is Outcome.RUNNING:
            raise ValueError("a step cannot finish as 'running'")
        record.ended = max(record.started, _now(at))
        record.outcome = outcome
        if isinstance(error, BaseException):
            error = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        record.error = error
        if isinstance(stats, PunchStats):
            stats = stats.as_dict()
        record.stats = dict(stats or {})
        if outcome is Outcome.SUCCESS:
            record.local_port = record.stats.get("local_port")
            remote = record.stats.get("remote")
            record.remote = (str(remote[0]), int(remote[1])) if remote else None
        self.emit("step", record.to_dict())
        return record

    def step_skipped(self, kind: str, reason: str = "", at: float | None = None) -> StepRecord:
        record = self.step_started(kind, at)
        return self.step_finished(record, Outcome.SKIPPED, at=record.started, error=reason)

    def set_plan(self, plan: dict[str, Any]) -> None:
        self.plan = plan
        self.emit("plan", plan)

    def fallback(self, reason: str, cause: str) -> None:
        """No direct path: the relay comes next, because of ``reason`` (``cause``: one of
        RELAY_CAUSES)."""
        if cause not in RELAY_CAUSES:
            raise ValueError(f"relay cause must be one of {', '.join(RELAY_CAUSES)}, got {cause!r}")
        self.relay_reason, self.relay_cause = reason, cause
        self.emit("fallback", {"reason": reason, "cause": cause})

    def finish(self, route: Route | str, *, at: float | None = None, relay_reason: str = "") -> None:
        """The connection is up (TLS established) over ``route``."""
        self.route = parse_route(route)
        self.established = self.ended = _now(at)
        if self.route is Route.RELAY:
            self.relay_reason = relay_reason or self.relay_reason or "every direct step failed"
            self.relay_cause = self.relay_cause or "punch_failed"
        for record in self.steps:          # parallel losers still running when the winner won
            if record.outcome is Outcome.RUNNING:
                self.step_finished(record, Outcome.SKIPPED, at=self.established,
                                   error="abandoned: another step won")
        self.emit("route", {"route": str(self.route), "total_time": self.total_time,
                            "relay_reason": self.relay_reason, "relay_cause": self.relay_cause})

    def fail(self, error: str | BaseException, *, at: float | None = None) -> None:
        """The connection attempt failed as a whole."""
        self.established = None
        self.error = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else error
        end = self.ended = _now(at)
        for record in self.steps:
            if record.outcome is Outcome.RUNNING:
                self.step_finished(record, Outcome.ERROR, at=end, error="attempt abandoned")
        self.emit("failed", {"error": self.error})

    # --- reading ---------------------------------------------------------------------------

    @property
    def total_time(self) -> float | None:
        """Seconds from the connect()/accept() call to TLS established."""
        return None if self.established is None else max(0.0, self.established - self.started)

    @property
    def pairs(self) -> list[dict[str, Any]]:
        """Every candidate pair tried: family, step, pair, outcome, time (s) — the race's
        record (docs/architecture.md)."""
        return [{"family": r.family, "step": r.kind, "local": r.pair[0], "remote": r.pair[1],
                 "outcome": str(r.outcome), "started": r.started, "duration": r.duration}
                for r in self.steps if r.pair is not None]

    @property
    def winning_step(self) -> StepRecord | None:
        for record in self.steps:
            if record.outcome is Outcome.SUCCESS:
                return record
        return None

    def to_dict(self) -> dict[str, Any]:
        win = self.winning_step
        return _json_safe({  # type: ignore[no-any-return]
            "schema": SCHEMA_ID,
            "role": self.role, "peer_id": self.peer_id, "peer_name": self.peer_name,
            "route": self.route, "relay_reason": self.relay_reason,
            "relay_cause": self.relay_cause or None, "tls": self.tls,
            "direct_after_relay_s": self.direct_after_relay_s,
            "started": self.started, "established": self.established, "ended": self.ended,
            "total_time": self.total_time, "winning_step": win.kind if win else None,
            "winning_family": (win.family or None) if win else None, "pairs": self.pairs,
            "error": self.error, "local_nat": self.local_nat, "remote_nat": self.remote_nat,
            "plan": self.plan, "steps": [r.to_dict() for r in self.steps]})

    def summary(self) -> str:
        """A few lines for people: route and time, the NATs, each step's outcome."""
        who = self.peer_name or self.peer_id or "peer"
        if self.peer_name and self.peer_id:
            who = f"{self.peer_name} ({self.peer_id[:12]}…)"
        if self.error:
            took = None if self.ended is None else self.ended - self.started
            head = f"{who}: FAILED after {_ms(took)}: {self.error}"
        elif self.route is None:
            head = f"{who}: connecting…"
        else:
            head = f"{who}: {self.route} in {_ms(self.total_time)}" + \
                ("" if self.tls else " (NOT encrypted: insecure_plain)")
        lines = [head]
        if self.route is Route.RELAY:
            lines.append(f"  relay because: {self.relay_reason}")
        if self.local_nat or self.remote_nat:
            lines.append(f"  NATs: local {_nat(self.local_nat)}, remote {_nat(self.remote_nat)}")
        if self.plan and self.plan.get("reason"):
            lines.append(f"  plan: {self.plan['reason']}")
        for r in self.steps:
            kind = f"{r.family} {r.kind}" if r.family else r.kind
            line = f"  {r.index + 1}. {kind:<21} {r.outcome:<8} {_ms(r.duration):>8}"
            s = r.stats
            if s:
                line += f"  SYNs {s.get('syns_sent', 0)} RSTs {s.get('rsts_seen', 0)} " \
                        f"ICMP {s.get('icmp_errors', 0)}"
            if r.outcome is Outcome.SUCCESS and r.remote:
                host, port = r.remote
                line += f"  :{r.local_port} -> " + (f"[{host}]:{port}" if ":" in host
                                                    else f"{host}:{port}")
            if r.error:
                line += f"  ({r.error})"
            lines.append(line)
        return "\n".join(lines)


def load_schema() -> dict[str, Any]:
    """The JSON Schema ``to_dict()`` follows (pyholepunch/schemas/report-1.json)."""
    from importlib.resources import files
    text = files("pyholepunch").joinpath(f"schemas/report-{SCHEMA_VERSION}.json").read_text()
    schema: dict[str, Any] = json.loads(text)
    return schema


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def _nat(profile: dict[str, Any] | None) -> str:
    if not profile:
        return "unknown"
    return str(profile.get("label") or profile.get("nat_type") or "unknown")


__all__ = ["RELAY_CAUSES", "SCHEMA_ID", "SCHEMA_VERSION", "ConnectionReport", "Outcome", "Route",
           "StepRecord", "load_schema", "parse_route"]
