"""The planner with a router port mapping: a mapped side plans like an open one (the other
dials the mapping first), the pair's punching tactics stay behind it as the fallback, and the
NAT profile carries the mapping (and says which protocol gave it) across the wire."""
from __future__ import annotations

from pyholepunch.nat.profile import Allocation, Filtering, Mapping, NatProfile, SynResponse
from pyholepunch.strategy import Action, Plan, StepKind, Target, plan

RANDOM = NatProfile(mapping=Mapping.ADDRESS_AND_PORT_DEPENDENT,
                    filtering=Filtering.ADDRESS_AND_PORT_DEPENDENT, allocation=Allocation.RANDOM,
                    unsolicited_syn=SynResponse.DROP, public_ips=("198.51.100.2",))
SEQ = RANDOM.evolve(allocation=Allocation.SEQUENTIAL, delta=1, public_ips=("192.0.2.2",))
CONE = NatProfile(mapping=Mapping.ENDPOINT_INDEPENDENT, filtering=Filtering.ADDRESS_AND_PORT_DEPENDENT,
                  allocation=Allocation.PRESERVING, unsolicited_syn=SynResponse.DROP,
                  public_ips=("192.0.2.2",))
OPEN = NatProfile(mapping=Mapping.NONE, filtering=Filtering.NONE, public_ips=("192.0.2.2",))


def mapped(p: NatProfile, by: str = "PCP") -> NatProfile:
    return p.evolve(port_mapping=(p.public_ips[0], 40000), mapped_by=by)


def test_random_pair_with_a_mapping_dials_it_instead_of_relaying() -> None:
    bare = plan(RANDOM, RANDOM.evolve(public_ips=("192.0.2.2",)))
    assert [s.kind for s in bare.steps] == [StepKind.RELAY]
    p = plan(RANDOM, mapped(RANDOM.evolve(public_ips=("192.0.2.2",))))
    assert [s.kind for s in p.steps] == [StepKind.DIRECT, StepKind.RELAY]
    first = p.steps[0]
    assert first.responder.action is Action.LISTEN
    assert first.initiator.action is Action.CONNECT and first.initiator.target is Target.MAPPED
    assert "via PCP" in first.reason and "192.0.2.2:40000" in first.reason
    assert "brute force" not in p.reason and "via PCP" in p.responder_nat
    assert Plan.from_dict(p.to_dict()) == p


def test_mapped_initiator_listens() -> None:
    p = plan(mapped(SEQ, "NAT-PMP"), RANDOM)
    first = p.steps[0]
    assert first.kind is StepKind.DIRECT and first.initiator.action is Action.LISTEN
    assert first.responder.target is Target.MAPPED and "via NAT-PMP" in first.reason


def test_punching_stays_as_the_fallback() -> None:
    bare = plan(CONE, CONE.evolve(public_ips=("198.51.100.2",)))
    p = plan(CONE, mapped(CONE.evolve(public_ips=("198.51.100.2",)), "UPnP"))
    assert p.steps[0].kind is StepKind.DIRECT and p.steps[0].initiator.target is Target.MAPPED
    assert p.steps[1:] == bare.steps
    p2 = plan(mapped(SEQ), CONE.evolve(public_ips=("198.51.100.9",)))
    assert [s.kind for s in p2.steps][:2] == [StepKind.DIRECT, StepKind.PREDICT_SWEEP]


def test_an_open_side_needs_no_mapping_step() -> None:
    assert plan(RANDOM, mapped(OPEN)).steps == plan(RANDOM, OPEN).steps


def test_profile_carries_the_mapping() -> None:
    p = mapped(RANDOM)
    assert p.label == "symmetric (random) via PCP"
    d = p.to_dict()
    assert d["port_mapping"] == ["198.51.100.2", 40000] and d["mapped_by"] == "PCP"
    assert NatProfile.from_dict(d) == p
    assert NatProfile.from_dict(RANDOM.to_dict()).port_mapping is None
