"""nat/classify.build_profile: the pure verdict from observations, case by case."""
from __future__ import annotations

from pyholepunch.nat.classify import FilterProbe, Observations, Outcome, build_profile
from pyholepunch.nat.profile import Allocation, Filtering, Mapping, SynResponse, Transport
from pyholepunch.stun.codec import ConnectBack

SERVER = ("203.0.113.10", 3478)
OTHER = ("203.0.113.11", 3479)
PUB = "198.51.100.2"


def obs(transport: Transport = Transport.UDP, **kw: object) -> Observations:
    o = Observations(transport, SERVER, local_ip="10.0.1.2", other_address=OTHER,
                     mapping_local=("10.0.1.2", 5000), mapped_primary=(PUB, 5000),
                     mapped_alt_ip=(PUB, 5000), mapped_alt_both=(PUB, 5000),
                     allocation=[(p, p) for p in (6000, 6100, 6200, 6300)], hairpin=False)
    o.filter_both = FilterProbe(Outcome.BLOCKED, ConnectBack.TIMEOUT)
    o.filter_port = FilterProbe(Outcome.BLOCKED, ConnectBack.TIMEOUT)
    for k, v in kw.items():
        setattr(o, k, v)
    return o


def test_port_restricted() -> None:
    p = build_profile(obs(Transport.TCP))
    assert p.label == "port-restricted (preserving)" and p.unsolicited_syn is SynResponse.DROP
    assert p.not_learned == () and p.public_ips == (PUB,)


def test_restricted_and_full_cone() -> None:
    assert build_profile(obs(filter_port=FilterProbe(Outcome.PASSED))).nat_type == "restricted-cone"
    full = build_profile(obs(Transport.TCP, filter_both=FilterProbe(Outcome.PASSED),
                             filter_port=FilterProbe(Outcome.PASSED)))
    assert full.nat_type == "full-cone" and full.filtering is Filtering.ENDPOINT_INDEPENDENT
    assert full.unsolicited_syn is SynResponse.ACCEPT


def test_rst_and_icmp() -> None:
    rst = FilterProbe(Outcome.BLOCKED, ConnectBack.REFUSED)
    p = build_profile(obs(Transport.TCP, filter_both=rst, filter_port=rst))
    assert p.unsolicited_syn is SynResponse.RST
    icmp = FilterProbe(Outcome.BLOCKED, ConnectBack.UNREACHABLE)
    p = build_profile(obs(Transport.TCP, filter_both=icmp, filter_port=icmp))
    assert p.unsolicited_syn is SynResponse.ICMP
    # one RST seen, the other connect-back timed out (its RST lost): still rst
    p = build_profile(obs(Transport.TCP, filter_both=FilterProbe(Outcome.BLOCKED, ConnectBack.TIMEOUT),
                          filter_port=rst))
    assert p.unsolicited_syn is SynResponse.RST and p.confidence["unsolicited_syn"] == 0.7


def test_mapping_kinds() -> None:
    adm = build_profile(obs(mapped_alt_ip=(PUB, 5001), mapped_alt_both=(PUB, 5001)))
    assert adm.mapping is Mapping.ADDRESS_DEPENDENT and adm.nat_type == "symmetric"
    apdm = build_profile(obs(mapped_alt_ip=(PUB, 5001), mapped_alt_both=(PUB, 5002)))
    assert apdm.mapping is Mapping.ADDRESS_AND_PORT_DEPENDENT
    lost = build_profile(obs(mapped_alt_ip=None))
    assert lost.mapping is Mapping.ENDPOINT_INDEPENDENT and lost.confidence["mapping"] == 0.7
    assert any("one alternate-address probe lost" in n for n in lost.not_learned)
    none = build_profile(obs(mapped_primary=("10.0.1.2", 5000)))
    assert none.nat_type == "open" and none.allocation is Allocation.PRESERVING


def test_plain_server_and_second_server() -> None:
    plain = build_profile(obs(other_address=None, filter_both=FilterProbe(Outcome.UNSUPPORTED, detail="420"),
                              filter_port=FilterProbe(Outcome.UNSUPPORTED)))
    assert plain.mapping is Mapping.UNKNOWN and plain.filtering is Filtering.UNKNOWN
    assert plain.nat_type == "unknown" and plain.allocation is Allocation.PRESERVING
    assert any("no OTHER-ADDRESS" in n for n in plain.not_learned)
    assert any(n.startswith("filtering: the server cannot answer") and "(420)" in n
               for n in plain.not_learned)
    two = build_profile(obs(other_address=None, alt_server=("192.0.2.1", 3478),
                            mapped_alt_server=(PUB, 5000)))
    assert two.mapping is Mapping.ENDPOINT_INDEPENDENT and two.confidence["mapping"] == 0.9


