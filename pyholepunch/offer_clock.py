"""The common start of a ``Punch`` session, agreed without trusting two wall clocks (sans-IO).

An offer proposes a start in its sender's clock. Two clocks may disagree by seconds, which
would start one side's punch seconds before the other's. So the start is agreed over the
offer/answer exchange itself, NTP's four timestamps with no extra message:

    t1  the offerer creates its offer                     (offerer's clock: offer.created)
    t2  the app hands that offer to the answerer          (answerer's clock: answer.received)
    t3  the answerer creates its answer                   (answerer's clock: answer.created)
    t4  the app hands the answer to the offerer           (offerer's clock: connect() entry)

    offset = ((t2 - t1) + (t3 - t4)) / 2      the answerer's clock minus the offerer's
    delay  = (t4 - t1) - (t3 - t2)             the channel's round trip

The start is the answerer's proposed one: the answerer uses it as is, the offerer converts
it into its own clock (``start - offset``). The error is at most half the difference between
the two directions' delivery times (NTP's bound), whatever the clocks say. Both sides apply
the same rules to the same two signed offers, so they agree — also on refusing:

- an answer that answers another offer than the one it is paired with (an older offer of
  ours, a third party's) is refused with OfferError (field ``reply_to``): its start would be
  in a clock we have no timestamps for, and its sender would use it regardless;
- two offers made independently (neither answers the other) keep the earlier rule: the later
  of the two proposed starts, which is right only as far as both clocks agree (NTP-synced
  hosts: tens of ms). The agreement says so (``method="wall-clocks"``), and the session
  logs it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import OfferError
from .offer import Offer


@dataclass(frozen=True)
class StartAgreement:
    """The common start in our clock, and how it was agreed (for the report and the log)."""

    start: float
    method: str                    # "answer" (we offered) | "answered" | "wall-clocks"
    offset: float | None = None    # the answerer's clock minus ours (s), as measured
    delay: float | None = None     # the exchange's round trip (s), as measured

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "offset_s": self.offset, "delay_s": self.delay}

    def describe(self) -> str:
        if self.method == "answer":
            return (f"the answerer's start, its clock {self.offset:+.3f} s from ours "
                    f"(measured over the offer/answer, round trip {self.delay:.3f} s)")
        if self.method == "answered":
            return "our own start (we answered their offer: they measured our clock)"
        return ("the later of the two proposed starts: it relies on both wall clocks agreeing "
                "(neither offer answers the other; offer(reply_to=theirs) measures the offset)")


def agree_start(mine: Offer, theirs: Offer, *, entered: float) -> StartAgreement:
    """The common start for the session of ``mine`` and ``theirs`` in our clock; ``entered``:
    when the app handed us ``theirs`` (our clock: t4 when it answers ours)."""
    for offer, other, whose in ((mine, theirs, "our offer"), (theirs, mine, "their offer")):
        if offer.reply_to is not None and offer.reply_to != other.nonce:
            raise OfferError(f"{whose} answers another offer than the one it is paired with "
                             "(an older offer, or someone else's): its start cannot be agreed",
                             field="reply_to")
    if theirs.reply_to is not None:
        assert theirs.received is not None       # parse_offer: reply_to comes with received
        t1, t2, t3, t4 = mine.created, theirs.received, theirs.created, entered
        offset = ((t2 - t1) + (t3 - t4)) / 2
        delay = (t4 - t1) - (t3 - t2)
        return StartAgreement(theirs.start - offset, "answer", offset, delay)
    if mine.reply_to is not None:
        return StartAgreement(mine.start, "answered")
    return StartAgreement(max(mine.start, theirs.start), "wall-clocks")
