"""strategy.plan over all 36 unordered pairs of the lab's NAT types, both orders, plus the
plan's wire form. Pure functions: no sockets, no clock."""
from __future__ import annotations

import copy
import itertools
import json
import random
from typing import Any

import pytest

from pyholepunch import strategy as st
from pyholepunch.nat.profile import Allocation, Filtering, Mapping, NatProfile, SynResponse
from pyholepunch.strategy import Action, PortChoice, RoleInstruction, StepKind, Target

EIM, APDM = Mapping.ENDPOINT_INDEPENDENT, Mapping.ADDRESS_AND_PORT_DEPENDENT
APDF = Filtering.ADDRESS_AND_PORT_DEPENDENT

# Ground-truth TCP profile of each lab type (docs/lab.md).
LAB: dict[str, NatProfile] = {
    "none": NatProfile(mapping=Mapping.NONE, filtering=Filtering.NONE,
                       allocation=Allocation.PRESERVING, unsolicited_syn=SynResponse.ACCEPT,
                       public_ips=("198.51.100.10",)),
    "full-cone": NatProfile(mapping=EIM, filtering=Filtering.ENDPOINT_INDEPENDENT,
                            allocation=Allocation.PRESERVING, unsolicited_syn=SynResponse.ACCEPT,
                            public_ips=("198.51.100.11",)),
    "restricted-cone": NatProfile(mapping=EIM, filtering=Filtering.ADDRESS_DEPENDENT,
                                  allocation=Allocation.PRESERVING, unsolicited_syn=SynResponse.DROP,
                                  public_ips=("198.51.100.12",)),
    "port-restricted": NatProfile(mapping=EIM, filtering=APDF, allocation=Allocation.PRESERVING,
                                  unsolicited_syn=SynResponse.DROP, public_ips=("198.51.100.13",)),
    "port-restricted-rst": NatProfile(mapping=EIM, filtering=APDF, allocation=Allocation.PRESERVING,
                                      unsolicited_syn=SynResponse.RST, public_ips=("198.51.100.14",)),
    "symmetric-seq": NatProfile(mapping=APDM, filtering=APDF, allocation=Allocation.SEQUENTIAL,
                                delta=1, unsolicited_syn=SynResponse.DROP,
                                public_ips=("198.51.100.15",)),
    "symmetric-random": NatProfile(mapping=APDM, filtering=APDF, allocation=Allocation.RANDOM,
                                   unsolicited_syn=SynResponse.DROP, public_ips=("198.51.100.16",)),
    "cgnat": NatProfile(mapping=EIM, filtering=APDF, allocation=Allocation.PRESERVING,
                        unsolicited_syn=SynResponse.DROP, public_ips=("100.64.0.20",)),
}
OPEN = {"none", "full-cone"}
CONES = {"restricted-cone", "port-restricted", "port-restricted-rst", "cgnat"}

# Every unordered pair's steps (relay aside), written out by hand rather than derived from the
# table: O open, C cone (drop), R cone answering RST, S sequential symmetric, X random symmetric.
KIND = {"none": "O", "full-cone": "O", "restricted-cone": "C", "port-restricted": "C",
        "cgnat": "C", "port-restricted-rst": "R", "symmetric-seq": "S", "symmetric-random": "X"}
D, S, L, P, B = "direct", "simopen", "simopen-low-ttl", "predict-sweep", "birthday"
SEQUENCE_BY_KIND: dict[frozenset[str], list[str]] = {
    frozenset("O"): [D, S], frozenset("OC"): [D, S], frozenset("OR"): [D, S, L],
    frozenset("OS"): [D, P], frozenset("OX"): [D, B],
    frozenset("C"): [S], frozenset("CR"): [S, L], frozenset("R"): [S, L],
    frozenset("CS"): [P], frozenset("RS"): [P], frozenset("CX"): [B], frozenset("RX"): [B],
    frozenset("S"): [P], frozenset("SX"): [], frozenset("X"): [],
}


def expected(a: str, b: str) -> list[str]:
    return SEQUENCE_BY_KIND[frozenset({KIND[a], KIND[b]})] + ["relay"]


