"""A relayed or failed connection names the step that failed and what a person can do, and a
failed start names its step (report.py, #19). Plain data: no I/O."""
from __future__ import annotations

import jsonschema
import pytest

from pyholepunch.errors import (
    AuthenticationError,
    PunchError,
    RelayError,
    SignalingError,
    StartFailed,
    StartTimeout,
    StrategyError,
    TransactionTimeout,
)
from pyholepunch.report import (
    RELAY_ADVICE,
    RELAY_CAUSES,
    ConnectionReport,
    load_schema,
    start_failed,
)

VALIDATOR = jsonschema.Draft202012Validator(load_schema())
PLAN = {"version": 1, "reason": "x", "steps": [{"kind": "simopen", "budget": 1.0}]}


def _punched(outcome: str = "timeout") -> ConnectionReport:
    report = ConnectionReport("initiator", peer_name="bob")
    report.set_plan(PLAN)
    report.step_finished(report.step_started("lan"), "error", error="refused")
    report.step_finished(report.step_started("simopen"), outcome, error="no answer")
    return report


def test_every_relay_cause_has_advice() -> None:
    assert set(RELAY_ADVICE) == set(RELAY_CAUSES)


@pytest.mark.parametrize(("cause", "step"), [("punch_failed", "simopen"), ("tls_failed", "tls"),
                                             ("no_direct_plan", "plan"), ("peer_relayed", "peer"),
                                             ("direct_pending", "simopen")])
def test_a_relayed_report_names_the_failed_step_and_advice(cause: str, step: str) -> None:
    report = _punched()
    events: list[tuple[str, dict[str, object]]] = []
    report.observers.append(lambda event, data: events.append((event, data)))
    report.fallback("why", cause)
    report.step_finished(report.step_started("relay"), "success")
    report.finish("relay")
    doc = report.to_dict()
    VALIDATOR.validate(doc)
    assert doc["failed_step"] == step
    assert doc["advice"] == RELAY_ADVICE[cause]
    assert f"failed step: {step}; what to do: " in report.summary()
    assert [d for e, d in events if e == "fallback"][0]["failed_step"] == step


def _punched_running() -> ConnectionReport:
    report = ConnectionReport("initiator", peer_name="bob")
    report.set_plan(PLAN)
    report.step_started("sweep")
    return report


def test_a_direct_step_still_running_is_the_one_named() -> None:
    report = _punched_running()
    report.fallback("no direct connection 0.70 s after connect()", "direct_pending")
    assert report.failed_step == "sweep"
    late = ConnectionReport("initiator", peer_name="bob")      # it succeeded, too late
    late.set_plan(PLAN)
    late.step_finished(late.step_started("simopen"), "success")
    late.fallback("no direct connection 0.70 s after connect()", "direct_pending")
    assert late.failed_step == "simopen"


@pytest.mark.parametrize(("error", "plan", "step", "words"), [
    (SignalingError("no such peer online: bob", code=404), False, "signaling", "not online"),
    (SignalingError("the peer gave up", code=424), True, "signaling", "gave up"),
    (RelayError("relay refused: 486"), True, "relay", "relay"),
    (AuthenticationError("certificate does not match bob"), True, "tls", "right peer"),
    (PunchError("no direct path to bob and relaying is off"), True, "simopen", "relaying is off"),
    ("connect to bob took longer than 3 s", True, "relay", "relay"),
    (StrategyError("none of the chosen steps (simopen) is in the plan"), False, "plan",
     "strategies="),
])
def test_a_failed_report_names_the_step_and_advice(error: BaseException | str, plan: bool,
                                                   step: str, words: str) -> None:
    report = _punched() if plan else ConnectionReport("initiator", peer_name="bob")
    if isinstance(error, str):         # timed out while the relay step ran
        report.step_started("relay")
    report.fail(error, timed_out=isinstance(error, str))
    doc = report.to_dict()
    VALIDATOR.validate(doc)
    assert doc["failed_step"] == step
    assert words in doc["advice"], doc["advice"]
    assert f"failed step: {step}" in report.summary()


def test_a_timeout_before_the_punch_says_where_it_was() -> None:
    report = ConnectionReport("initiator", peer_name="bob")
    report.fail("connect to bob took longer than 3 s", timed_out=True)
    assert report.failed_step == "signaling"
    assert "--timeout" in report.advice and "signaling" in report.advice


def test_a_failed_start_names_its_step_reason_and_advice() -> None:
    exc = start_failed("register", SignalingError("registration refused: name taken (409)",
                                                  code=409), "203.0.113.10:3478")
    assert isinstance(exc, StartFailed) and isinstance(exc, SignalingError)
    assert not isinstance(exc, TimeoutError)
    assert (exc.step, exc.code) == ("register", 409)
    assert str(exc).startswith("start failed at step 'register' with 203.0.113.10:3478: "
                               "registration refused: name taken (409)")
    assert "choose another --name" in exc.advice and exc.advice in str(exc)

    late = start_failed("classify", TransactionTimeout("TCP connect to x timed out"), "s:1")
    assert isinstance(late, StartTimeout) and isinstance(late, TimeoutError)   # CLI exit 4
    assert "step 'classify'" in str(late) and "STUN" in late.advice

    other = start_failed("signaling", SignalingError("x is not a pyholepunch rendezvous server",
                                                     code=-1), "s:1")
    assert "is not a pyholepunch server" in other.advice
    assert "is not a pyholepunch rendezvous server" in str(other)
    silent = start_failed("signaling", SignalingError(
        "x is not a pyholepunch rendezvous server: no TLS handshake within 2.08 s (RTT 35 ms)",
        code=-1), "s:1")
    assert "check the port" in silent.advice and "loses many packets" in silent.advice
