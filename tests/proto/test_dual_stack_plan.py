"""Dual stack without a network: candidates on the wire, IPv6 profiles, the raced plan."""
from __future__ import annotations

from typing import Any

import pytest

from pyholepunch import strategy as st
from pyholepunch.nat.profile import Allocation, Family, Filtering, Mapping, NatProfile, SynResponse
from pyholepunch.strategy import NO_COMMON_FAMILY, Candidate, StepKind, parse_candidates, plan_race
from pyholepunch.strategy.race import MAX_RACE_DELAY, MIN_RACE_DELAY, PLANNED_RTT_FLOOR, race_delay

APDF = Filtering.ADDRESS_AND_PORT_DEPENDENT
V6 = Family.IPV6


def v6(kind: str) -> NatProfile:
    """The TCP profile the classifier gives each lab IPv6 behaviour (see nat/classify)."""
    syn = {"open": SynResponse.ACCEPT, "firewall": SynResponse.DROP,
           "firewall-rst": SynResponse.RST}[kind]
    return NatProfile(mapping=Mapping.NONE, family=V6, allocation=Allocation.PRESERVING,
                      filtering=Filtering.NONE if kind == "open" else APDF, unsolicited_syn=syn,
                      public_ips=("2001:db8:1::10",))


V4_RANDOM = NatProfile(mapping=Mapping.ADDRESS_AND_PORT_DEPENDENT, filtering=APDF,
                       allocation=Allocation.RANDOM, unsolicited_syn=SynResponse.DROP,
                       public_ips=("198.51.100.16",))
V4_CONE = NatProfile(mapping=Mapping.ENDPOINT_INDEPENDENT, filtering=APDF,
                     allocation=Allocation.PRESERVING, unsolicited_syn=SynResponse.DROP,
                     public_ips=("198.51.100.13",))
V4_CONE_B = V4_CONE.evolve(public_ips=("203.0.113.13",))


def cands(*families: str) -> list[Candidate]:
    out = []
    if "ipv6" in families:
        out.append(Candidate("2001:db8:1::10", 40000, "stun", "eth0"))
    if "ipv4" in families:
        out += [Candidate("198.51.100.13", 40001, "stun", "eth0"),
                Candidate("10.0.1.2", 40001, "host", "eth0")]
    return out


def test_candidates_round_trip_and_v1_pairs_are_still_read() -> None:
    c = Candidate("2001:db8::5", 4000, "stun", "eth0")
    assert c.family == "ipv6" and Candidate.from_wire(c.to_wire()) == c
    assert c.to_wire() == ["2001:db8::5", 4000, "ipv6", "eth0", "stun"]   # v1's pair, extended
    old = parse_candidates([["198.51.100.7", 4000], ("10.0.0.2", 4000)])
    assert [(x.address, x.origin) for x in old] == [(("198.51.100.7", 4000), "stun"),
                                                     (("10.0.0.2", 4000), "host")]