def test_allocation_kinds() -> None:
    seq = build_profile(obs(allocation=[(6000, 9000), (6100, 9001), (6200, 9002), (6300, 9003)]))
    assert (seq.allocation, seq.delta) == (Allocation.SEQUENTIAL, 1)
    one_off = build_profile(obs(allocation=[(1, 9000), (2, 9002), (3, 9004), (4, 9010), (5, 9012)]))
    assert (one_off.allocation, one_off.delta) == (Allocation.SEQUENTIAL, 2)
    assert one_off.confidence["allocation"] == 0.75
    late = build_profile(obs(allocation=[(1, 9001), (2, 9002), (3, 9000), (4, 9004)], allocation_lost=1))
    assert (late.allocation, late.delta, late.confidence["allocation"]) == (Allocation.SEQUENTIAL, 1, 0.8)
    down = build_profile(obs(allocation=[(1, 9003), (2, 9001), (3, 9002), (4, 9000)]))
    assert (down.allocation, down.delta) == (Allocation.SEQUENTIAL, -1)
    gappy = build_profile(obs(allocation=[(1, 9000), (2, 9010), (3, 9003), (4, 9020)]))
    assert gappy.allocation is Allocation.RANDOM
    rnd = build_profile(obs(allocation=[(1, 40000), (2, 1200), (3, 33333), (4, 5000)]))
    assert rnd.allocation is Allocation.RANDOM
    few = build_profile(obs(allocation=[(1, 2)], allocation_lost=4))
    assert few.allocation is Allocation.UNKNOWN
    assert "allocation: only 1 of 5 allocation probes answered" in few.not_learned


def test_filtering_half_known_is_not_guessed() -> None:
    p = build_profile(obs(filter_port=FilterProbe(Outcome.NOT_RUN, detail="no report")))
    assert p.filtering is Filtering.UNKNOWN and p.nat_type == "unknown"
    assert any("address-dependent or stricter" in n for n in p.not_learned)


def test_unreachable() -> None:
    p = build_profile(Observations(Transport.UDP, SERVER, local_ip="10.0.1.2", error="no UDP answer"))
    assert p.nat_type == "unknown" and p.not_learned == ("everything: no UDP answer",)
    assert p.server == "udp://203.0.113.10:3478"


def test_allocation_under_loss_seen_in_the_lab() -> None:
    """Allocation probes measured behind the lab's symmetric-seq NAT at 5 % loss, which read
    'random' before: a re-sent SYN costs the NAT a port, and a mapping of before shows up."""
    pairs = [(1, 21337), (2, 21338), (3, 21339), (4, 21344), (5, 21341), (6, 21342)]
    alone = build_profile(obs(allocation=pairs))            # one outlier: less sure
    assert (alone.allocation, alone.delta, alone.confidence["allocation"]) == \
        (Allocation.SEQUENTIAL, 1, 0.7)
    rearmed = build_profile(obs(allocation=pairs, allocation_rearms=1))   # the gap explained
    assert (rearmed.allocation, rearmed.delta, rearmed.confidence["allocation"]) == \
        (Allocation.SEQUENTIAL, 1, 0.8)
    two_gaps = [(1, 21414), (2, 21420), (3, 21416), (4, 21417), (5, 21421), (6, 21419)]
    assert build_profile(obs(allocation=two_gaps, allocation_rearms=1)).allocation \
        is Allocation.SEQUENTIAL
    outlier = [(1, 21391), (2, 21392), (3, 21393), (4, 21361), (5, 21394), (6, 21395)]
    p = build_profile(obs(allocation=outlier))
    assert (p.allocation, p.delta) == (Allocation.SEQUENTIAL, 1)
    assert p.confidence["allocation"] == 0.7
    # a random allocator is not read as a progression with one outlier
    rand = [(1, 40123), (2, 11877), (3, 52310), (4, 30001), (5, 23456), (6, 61000)]
    assert build_profile(obs(allocation=rand)).allocation is Allocation.RANDOM