FIRST = {frozenset({a, b}): expected(a, b)[0] for a in LAB for b in LAB}
PAIRS = list(itertools.combinations_with_replacement(LAB, 2))
ORDERED = [(a, b) for a, b in PAIRS] + [(b, a) for a, b in PAIRS if a != b]


def test_the_matrix_has_36_pairs() -> None:
    assert len(PAIRS) == 36 and len(FIRST) == 36 and len(ORDERED) == 64
    assert sorted(FIRST.values()).count("relay") == 2


@pytest.mark.parametrize(("ini", "res"), ORDERED, ids=[f"{a}->{b}" for a, b in ORDERED])
def test_first_step_and_relay_last(ini: str, res: str) -> None:
    plan = st.plan(LAB[ini], LAB[res], rtt=0.04, same_public_ip=False)
    kinds = [s.kind for s in plan.steps]
    assert kinds == expected(ini, res)
    assert kinds[0] == FIRST[frozenset({ini, res})]
    assert kinds[-1] is StepKind.RELAY and kinds.count(StepKind.RELAY) == 1
    assert StepKind.LAN not in kinds                      # distinct public addresses
    relay_only = frozenset({ini, res}) in (frozenset({"symmetric-random"}),
                                           frozenset({"symmetric-random", "symmetric-seq"}))
    assert plan.relay_only is relay_only
    if relay_only:
        assert "no direct method short of brute force" in plan.reason
        assert "no direct path" in plan.steps[-1].reason
    for step in plan.steps:
        assert 0 < step.budget <= 10
        for role in st.ROLES:
            ins = step.for_role(role)
            assert 0 <= ins.start_delay < step.budget
    assert plan.initiator_nat == LAB[ini].label and plan.responder_nat == LAB[res].label


def test_exactly_the_two_random_symmetric_pairs_are_relay_only() -> None:
    relay_only = {frozenset({a, b}) for a, b in PAIRS
                  if st.plan(LAB[a], LAB[b], same_public_ip=False).relay_only}
    assert relay_only == {frozenset({"symmetric-random"}),
                          frozenset({"symmetric-random", "symmetric-seq"})}


def _sym_waits_if_needed(sym: RoleInstruction, cone: RoleInstruction, cone_nat: NatProfile) -> None:
    """In a sweep the cone's SYNs leave first, the symmetric side's arrive after them, when
    the cone's NAT may kill early SYNs; behind one known to drop them both start together."""
    if cone_nat.unsolicited_syn is SynResponse.DROP:
        assert sym.start_delay == cone.start_delay == 0
    else:
        assert sym.start_delay > cone.start_delay


@pytest.mark.parametrize(("ini", "res"), ORDERED, ids=[f"{a}->{b}" for a, b in ORDERED])
def test_roles_do_what_their_nat_needs(ini: str, res: str) -> None:
    plan = st.plan(LAB[ini], LAB[res], rtt=0.04, same_public_ip=False)
    role_of = {"initiator": ini, "responder": res}
    for step in plan.steps:
        acts = {r: step.for_role(r) for r in st.ROLES}
        if step.kind is StepKind.DIRECT:
            (listener,) = [r for r in st.ROLES if acts[r].action is not Action.CONNECT]
            dialer = "responder" if listener == "initiator" else "initiator"
            assert acts[dialer].action is Action.CONNECT
            assert role_of[listener] in OPEN and acts[listener].action is Action.LISTEN
            assert acts[dialer].start_delay > acts[listener].start_delay
            if role_of[listener] in OPEN and role_of[dialer] in OPEN:
                assert listener == "responder"                    # both open: the responder
        elif step.kind is StepKind.BIRTHDAY:
            (sym,) = [r for r in st.ROLES if role_of[r] == "symmetric-random"]
            cone = "responder" if sym == "initiator" else "initiator"
            assert acts[sym].action is Action.SWEEP_LOCAL_PORTS
            assert acts[cone].action is Action.SWEEP_REMOTE_PORTS
            assert acts[cone].ports is PortChoice.RANDOM
            assert acts[sym].count >= 1024 and acts[cone].count >= 512
            assert st.birthday_probability(acts[sym].count, acts[cone].count) >= 0.95
            _sym_waits_if_needed(acts[sym], acts[cone], LAB[role_of[cone]])
        elif step.kind is StepKind.PREDICT_SWEEP and {ini, res} != {"symmetric-seq"}:
            (sym,) = [r for r in st.ROLES if role_of[r] == "symmetric-seq"]
            cone = "responder" if sym == "initiator" else "initiator"
            assert acts[sym].action is Action.SWEEP_LOCAL_PORTS
            assert acts[cone].action is Action.SWEEP_REMOTE_PORTS
            assert acts[cone].ports is PortChoice.PREDICTED and acts[cone].delta == 1
            assert acts[cone].count >= acts[sym].count
            _sym_waits_if_needed(acts[sym], acts[cone], LAB[role_of[cone]])
        elif step.kind is StepKind.PREDICT_SWEEP:
            for r in st.ROLES:
                assert acts[r].action is Action.SWEEP_PAIRS and acts[r].delta == 1
        elif step.kind is StepKind.SIMOPEN_LOW_TTL:
            for r in st.ROLES:
                peer = role_of["responder" if r == "initiator" else "initiator"]
                assert (acts[r].syn_ttl is not None) == (peer == "port-restricted-rst")
        elif step.kind is StepKind.SIMOPEN:
            assert all(acts[r].action is Action.SIMOPEN and acts[r].syn_ttl is None
                       for r in st.ROLES)
        elif step.kind is StepKind.RELAY:
            assert all(acts[r].action is Action.RELAY for r in st.ROLES)


