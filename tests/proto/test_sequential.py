"""strategy/sequential.py: the mutual pairing finds a connection for any two drifts as long as
the allocations nobody saw fit the chooser's offsets; drift, window and rate arithmetic."""
from __future__ import annotations

import pytest

from pyholepunch.punch_sequential import FRESH_S, stale
from pyholepunch.strategy.sequential import (
    MAX_WINDOW,
    AllocationTracker,
    drift,
    index_port,
    mutual_targets,
    window,
)

A_PORT, B_PORT = 20_000, 40_000


def _pairs(delta_a: int, delta_b: int, d_a: int, e_a: int, d_b: int, e_b: int, offsets: int,
           n_a: int = 96, n_b: int = 64) -> list[tuple[int, int]]:
    """(chooser socket, follower socket) pairs that connect: each aims at the other's port."""
    a_ext = [index_port(A_PORT, delta_a, d_a + k) for k in range(1, n_a + 1)]
    b_ext = [index_port(B_PORT, delta_b, d_b + k) for k in range(1, n_b + 1)]
    a_tgt = mutual_targets(B_PORT, delta_b, n_a, e_a, offsets)
    b_tgt = mutual_targets(A_PORT, delta_a, n_b, e_b, 1)
    where_b = {port: j for j, port in enumerate(b_ext)}
    return [(i, where_b[t]) for i, t in enumerate(a_tgt)
            if t in where_b and b_tgt[where_b[t]] == a_ext[i]]


@pytest.mark.parametrize(("delta_a", "delta_b"), [(1, 1), (2, -1)])
def test_any_drifts_connect_when_the_unseen_fit_the_offsets(delta_a: int, delta_b: int) -> None:
    offsets = 6
    for d_a in range(0, 30, 3):
        for d_b in range(0, 40, 4):          # the responder's stale announcement drifts more
            for u_a in range(0, 3):
                for u_b in range(0, 6 - u_a):  # u_a + u_b < offsets
                    got = _pairs(delta_a, delta_b, d_a + u_a, d_a, d_b + u_b, d_b, offsets)
                    assert got, (d_a, d_b, u_a, u_b)


def test_the_old_pairing_needed_no_drift_at_all() -> None:
    # Aiming at the announced + delta * k (drift ignored, no offsets) fails for one unseen flow.
    assert _pairs(1, 1, 0, 0, 0, 0, 1)
    assert not _pairs(1, 1, 1, 0, 0, 0, 1)
    assert not _pairs(1, 1, 0, 0, 2, 0, 1)


def test_unseen_beyond_the_offsets_fails() -> None:
    assert not _pairs(1, 1, 4, 0, 4, 0, 3)


def test_drift_and_index_port_wrap_in_the_port_range() -> None:
    assert index_port(65535, 1, 1) == 1024
    assert drift(65535, 1025, 1) == 2
    assert drift(30_000, 29_990, -2) == 5
    assert drift(30_000, 30_000, 1) == 0


def test_window_grows_with_rate_and_time_and_is_bounded() -> None:
    assert window(0, 0.2) == 1
    assert window(2, 0.14) < window(10, 0.14) < window(50, 0.14)
    assert window(1000, 5) == MAX_WINDOW


def test_tracker_rate_counts_only_other_flows() -> None:
    t = AllocationTracker(1)
    t.observe(100.0, 30_000, announced=True, took=0.08)
    t.observe(102.0, 30_021)             # 21 allocations: our probe + 20 others in 2 s
    assert t.rate() == pytest.approx(10.0)
    assert t.drift(30_021) == 21
    assert t.probe_s == pytest.approx(0.08)
    with pytest.raises(ValueError):
        AllocationTracker(0)


def test_a_fresh_announcement_is_not_probed_again_before_connect() -> None:
    """punch_sequential.stale: a sequential initiator CONNECTs at once on an announcement
    under FRESH_S old (the re-probe cost 2 RTT, issue 18) and re-learns an older one."""
    tracker = AllocationTracker(1)
    assert stale(None, 100.0) and stale(tracker, 100.0)       # nothing announced yet
    tracker.observe(100.0, 30_000, announced=True)
    assert not stale(tracker, 100.0 + FRESH_S / 2)
    assert stale(tracker, 100.0 + FRESH_S + 0.01)
    tracker.observe(101.0, 30_005)                             # a probe, not an announcement
    assert stale(tracker, 100.0 + FRESH_S + 0.01)