@pytest.mark.parametrize(("value", "message"), [
    (["2001:db8::5", 1, "ipv4", "", "stun"], "does not match"),
    (["example.org", 1, "ipv4", "", "stun"], "not an IP address"),
    (["198.51.100.1", 0, "ipv4", "", "stun"], "bad candidate address"),
    (["198.51.100.1", 1, "ipv4", "", "guess"], "origin 'guess'"),
    (["198.51.100.1", 1, "ipv4", "x" * 40, "host"], "iface"),
    (["198.51.100.1", 1, "ipv4"], "a candidate is"),
    ({"ip": "198.51.100.1", "port": 1}, "a candidate is"),
    ("198.51.100.1:1", "a candidate is"),
])
def test_bad_candidates_are_refused_by_name(value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Candidate.from_wire(value)


def test_ipv6_profiles_name_firewall_open_and_nptv6() -> None:
    assert v6("open").nat_type == "open"
    assert v6("firewall").nat_type == "firewall"
    assert v6("firewall-rst").label == "firewall (unsolicited SYN rst)"
    npt = NatProfile(mapping=Mapping.ENDPOINT_INDEPENDENT, filtering=APDF, family=V6,
                     allocation=Allocation.PRESERVING)
    assert npt.nat_type == "nptv6"
    assert NatProfile.from_dict(v6("firewall").to_dict()) == v6("firewall")
    assert NatProfile.from_dict({"mapping": "none"}).family is Family.IPV4   # v1 profiles
    # A stateful firewall punches like a port-restricted cone; an open host like an open one.
    assert st.behaviour(v6("firewall")) is st.Behaviour.PORT_CONE
    assert st.behaviour(v6("open")) is st.Behaviour.OPEN


def test_random_symmetric_pair_with_ipv6_firewalls_plans_ipv6_only() -> None:
    plan = plan_race([V4_RANDOM, v6("firewall")], [V4_RANDOM.evolve(public_ips=()), v6("firewall")],
                     cands("ipv4", "ipv6"), cands("ipv4", "ipv6"))
    assert [(s.family, s.kind) for s in plan.steps] == [("ipv6", StepKind.SIMOPEN),
                                                        ("ipv4", StepKind.RELAY)]
    assert plan.families == ("ipv6",) and plan.race_delay == 0.0
    assert "brute force" in plan.reason and "ipv6" in plan.reason
    again = st.Plan.from_dict(plan.to_dict())
    assert again == plan


def test_both_families_race_ipv6_first_ipv4_after_an_rtt_derived_delay() -> None:
    plan = plan_race([V4_CONE, v6("firewall-rst")], [V4_CONE_B, v6("open")],
                     cands("ipv4", "ipv6"), cands("ipv4", "ipv6"), rtt=0.04)
    assert plan.families == ("ipv6", "ipv4")
    assert plan.track("ipv6")[0].kind is StepKind.DIRECT       # the open side listens
    assert plan.track("ipv4")[0].kind is StepKind.SIMOPEN
    assert plan.race_delay == race_delay(0.04) == 0.08
    assert plan.track_offset("ipv4") == 0.08 and plan.track_offset("ipv6") == 0.0
    assert plan.steps[-1].kind is StepKind.RELAY
    assert "ipv4 (after 80 ms)" in plan.reason
    assert st.Plan.from_dict(plan.to_dict()) == plan


def test_race_delay_is_clamped() -> None:
    assert race_delay(0.0) == MIN_RACE_DELAY and race_delay(5.0) == MAX_RACE_DELAY


def test_no_common_family_relays_and_says_so() -> None:
    plan = plan_race([v6("open")], [V4_CONE], cands("ipv6"), cands("ipv4"))
    assert [s.kind for s in plan.steps] == [StepKind.RELAY]
    assert NO_COMMON_FAMILY in plan.reason and "ipv6" in plan.reason and "ipv4" in plan.reason
    assert NO_COMMON_FAMILY in plan.steps[0].reason
    assert plan_race([v6("open")], [V4_CONE], cands("ipv6"), cands("ipv4"), relay=False).steps == ()


def test_an_ipv4_only_pair_plans_as_before() -> None:
    """Same steps, budgets and reason as the one-family planner: the IPv4 matrix is unchanged."""
    old = st.plan(V4_CONE, V4_CONE_B)
    new = plan_race([V4_CONE], [V4_CONE_B], cands("ipv4"), cands("ipv4"))
    assert new.reason == old.reason and new.race_delay == 0.0
    assert [(s.kind, s.budget, s.initiator, s.responder) for s in new.steps] == \
        [(s.kind, s.budget, s.initiator, s.responder) for s in old.steps]
    assert all(s.family == "ipv4" for s in new.steps)
    # a peer that announced nothing (v1) counts as IPv4-only
    assert plan_race([V4_CONE], [V4_CONE]).families == ("ipv4",)


def test_a_v1_plan_is_read_as_ipv4() -> None:
    d = st.plan(V4_CONE, V4_CONE).to_dict()
    d["version"] = 1
    del d["race_delay"]
    for step in d["steps"]:
        del step["family"]
    plan = st.Plan.from_dict(d)
    assert plan.families == ("ipv4",) and plan.race_delay == 0.0


def test_a_long_path_gets_longer_budgets_a_short_one_keeps_the_measured_plan() -> None:
    def budgets(rtt: float) -> list[float]:
        plan = plan_race([V4_CONE], [V4_CONE_B], cands("ipv4"), cands("ipv4"), rtt=rtt)
        return [s.budget for s in plan.steps]

    measured = budgets(PLANNED_RTT_FLOOR)
    assert budgets(0.0) == budgets(0.04) == measured     # the lab-measured timings
    assert all(long > short for long, short in zip(budgets(0.3), measured, strict=True))
    assert budgets(0.3) == [s.budget for s in st.plan(V4_CONE, V4_CONE_B, rtt=0.3).steps]