def test_low_ttl_only_when_a_nat_answers_with_rst() -> None:
    with_rst = st.plan(LAB["port-restricted"], LAB["port-restricted-rst"])
    assert [s.kind for s in with_rst.steps] == [StepKind.SIMOPEN, StepKind.SIMOPEN_LOW_TTL,
                                                StepKind.RELAY]
    low = with_rst.steps[1]
    assert low.initiator.syn_ttl == 2 and low.responder.syn_ttl is None
    without = st.plan(LAB["port-restricted"], LAB["cgnat"])
    assert [s.kind for s in without.steps] == [StepKind.SIMOPEN, StepKind.RELAY]
    assert st.plan(LAB["port-restricted-rst"], LAB["cgnat"], low_ttl=3).steps[1].responder.syn_ttl == 3


def test_budgets_scale_with_rtt_and_stay_rtt_sized() -> None:
    fast = st.plan(LAB["port-restricted"], LAB["cgnat"], rtt=0.0, clock_error=0.0)
    slow = st.plan(LAB["port-restricted"], LAB["cgnat"], rtt=0.4, clock_error=0.0)
    assert fast.steps[0].budget == 1.5 and slow.steps[0].budget == pytest.approx(2.3)
    direct = st.plan(LAB["none"], LAB["cgnat"], rtt=0.04).steps[0]
    sweep = st.plan(LAB["cgnat"], LAB["symmetric-random"], rtt=0.04).steps[0]
    assert 1.0 <= direct.budget < 1.5 <= sweep.budget - 1 <= 3


def test_lan_first_when_both_share_a_public_address() -> None:
    a = LAB["port-restricted"].evolve(public_ips=("203.0.113.50",))
    b = LAB["symmetric-random"].evolve(public_ips=("203.0.113.50",))
    plan = st.plan(a, b)
    assert [s.kind for s in plan.steps][:2] == [StepKind.LAN, StepKind.BIRTHDAY]
    lan = plan.steps[0]
    assert lan.initiator.target is Target.LAN and lan.responder.target is Target.LAN
    assert lan.parallel is None and plan.steps[1].parallel is None    # LAN first, alone
    assert lan.budget < plan.steps[1].budget
    assert plan.steps[-1].kind is StepKind.RELAY
    # The server's word beats the profiles' addresses, both ways.
    assert st.plan(a, b, same_public_ip=False).steps[0].kind is StepKind.BIRTHDAY
    sym = LAB["symmetric-random"]
    forced = st.plan(sym, sym, same_public_ip=True)
    assert [s.kind for s in forced.steps] == [StepKind.LAN, StepKind.RELAY]
    assert not forced.relay_only


