"""What the server remembers to spare CPU (#18), and that remembering changes nothing.

Plans (signal/plan.py): a remembered plan is exactly the plan strategy.plan_race builds for
the same inputs (RTT rounded up to its bucket), whatever the profiles, candidates and RTT;
peers that differ only in what the planner never reads share one; the LAN rule (a shared
public IPv4 address) still tells pairs apart. Checked candidate lists (protocol.py): judged
once per exact list and loopback policy, each answer a fresh copy."""
from __future__ import annotations

import enum
import math
import random
from typing import Any

import pytest

from pyholepunch import strategy
from pyholepunch.nat.profile import NatProfile
from pyholepunch.signal import plan as plan_mod
from pyholepunch.signal import protocol
from pyholepunch.signal.plan import MAX_PLANNED_RTT, RTT_FINE, make_plan, rtt_bucket
from pyholepunch.signal.protocol import check_candidates

CHOICES: dict[str, tuple[Any, ...]] = {
    "transport": ("tcp", "udp"),
    "family": ("ipv4", "ipv6"),
    "mapping": ("none", "endpoint-independent", "address-dependent",
                "address-and-port-dependent", "unknown", "bogus"),
    "filtering": ("none", "endpoint-independent", "address-dependent",
                  "address-and-port-dependent", "unknown"),
    "allocation": ("preserving", "sequential", "random", "unknown"),
    "unsolicited_syn": ("accept", "drop", "rst", "icmp", "unknown"),
    "delta": (None, 1, 2, -1, 7),
    "port_mapping": (None, ["198.51.100.7", 4000]),
    "mapped_by": ("", "PCP", "UPnP"),
    "hairpin": (None, True, False),
}
PUBLIC = ("198.51.100.1", "198.51.100.2", "2001:db8::1")
PUBLIC_SETS = ([], ["198.51.100.1"], ["198.51.100.2"], ["198.51.100.1", "2001:db8::1"])


def random_profile(rng: random.Random) -> dict[str, Any]:
    p = {k: rng.choice(v) for k, v in CHOICES.items() if rng.random() < 0.8}
    p["public_ips"] = rng.sample(PUBLIC, rng.randrange(3))
    p["local_ips"] = [f"10.0.0.{rng.randrange(1, 250)}"]
    p["confidence"] = {"mapping": rng.random()}
    p["server"] = f"192.0.2.{rng.randrange(1, 250)}:3478"
    return p


def random_candidates(rng: random.Random) -> list[list[Any]]:
    pool = [["198.51.100.9", 4001, "ipv4", "eth0", "stun"],
            ["10.0.0.9", 4001, "ipv4", "eth0", "host"],
            ["2001:db8::9", 4002, "ipv6", "eth0", "stun"],
            ["2001:db8::a", 4002, "ipv6", "eth0", "host"],
            ["203.0.113.9", 4003, "ipv4", "", "portmap"]]
    return check_candidates(rng.sample(pool, rng.randrange(len(pool) + 1)))


def fresh(ini: list[dict[str, Any]], res: list[dict[str, Any]], ic: list[list[Any]],
          rc: list[list[Any]], rtt: float) -> dict[str, Any] | None:
    try:
        plan: dict[str, Any] = strategy.plan_race(
            [NatProfile.from_dict(p) for p in ini], [NatProfile.from_dict(p) for p in res],
            strategy.parse_candidates(ic), strategy.parse_candidates(rc),
            rtt=rtt_bucket(rtt)).to_dict()
        return plan
    except ValueError:
        return None


@pytest.fixture(autouse=True)
def _empty_cache() -> None:
    plan_mod._plans.clear()


def test_remembered_plan_is_the_fresh_plan() -> None:
    rng = random.Random(18)
    cases = [([random_profile(rng) for _ in range(rng.randrange(3))],
              [random_profile(rng) for _ in range(rng.randrange(3))],
              random_candidates(rng), random_candidates(rng),
              rng.choice((0.0, 1e-4, 0.0123, 0.04, 0.3, 2.9)) * rng.uniform(0.5, 1.5))
             for _ in range(600)]
    for _round in range(2):         # the first round fills the cache, the second reads it
        for ini, res, ic, rc, rtt in cases:
            assert make_plan(ini, res, ic, rc, rtt=rtt) == fresh(ini, res, ic, rc, rtt)
    assert plan_mod._plans, "nothing was remembered"


@pytest.mark.parametrize("field", [*CHOICES, "public_ips"])
def test_a_field_the_planner_reads_is_in_the_key(field: str) -> None:
    """Remember a plan, then ask for the same session with one profile field changed: the
    answer is the fresh plan for the changed profile (a key that left the field out would
    hand back the remembered one)."""
    rng = random.Random(field)
    c = check_candidates([["198.51.100.9", 4001, "ipv4", "eth0", "stun"],
                          ["2001:db8::9", 4002, "ipv6", "eth0", "stun"]])
    for _ in range(150):
        ini = {**random_profile(rng), "transport": "tcp", "family": rng.choice(("ipv4", "ipv6"))}
        res = {**random_profile(rng), "transport": "tcp"}
        rtt = rng.uniform(0.0, 0.3)
        make_plan([ini], [res], c, c, rtt=rtt)
        values = PUBLIC_SETS if field == "public_ips" else CHOICES[field]
        for side in (ini, res):
            side[field] = rng.choice(values)
            assert make_plan([ini], [res], c, c, rtt=rtt) == fresh([ini], [res], c, c, rtt)


