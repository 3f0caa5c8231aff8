"""The common start agreed over the offer/answer exchange (pyholepunch/offer_clock.py): NTP's
four timestamps with clocks seconds apart, both sides' rules on the same two offers, and the
answers that cannot be agreed on. Sans-IO: the clocks are numbers."""
from __future__ import annotations

import pytest

from pyholepunch import Identity, OfferError
from pyholepunch.nat.profile import NatProfile
from pyholepunch.offer import Offer, encode_offer, parse_offer
from pyholepunch.offer_clock import agree_start
from pyholepunch.security import certificate_for
from pyholepunch.strategy import Candidate

T = 1_800_000_000.0
ALICE, BOB = Identity.generate(), Identity.generate()
LEAD = 1.0


def _make(who: Identity, created: float, reply_to: Offer | None = None,
          received: float = 0.0) -> Offer:
    data = encode_offer(who, certificate_for(who), name="x", created=created,
                        start=created + LEAD, rtt=0.01, profiles=[NatProfile()],
                        candidates=[Candidate("198.51.100.4", 4000, "stun")],
                        reply_to=(reply_to.nonce, received) if reply_to else None)
    return parse_offer(data, now=created, max_ahead=60)


@pytest.mark.parametrize("skew", [-7.5, -3.0, 0.0, 0.25, 3.0, 29.0])
@pytest.mark.parametrize("there,back", [(0.05, 0.05), (0.02, 0.3), (0.4, 0.01)])
def test_both_sides_start_at_the_same_instant_whatever_the_clocks(
        skew: float, there: float, back: float) -> None:
    """Bob's clock reads ``skew`` s ahead of alice's. The offer takes ``there`` s to reach
    bob, his answer (made 0.3 s later: a STUN round trip) ``back`` s to reach alice."""
    real = T                                   # true time of alice's offer
    offer = _make(ALICE, created=real)          # alice's clock = true time
    received = real + there + skew              # bob's clock
    answer = _make(BOB, created=received + 0.3, reply_to=offer, received=received)
    entered = real + there + 0.3 + back         # alice's clock
    at_alice = agree_start(offer, answer, entered=entered)
    at_bob = agree_start(answer, offer, entered=received)
    assert (at_alice.method, at_bob.method) == ("answer", "answered")
    # Both in true time: bob's start is in his clock, alice's in hers (= true time).
    true_bob, true_alice = at_bob.start - skew, at_alice.start
    assert abs(true_alice - true_bob) <= abs(there - back) / 2 + 1e-6     # NTP's bound
    assert at_alice.offset is not None and at_alice.delay is not None
    assert abs(at_alice.offset - (skew + (there - back) / 2)) < 1e-6
    assert abs(at_alice.delay - (there + back)) < 1e-6
    if there == back:
        assert abs(true_alice - true_bob) < 1e-6
    # Bob starts lead after his answer, in his clock: alice after the same real delay.
    assert abs(at_bob.start - (received + 0.3 + LEAD)) < 1e-9
    assert "round trip" in at_alice.describe() and "we answered" in at_bob.describe()


def test_offers_made_independently_rely_on_wall_clocks_and_say_so() -> None:
    a, b = _make(ALICE, T), _make(BOB, T + 0.4)
    agreed = agree_start(a, b, entered=T + 0.5)
    assert agreed.start == agree_start(b, a, entered=T + 0.5).start == T + 0.4 + LEAD
    assert agreed.method == "wall-clocks" and agreed.offset is None
    assert "relies on both wall clocks" in agreed.describe()
    assert agreed.to_dict() == {"method": "wall-clocks", "offset_s": None, "delay_s": None}


def test_an_answer_to_another_offer_is_refused_on_both_sides() -> None:
    old, latest = _make(ALICE, T), _make(ALICE, T + 1)
    answer = _make(BOB, T + 1.5, reply_to=old, received=T + 1.2)
    with pytest.raises(OfferError, match="their offer answers another offer") as e:
        agree_start(latest, answer, entered=T + 2)        # alice
    assert e.value.field == "reply_to"
    with pytest.raises(OfferError, match="our offer answers another offer"):
        agree_start(answer, latest, entered=T + 1.2)      # bob, paired with her latest
    # Someone else's offer answered, then handed to alice: refused as well.
    carol = _make(Identity.generate(), T)
    with pytest.raises(OfferError, match="answers another offer"):
        agree_start(latest, _make(BOB, T + 1.5, reply_to=carol, received=T + 1.2),
                    entered=T + 2)