UNKNOWN = NatProfile(not_learned=("mapping: no STUN answer",))
PARTIAL = NatProfile(mapping=EIM, not_learned=("filtering: no CHANGE-REQUEST support",))


@pytest.mark.parametrize("other", list(LAB) + ["unknown", "partial"])
def test_unknown_profiles_get_a_conservative_plan_ending_in_relay(other: str) -> None:
    prof = {"unknown": UNKNOWN, "partial": PARTIAL}.get(other) or LAB[other]
    for ini, res in ((UNKNOWN, prof), (prof, UNKNOWN)):
        plan = st.plan(ini, res)
        assert plan.steps[-1].kind is StepKind.RELAY
        assert 2 <= len(plan.steps) <= 4
        assert plan.steps[0].kind in (StepKind.DIRECT, StepKind.SIMOPEN)
        # nothing expensive is gambled on an unknown NAT
        assert all(s.kind not in (StepKind.BIRTHDAY, StepKind.PREDICT_SWEEP) for s in plan.steps)
        assert "conservative" in plan.reason


def test_partial_profile_assumes_the_strictest_cone() -> None:
    assert st.behaviour(PARTIAL) is st.Behaviour.PORT_CONE
    plan = st.plan(PARTIAL, LAB["symmetric-random"])
    assert [s.kind for s in plan.steps] == [StepKind.BIRTHDAY, StepKind.RELAY]
    # sequential without a measured delta is not predictable
    no_delta = LAB["symmetric-seq"].evolve(delta=None)
    assert st.behaviour(no_delta) is st.Behaviour.RANDOM_SYM


def test_without_relay() -> None:
    plan = st.plan(LAB["symmetric-random"], LAB["symmetric-random"], relay=False,
                   same_public_ip=False)
    assert plan.steps == () and "cannot connect" in plan.reason and not plan.relay_only
    plan = st.plan(LAB["cgnat"], LAB["cgnat"], relay=False, same_public_ip=False)
    assert [s.kind for s in plan.steps] == [StepKind.SIMOPEN] and not plan.has_relay


def test_plan_is_deterministic() -> None:
    for a, b in PAIRS:
        assert st.plan(LAB[a], LAB[b]).to_dict() == st.plan(LAB[a], LAB[b]).to_dict()


@pytest.mark.parametrize("kwargs", [
    {"rtt": -1}, {"rtt": float("nan")}, {"clock_error": 9}, {"birthday_size": 0},
    {"birthday_size": True}, {"predict_count": 5000}, {"low_ttl": 0}, {"low_ttl": 256},
])
def test_bad_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        st.plan(LAB["cgnat"], LAB["cgnat"], **kwargs)
    with pytest.raises(ValueError, match="initiator must be a NatProfile"):
        st.plan({"mapping": "none"}, LAB["cgnat"])  # type: ignore[arg-type]


@pytest.mark.parametrize(("a", "b"), PAIRS)
def test_round_trip_through_json(a: str, b: str) -> None:
    plan = st.plan(LAB[a], LAB[b], same_public_ip=(a == b))
    wire = json.loads(json.dumps(plan.to_dict()))
    assert st.Plan.from_dict(wire) == plan


def _good() -> dict[str, Any]:
    return st.plan(LAB["port-restricted"], LAB["port-restricted-rst"]).to_dict()


def _set(path: str, value: Any) -> dict[str, Any]:
    d = copy.deepcopy(_good())
    node: Any = d
    keys = [int(k) if k.isdigit() else k for k in path.split(".")]
    for k in keys[:-1]:
        node = node[k]
    if value is _DELETE:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return d


_DELETE = object()


