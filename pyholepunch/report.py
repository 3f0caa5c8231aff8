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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from .engine._base import PunchStats
from .errors import StartFailed, StartTimeout

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
# What a person can do about a relayed connection, per cause (the report's ``advice``).
RELAY_ADVICE = {
    "no_direct_plan": "these two NATs leave no direct method (see the plan): a port mapping "
                      "(UPnP, NAT-PMP or PCP) on either router, or IPv6 on both hosts, would "
                      "give a direct path",
    "punch_failed": "every direct step failed (see the steps): the NATs or a firewall dropped "
                    "the punch; a port mapping (UPnP, NAT-PMP or PCP) on either router would "
                    "help, the relay carries the data meanwhile",
    "tls_failed": "a direct socket came up but TLS over it failed (packet loss or a middlebox "
                  "rewriting TCP): connecting again often gets a direct path",
    "peer_relayed": "the other peer took the relay first: its report says why",
    "socket_error": "a local socket error stopped the punch (see relay_reason): check this "
                    "host's open-file limit and local firewall",
    "direct_pending": "the direct steps were still running when the relay took over (a slow "
                      "or lossy path): a direct connection may still come up "
                      "(direct_after_relay_s), and Connection.upgrade() can move to it",
}
# What a person can do when a step of connect() failed, per step (``advice`` of a failure).
FAILURE_ADVICE = {
    "signaling": "the rendezvous server did not serve the request: check that it still runs "
                 "and that the peer is registered with the same server",
    "tls": "the peer's certificate did not match the peer id asked for, or TLS over the path "
           "failed: check that you connect to the right peer and connect again",
    "relay": "the relay failed: check the server's built-in relay (or --relay turn:... and "
             "its credentials); only a direct path can connect these NATs without it",
    "punch": "no direct path and relaying is off: allow the relay (no --relay none) or a "
             "port mapping (UPnP, NAT-PMP or PCP) on either router",
    "timeout": "connect() ran out of time: give it longer (--timeout) or check the path "
               "(loss, a firewall)",
    "plan": "none of the chosen step kinds (strategies=) is in this pair's plan, whose reason "
            "the error gives: choose others, or allow the relay",
}
SIGNALING_ADVICE = {404: "the peer is not online at this server: start it there "
                         "(`pyholepunch listen --name NAME`) with the same --server",
                    424: "the other peer gave up (its reason is in the error): see its log",
                    429: "the server rate-limited us: wait a moment and connect again"}


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
    failed_step: str = ""                       # relayed or failed: the step that failed
                                                # (signaling, a punch step kind, tls, relay)
    advice: str = ""                            # ... and what a person can do about it
    start_sync: dict[str, Any] | None = None    # how the common start was agreed (Punch:
                                                # offer_clock.StartAgreement.to_dict())
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
        self.failed_step = {"no_direct_plan": "plan", "tls_failed": "tls",
                            "peer_relayed": "peer"}.get(cause) or \
            self._last_direct_step(late=cause == "direct_pending")
        self.advice = RELAY_ADVICE[cause]
        self.emit("fallback", {"reason": reason, "cause": cause, "failed_step": self.failed_step,
                               "advice": self.advice})

    def _last_direct_step(self, *, late: bool = False) -> str:
        """The kind of the latest direct step that failed or still runs (``late``: or that
        succeeded too late for the relay race's decision); "punch" if none."""
        outcomes = (Outcome.ERROR, Outcome.TIMEOUT, Outcome.RUNNING) + \
            ((Outcome.SUCCESS,) if late else ())
        for record in reversed(self.steps):
            if record.kind != "relay" and record.outcome in outcomes:
                return record.kind
        return "punch"


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

    def fail(self, error: str | BaseException, *, at: float | None = None, step: str = "",
             timed_out: bool = False) -> None:
        """The connection attempt failed as a whole, at ``step`` (else told from the error
        and the steps run: signaling, a punch step kind, tls, relay)."""
        self.established = None
        self.error = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else error
        self.failed_step, self.advice = self._failure(error, step, timed_out)
        end = self.ended = _now(at)
        for record in self.steps:
            if record.outcome is Outcome.RUNNING:
                self.step_finished(record, Outcome.ERROR, at=end, error="attempt abandoned")
        self.emit("failed", {"error": self.error, "failed_step": self.failed_step,
                             "advice": self.advice})

    @contextmanager
    def failing(self, what: str, timeout: float) -> Iterator[None]:
        """Record how a connect attempt inside ended, if it failed: one policy for every
        front (Peer.connect, Punch.connect). A TimeoutError becomes "``what`` took longer
        than ``timeout`` s" (the report's error, re-raised); any other error is recorded
        unless a step already ended the report."""
        try:
            yield
        except TimeoutError as exc:
            self.fail(f"{what} took longer than {timeout} s", timed_out=True)
            raise TimeoutError(self.error) from exc
        except BaseException as exc:
            if self.ended is None:
                self.fail(exc)
            raise

    def _failure(self, error: str | BaseException, step: str, timed_out: bool) -> tuple[str, str]:
        # errors.py names are matched by class name: the report stays plain data (no import
        # of the protocol layers); every class is defined there once.
        names = {c.__name__ for c in type(error).__mro__} if isinstance(error, BaseException) else set()
        code = getattr(error, "code", None)
        running = [r.kind for r in self.steps if r.outcome is Outcome.RUNNING]
        if not step:
            if "StrategyError" in names:
                step = "plan"
            elif "AuthenticationError" in names:
                step = "tls"
            elif "RelayError" in names or (running and running[-1] == "relay"):
                step = "relay"
            elif "SignalingError" in names or self.plan is None:
                step = "signaling"       # no PUNCH yet: the request itself did not go through
            elif running:
                step = running[-1]
            else:
                step = self._last_direct_step()
        if step == "signaling" and code in SIGNALING_ADVICE:
            return step, SIGNALING_ADVICE[code]
        if (timed_out or "TimeoutError" in names) and step not in ("tls", "relay"):
            return step, FAILURE_ADVICE["timeout"] + f" (it was at: {step})"
        return step, FAILURE_ADVICE.get(step, FAILURE_ADVICE["punch"])

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
            "error": self.error, "failed_step": self.failed_step or None,
            "advice": self.advice or None, "start_sync": self.start_sync,
            "local_nat": self.local_nat, "remote_nat": self.remote_nat,
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
        if self.failed_step:
            lines.append(f"  failed step: {self.failed_step}; what to do: {self.advice}")
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


