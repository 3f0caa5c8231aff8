"""Both engines meet the one contract in engine/_base.py, with identical signatures."""
from __future__ import annotations

import inspect
import re

import pytest

from pyholepunch import engine as engine_mod
from pyholepunch.engine import _base
from pyholepunch.engine.pure import PureEngine
from pyholepunch.errors import PunchError, PunchTimeout

from .helpers import A_IP, B_IP, C_IP, closed_ports, free_port

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


def _failure(engine: _base.Engine, call: str) -> BaseException:
    pa = free_port(A_IP)
    with pytest.raises(PunchError) as info:
        if call == "timeout":
            engine.simultaneous_open((A_IP, pa), (B_IP, free_port(B_IP)), None, 0.1,
                                     interval=0.02)
        else:
            engine.sweep([(0, (C_IP, p)) for p in closed_ports(8)], None, 5.0, local_ip=A_IP)
    return info.value


def test_both_engines_word_a_failed_punch_alike(engine: _base.Engine) -> None:
    """One failure policy (_base.punch_failure): a deadline is PunchTimeout, every pair
    refused early is PunchError, and both engines say so in the same words."""
    timeout = _failure(engine, "timeout")
    assert isinstance(timeout, PunchTimeout)
    assert re.fullmatch(rf"simultaneous_open {A_IP}:\d+ -> {B_IP}:\d+: no connection by the "
                        r"deadline \(\d+ attempts, \d+ RST, 0 ICMP\)", str(timeout))
    refused = _failure(engine, "refused")
    assert not isinstance(refused, PunchTimeout)
    assert str(refused) == ("sweep over 8 pairs: no connection (8 attempts, 8 RST, 0 ICMP); "
                            "every pair failed and none is left to retry")
