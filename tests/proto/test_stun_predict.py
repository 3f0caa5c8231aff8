"""nat/predict.py: port prediction from a profile and fresh observations (pure)."""
from __future__ import annotations

import pytest

from pyholepunch.nat.predict import observed_delta, predict_ports
from pyholepunch.nat.profile import Allocation, Mapping, NatProfile

SEQ = NatProfile(mapping=Mapping.ADDRESS_AND_PORT_DEPENDENT, allocation=Allocation.SEQUENTIAL, delta=1,
                 confidence={"allocation": 1.0})


def test_sequential_predicts_the_next_ports_after_the_last_seen() -> None:
    p = predict_ports(SEQ, [40000, 40001, 40002], window=4)
    assert p.method == "sequential" and p.ports == (40003, 40004, 40005, 40006)
    assert p.base == 40002 and p.delta == 1 and p.window == 4


def test_sequential_delta_from_observations_overrides_profile() -> None:
    p = predict_ports(SEQ, [2000 + 2 * i for i in range(4)], window=2)
    assert p.delta == 2 and p.ports == (2008, 2010)


def test_negative_delta_and_wrap_around() -> None:
    prof = SEQ.evolve(delta=-1)
    assert predict_ports(prof, [1025, 1024], window=2).ports == (65535, 65534)
    assert predict_ports(SEQ, [65534, 65535], window=2).ports == (1024, 1025)


def test_background_rate_shifts_the_window() -> None:
    # 3 of our mappings in 1 s advanced 20 ports: 18 taken by others -> 18 per second
    p = predict_ports(SEQ, [(0.0, 5000), (0.5, 5010), (1.0, 5020)], at=1.5, window=3)
    assert p.skip == 9
    assert p.ports == (5030, 5031, 5032)


def test_preserving_uses_the_local_port_first() -> None:
    prof = NatProfile(mapping=Mapping.ENDPOINT_INDEPENDENT, allocation=Allocation.PRESERVING)
    p = predict_ports(prof, [], local_port=30000, window=5)
    assert p.method == "preserving" and p.ports == (30000, 30001, 29999, 30002, 29998)


def test_open_host_is_exact() -> None:
    p = predict_ports(NatProfile(mapping=Mapping.NONE), [], local_port=4242)
    assert p.ports == (4242,) and p.confidence == 1.0


def test_random_and_unknown_do_not_guess() -> None:
    rnd = NatProfile(mapping=Mapping.ADDRESS_AND_PORT_DEPENDENT, allocation=Allocation.RANDOM)
    assert predict_ports(rnd, [1, 2, 3]).ports == ()
    unk = NatProfile()
    assert predict_ports(unk, [5, 900, 77]).method == "unknown"
    learned = predict_ports(unk, [2100, 2103, 2106, 2109], window=1)
    assert learned.method == "sequential" and learned.ports == (2112,) and learned.confidence == 0.5


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="window must be in 1..4096"):
        predict_ports(SEQ, [1], window=0)
    with pytest.raises(ValueError, match="observed port 70000"):
        predict_ports(SEQ, [70000])
    with pytest.raises(ValueError, match="all observations with times or none"):
        predict_ports(SEQ, [(0.0, 5), 6])
    assert observed_delta([5]) == (None, 0.0)