@pytest.mark.parametrize(("data", "message"), [
    ([], "plan must be a mapping"),
    (_set("version", 3), "version 3 is not supported"),
    (_set("steps", _DELETE), "plan lacks steps"),
    (_set("steps", "simopen"), "plan.steps must be a list"),
    (_set("steps", [_good()["steps"][0]] * 17), "at most 16"),
    (_set("surprise", 1), "unknown field.*surprise"),
    (_set("reason", 5), "plan.reason must be text"),
    (_set("steps.0.kind", "teleport"), r"steps\[0\].kind 'teleport' is not one of"),
    (_set("steps.0.budget", 0), "budget must be positive"),
    (_set("steps.0.budget", float("inf")), "budget must be a number"),
    (_set("steps.0.budget", "1"), "budget must be a number"),
    (_set("steps.0.budget", 61), "budget must be a number"),
    (_set("steps.0.initiator", None), "initiator must be a mapping"),
    (_set("steps.0.initiator.action", "jump"), "action 'jump' is not one of"),
    (_set("steps.0.initiator.count", 0), "count must be an integer"),
    (_set("steps.0.initiator.count", 1.5), "count must be an integer"),
    (_set("steps.0.initiator.syn_ttl", 300), "syn_ttl must be an integer 1..255"),
    (_set("steps.0.initiator.start_delay", -0.1), "start_delay must be a number"),
    (_set("steps.0.initiator.start_delay", 30.0), "not below the budget"),
    (_set("steps.0.initiator.ports", "predicted"), "'predicted' needs a delta"),
    (_set("steps.0.initiator.delta", 0), "delta must not be 0"),
    (_set("steps.0.initiator.target", "moon"), "target 'moon' is not one of"),
    (_set("steps.0.initiator.action", "relay"), "'relay' belongs to relay steps"),
    (_set("steps.2.responder.action", "simopen"), "'relay' belongs to relay steps"),
    (_set("steps.0.initiator.action", "listen") | {}, None),   # one side listening is fine
    (_set("steps.0.parallel", -1), "parallel must be an integer"),
])
def test_bad_plan_dicts_are_refused_by_name(data: Any, message: str | None) -> None:
    if message is None:
        st.Plan.from_dict(data)
        return
    with pytest.raises(ValueError, match=message):
        st.Plan.from_dict(data)


def test_refuses_a_step_where_nobody_dials_and_relay_not_last() -> None:
    d = _good()
    for role in ("initiator", "responder"):
        d["steps"][0][role]["action"] = "listen"
    with pytest.raises(ValueError, match="neither role dials"):
        st.Plan.from_dict(d)
    d = _good()
    d["steps"] = [d["steps"][2], d["steps"][0]]
    with pytest.raises(ValueError, match="relay must be the last step"):
        st.Plan.from_dict(d)


def test_remote_ports() -> None:
    ann = st.RoleInstruction(Action.SIMOPEN)
    assert st.remote_ports(ann, 40000) == [40000]
    pred = st.RoleInstruction(Action.SWEEP_REMOTE_PORTS, ports=PortChoice.PREDICTED, count=3, delta=2)
    assert st.remote_ports(pred, 40000) == [40002, 40004, 40006]
    assert st.remote_ports(pred, 65534) == [1024, 1026, 1028]          # wraps inside the range
    back = st.RoleInstruction(Action.SWEEP_PAIRS, ports=PortChoice.PREDICTED, count=2, delta=-1)
    assert st.remote_ports(back, 1025) == [1024, 65535]
    rnd = st.RoleInstruction(Action.SWEEP_REMOTE_PORTS, ports=PortChoice.RANDOM, count=1024)
    ports = st.remote_ports(rnd, 40000, random.Random(7))
    assert len(set(ports)) == 1024 and all(1024 <= p <= 65535 for p in ports)
    assert ports == st.remote_ports(rnd, 40000, random.Random(7))
    with pytest.raises(ValueError, match="announced port 0"):
        st.remote_ports(ann, 0)


def test_birthday_probability_matches_the_measured_sizes() -> None:
    assert st.birthday_probability(1024, 1024) > 1 - 1e-7          # 1 - e^-16
    assert 0.98 < st.birthday_probability(512, 512) < 0.99          # 1 - e^-4
    assert st.birthday_probability(1, 1) == pytest.approx(1 / 64512, rel=1e-4)


def test_round_trip_through_msgpack_as_signaling_sends_it() -> None:
    msgpack = pytest.importorskip("msgpack")
    for a, b in PAIRS:
        plan = st.plan(LAB[a], LAB[b], rtt=0.037, same_public_ip=(a == b))
        wire = msgpack.unpackb(msgpack.packb(plan.to_dict()), raw=False)
        assert st.Plan.from_dict(wire) == plan
