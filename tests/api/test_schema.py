"""The connection report's JSON follows pyholepunch/schemas/report-1.json in every state, and
the schema ships as package data."""
from __future__ import annotations

import jsonschema
import pytest

from pyholepunch.report import RELAY_CAUSES, SCHEMA_ID, ConnectionReport, load_schema

VALIDATOR = jsonschema.Draft202012Validator(load_schema())


def test_schema_is_valid_and_versioned() -> None:
    jsonschema.Draft202012Validator.check_schema(load_schema())
    assert load_schema()["$id"] == SCHEMA_ID and SCHEMA_ID.endswith("report-1.json")


def test_reports_in_every_state_validate() -> None:
    events: list[str] = []
    fresh = ConnectionReport("initiator", peer_name="bob")
    fresh.observers.append(lambda event, data: events.append(event))
    VALIDATOR.validate(fresh.to_dict())
    fresh.set_plan({"version": 1, "reason": "x", "steps": [{"kind": "simopen", "budget": 1.0}]})
    step = fresh.step_started("simopen")
    VALIDATOR.validate(fresh.to_dict())           # a step still running
    fresh.step_finished(step, "timeout", error="no answer")
    fresh.fallback("every direct step failed", "punch_failed")
    relay = fresh.step_started("relay")
    fresh.step_finished(relay, "success")
    fresh.finish("relay")
    d = fresh.to_dict()
    VALIDATOR.validate(d)
    assert d["relay_cause"] == "punch_failed" and d["route"] == "relay"
    assert events == ["plan", "step", "step", "fallback", "step", "step", "route"]

    failed = ConnectionReport("responder")
    failed.fail(TimeoutError("too slow"))
    VALIDATOR.validate(failed.to_dict())

    broken = fresh.to_dict() | {"relay_cause": "because"}
    with pytest.raises(jsonschema.ValidationError):
        VALIDATOR.validate(broken)


def test_fallback_cause_is_a_closed_set() -> None:
    with pytest.raises(ValueError, match="relay cause must be one of"):
        ConnectionReport("initiator").fallback("why", "whim")
    assert "no_direct_plan" in RELAY_CAUSES


def test_a_failing_observer_never_breaks_the_report() -> None:
    report = ConnectionReport("initiator")

    def boom(event: str, data: object) -> None:
        raise RuntimeError("listener bug")
    report.observers.append(boom)
    report.step_skipped("lan", "no LAN")        # logged, not raised
    assert report.steps[0].outcome == "skipped"