def test_peers_differing_in_what_the_planner_ignores_share_a_plan() -> None:
    base = {"transport": "tcp", "mapping": "endpoint-independent",
            "filtering": "address-and-port-dependent", "allocation": "preserving",
            "unsolicited_syn": "drop"}
    c = check_candidates([["198.51.100.9", 4001, "ipv4", "eth0", "stun"]])
    a = make_plan([{**base, "public_ips": ["198.51.100.1"], "server": "x"}],
                  [{**base, "public_ips": ["198.51.100.2"]}], c, c, rtt=0.0401)
    b = make_plan([{**base, "public_ips": ["198.51.100.3"], "local_ips": ["10.1.1.1"]}],
                  [{**base, "public_ips": ["198.51.100.4"]}], c, c, rtt=0.0399)
    assert a is b and len(plan_mod._plans) == 1
    same = make_plan([{**base, "public_ips": ["198.51.100.5"]}],
                     [{**base, "public_ips": ["198.51.100.5"]}], c, c, rtt=0.04)
    assert same is not None and same["steps"][0]["kind"] == "lan"
    assert a is not None and a["steps"][0]["kind"] != "lan"


def test_no_candidates_is_not_host_candidates_only() -> None:
    """plan_race reads an empty list as IPv4, host-only candidates as no family at all."""
    p = [{"transport": "tcp", "mapping": "endpoint-independent"}]
    host = check_candidates([["10.0.0.9", 4001, "ipv4", "eth0", "host"]])
    assert make_plan(p, p, [], [], rtt=0.01) == fresh(p, p, [], [], 0.01)
    assert make_plan(p, p, host, host, rtt=0.01) == fresh(p, p, host, host, 0.01)
    assert make_plan(p, p, [], [], rtt=0.01) != make_plan(p, p, host, host, rtt=0.01)


def test_failed_plans_are_not_remembered() -> None:
    bad = [{"mapping": "bogus"}]
    assert make_plan(bad, bad, [], [], rtt=0.01) is None
    assert not plan_mod._plans


@pytest.mark.parametrize("rtt", [0.0, 1e-6, 0.0005, 0.00051, 0.0159, 0.016, 0.0161, 0.2,
                                 1.0, 3.0, 9.9, MAX_PLANNED_RTT])
def test_rtt_bucket_rounds_up_a_little(rtt: float) -> None:
    b = rtt_bucket(rtt)
    assert rtt <= b <= MAX_PLANNED_RTT
    assert b - rtt <= max(RTT_FINE, rtt / 16) + 1e-12
    assert rtt_bucket(b) == b       # a bucket is its own bucket


def test_rtt_bucket_leaves_nonsense_to_the_planner() -> None:
    assert math.isnan(rtt_bucket(math.nan)) and rtt_bucket(-1.0) == -1.0
    assert make_plan([], [], [], [], rtt=math.inf) == fresh([], [], [], [], math.inf)


class _Port(enum.IntEnum):
    P = 5


def test_checked_candidates_are_remembered_exactly() -> None:
    protocol._checked.clear()
    wire = [["198.51.100.1", 5, "ipv4", "", "stun"]]
    first, again = check_candidates(wire), check_candidates(wire)
    assert first == again == wire and again is not wire and again[0] is not wire[0]
    assert list(protocol._checked.values()) == [None]     # passed as it was: nothing kept
    again[0][1] = 6                                       # a caller's copy is its own
    assert check_candidates(wire) == wire
    v1 = [["198.51.100.1", 5], ["198.51.100.1", 5]]       # extended, then remembered so
    assert check_candidates(v1) == check_candidates(v1) == [
        ["198.51.100.1", 5, "ipv4", "", "stun"], ["198.51.100.1", 5, "ipv4", "", "host"]]
    loop = [["127.0.0.1", 5, "ipv4", "", "host"]]
    assert check_candidates(loop) == loop
    with pytest.raises(ValueError, match="loopback"):     # the policy is part of the key
        check_candidates(loop, allow_loopback=False)
    for bad in (True, _Port.P):                           # packs like 5, is not an int
        with pytest.raises(ValueError, match="bad candidate address"):
            check_candidates([["198.51.100.1", bad, "ipv4", "", "stun"]])
    size = len(protocol._checked)
    assert check_candidates([("198.51.100.1", 5, "ipv4", "", "stun")]) == wire
    assert len(protocol._checked) == size                 # not wire data: checked afresh