# Peer.start's steps: what a person can do when one fails (StartFailed.advice).
START_ADVICE = {
    "signaling": "check the server address and port, and that `pyholepunch serve` runs there "
                 "and is reachable (a firewall may drop TCP to it)",
    "classify": "the server's STUN service (same address, TCP) did not answer the NAT "
                "probes: a firewall between here and the server may drop them; retry",
    "announce": "the server's STUN service did not tell the punch port's public address: "
                "retry; if it repeats, a firewall may drop TCP from that port",
    "register": "the server did not complete the registration: check that it is not "
                "overloaded and retry",
    "hops": "counting the NAT routers towards the server failed (a local socket error): "
            "check this host's network settings",
}
REGISTER_ADVICE = {401: "the server refused this identity's signature: the config dir's key "
                        "may be damaged (use a fresh --config-dir)",
                   409: "the name is bound to another key: choose another --name, or use the "
                        "config dir that registered it",
                   403: "the server needs an access token: pass --token",
                   405: "the server refused the token: check --token",
                   406: "the token has expired: get a new one",
                   414: "the name is not allowed (malformed, or shaped like a peer id)",
                   426: "this peer and the server speak different signaling versions: "
                        "upgrade the older one",
                   430: "the server's per-key or per-address quota is reached",
                   503: "the server is full: retry later"}


def start_failed(step: str, exc: BaseException, server: str) -> StartFailed:
    """The one wording of a failed start: the step, why, and what to do (StartFailed, or
    StartTimeout for a timeout); raise it ``from exc``."""
    reason = str(exc) or type(exc).__name__
    code = getattr(exc, "code", 0)
    code = code if isinstance(code, int) else 0
    advice = (REGISTER_ADVICE.get(code) if step == "register" else None) or START_ADVICE[step]
    if code == -1 and " within " in reason:   # NOT_A_SERVER by silence: or a lossy path
        advice = ("the address accepts TCP but no pyholepunch server answered in time: check "
                  "the port; if it is right, the path loses many packets: retry")
    elif code == -1:               # NOT_A_SERVER: it answers, but not as our server
        advice = "the address answers but is not a pyholepunch server: check the port"
    cls = StartTimeout if isinstance(exc, TimeoutError) else StartFailed
    return cls(f"start failed at step '{step}' with {server}: {reason} ({advice})",
               step=step, reason=reason, advice=advice, code=code)


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
           "StepRecord", "load_schema", "parse_route", "start_failed"]
