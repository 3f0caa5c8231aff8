"""Both engines meet the one contract in engine/_base.py, with identical signatures."""
from __future__ import annotations

import inspect

import pytest

from pyholepunch import engine as engine_mod
from pyholepunch.engine import _base
from pyholepunch.engine.pure import PureEngine

METHODS = ("simultaneous_open", "sweep", "raw_syn", "relay_pump", "simultaneous_open_async",
           "sweep_async")
ASYNC = ("simultaneous_open_async", "sweep_async")


def _sig(fn: object) -> inspect.Signature:
    sig = inspect.signature(fn)  # type: ignore[arg-type]
    params = [p for p in sig.parameters.values() if p.name != "self"]
    return sig.replace(parameters=params)


def test_engine_meets_protocol(engine: _base.Engine) -> None:
    assert isinstance(engine, _base.Engine)
    assert engine.name in engine_mod.NAMES
    assert engine_mod.get(engine.name) is engine


@pytest.mark.parametrize("method", METHODS)
def test_signature_matches_protocol(engine: _base.Engine, method: str) -> None:
    want = _sig(getattr(_base.Engine, method))
    got = _sig(getattr(engine, method))
    assert [(p.name, p.kind, p.default) for p in got.parameters.values()] == \
        [(p.name, p.kind, p.default) for p in want.parameters.values()]


@pytest.mark.parametrize("method", METHODS)
def test_engines_have_identical_signatures(method: str) -> None:
    if not engine_mod.native_available():
        pytest.skip("native engine not built")
    native = engine_mod.get("native")
    pure = engine_mod.get("pure")
    n, p = _sig(getattr(native, method)), _sig(getattr(pure, method))
    assert [(x.name, x.kind, x.default) for x in n.parameters.values()] == \
        [(x.name, x.kind, x.default) for x in p.parameters.values()]


@pytest.mark.parametrize("method", ASYNC)
def test_async_methods_are_coroutines(engine: _base.Engine, method: str) -> None:
    assert inspect.iscoroutinefunction(getattr(_base.Engine, method))
    assert inspect.iscoroutinefunction(getattr(engine, method))


def test_pure_is_always_available(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYHOLEPUNCH_ENGINE", "pure")
    assert isinstance(engine_mod.get(), PureEngine)
    assert "pure" in engine_mod.available()


def test_stats_fields_are_the_contract() -> None:
    stats = _base.PunchStats()
    assert set(stats.as_dict()) == {
        "attempts", "syns_sent", "rsts_seen", "icmp_errors", "sockets_opened",
        "first_syn_delay_ns", "time_to_established_ns", "local_port", "remote", "accepted",
        "first_syn_at",
    }
