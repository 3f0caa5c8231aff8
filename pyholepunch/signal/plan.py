"""The session plan the server hands out in both PUNCHes (strategy.plan_race), remembered.

The plan is a pure function of less than a CONNECT carries: of each side's profiles minus
what the planner never reads (PLAN_IGNORES; the public addresses count only as "do the two
IPv4 TCP profiles share one", the planner's LAN rule), of the families each side has a
public candidate in (plan_race reads candidates for nothing else) and of the RTT. The RTT
is rounded up to a bucket (``rtt_bucket``: 0.5 ms steps, 1/16 of an octave above 16 ms)
and the plan is built FOR the bucket, so a remembered plan and a fresh one are the same
plan, and budgets err on the long side by at most that step. Planning was half of a
CONNECT's CPU; now a few dictionary look-ups are.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

from .. import strategy
from ..nat.profile import NatProfile
from ..strategy.candidates import FAMILIES, PUBLIC_ORIGINS
from .fields import pack

log = logging.getLogger(__name__)
PLAN_CACHE = 8192         # plans remembered (then all forgotten at once: bounded, no LRU cost)
PARSE_CACHE = 8192        # profiles and candidate lists remembered parsed (cache misses)
# Profile keys the planner never reads: out of the cache key, so peers that differ only in
# them (their own addresses, above all) share plans. public_ips: the sameness bit instead.
PLAN_IGNORES = frozenset({"public_ips", "local_ips", "confidence", "not_learned", "server",
                          "nat_type", "label"})
RTT_FINE = 0.0005         # s: the bucket step below RTT_COARSE
RTT_COARSE = 0.016        # s: above it, 16 buckets per octave (at most +6.25 %)
MAX_PLANNED_RTT = 10.0    # s: strategy.plan's bound (a bucket never pushes an RTT past it)
NO_CANDIDATES = frozenset({"none announced"})   # plan_race reads these as IPv4-only
_plans: dict[Any, dict[str, Any]] = {}
_parse_cache: dict[Any, Any] = {}


def rtt_bucket(rtt: float) -> float:
    """``rtt`` rounded up to its bucket (the plan's budgets grow with it: never shorter)."""
    if not (isinstance(rtt, (int, float)) and math.isfinite(rtt)) or rtt <= 0:
        return rtt      # the planner judges it (ValueError for nonsense)
    if rtt <= RTT_COARSE:
        bucket = math.ceil(rtt / RTT_FINE - 1e-9) * RTT_FINE
    else:
        mantissa, exponent = math.frexp(rtt)
        bucket = math.ldexp(math.ceil(mantissa * 32 - 1e-9) / 32, exponent)
    return bucket if bucket <= MAX_PLANNED_RTT else rtt


def make_plan(initiator: list[dict[str, Any]], responder: list[dict[str, Any]],
              initiator_candidates: list[list[Any]] | None = None,
              responder_candidates: list[list[Any]] | None = None, *,
              rtt: float = 0.1) -> dict[str, Any] | None:
    """The session's plan (strategy.plan_race: a lane per common address family, raced),
    None if it cannot be built. The dict is shared by every session with the same key: it
    is only ever encoded, never changed. Candidates are checked lists (check_candidates);
    a plan that fails is not remembered (it is planned, and warned about, each time)."""
    rtt = rtt_bucket(rtt)
    key = _key(initiator, responder, initiator_candidates or [], responder_candidates or [], rtt)
    if key is None:                      # not a shape the key understands: plan it afresh
        return _build(initiator, responder, initiator_candidates, responder_candidates, rtt)
    try:
        return _plans[key]
    except KeyError:
        pass
    plan = _build(initiator, responder, initiator_candidates, responder_candidates, rtt)
    if plan is not None:
        if len(_plans) >= PLAN_CACHE:
            _plans.clear()
        _plans[key] = plan
    return plan


def _build(initiator: list[dict[str, Any]], responder: list[dict[str, Any]],
           initiator_candidates: list[list[Any]] | None,
           responder_candidates: list[list[Any]] | None, rtt: float) -> dict[str, Any] | None:
    try:
        result: dict[str, Any] = strategy.plan_race(
            [_parsed(p, NatProfile.from_dict) for p in initiator],
            [_parsed(p, NatProfile.from_dict) for p in responder],
            _parsed(initiator_candidates or [], _candidates_of),
            _parsed(responder_candidates or [], _candidates_of), rtt=rtt).to_dict()
        return result
    except Exception:
        log.warning("strategy.plan failed; sending no plan", exc_info=True)
        return None


def _key(initiator: Sequence[Any], responder: Sequence[Any], ic: Sequence[Any],
         rc: Sequence[Any], rtt: float) -> tuple[Any, ...] | None:
    """What the plan depends on, hashable; None when an input is not the checked wire form
    (the caller then plans without the cache)."""
    try:
        fam_i, fam_r = _families(ic), _families(rc)
        if fam_i is None or fam_r is None:
            return None
        # msgpack keeps the types apart (True, 1 and 1.0 encode differently)
        stripped = pack([[{k: v for k, v in p.items() if k not in PLAN_IGNORES}
                          for p in side] for side in (initiator, responder)])
        same = bool(_tcp4_ips(initiator) & _tcp4_ips(responder))
    except (AttributeError, TypeError, ValueError, OverflowError):
        return None
    return stripped, same, fam_i, fam_r, rtt


def _tcp4_ips(profiles: Sequence[dict[str, Any]]) -> set[str]:
    """The public addresses of the first IPv4 TCP profile (strategy.race.tcp_profile's
    pick), as NatProfile.from_dict reads them."""
    for p in profiles:
        if p.get("transport", "tcp") == "tcp" and p.get("family", "ipv4") == "ipv4":
            return {str(x) for x in p.get("public_ips", ())}
    return set()


def _families(candidates: Sequence[Any]) -> frozenset[str] | None:
    """The families with a public candidate (strategy.candidates.families) of a CHECKED
    candidate list ([ip, port, family, iface, origin], family already matched to ip);
    None for anything else."""
    if not candidates:
        return NO_CANDIDATES
    out = set()
    for c in candidates:
        if type(c) is not list or len(c) != 5 or c[2] not in FAMILIES:
            return None
        if c[4] in PUBLIC_ORIGINS:
            out.add(c[2])
    return frozenset(out)


def _parsed(value: Any, parse: Callable[[Any], Any]) -> Any:
    """``parse(value)``, remembered: the same peer's profile and candidates are parsed once,
    not at every plan that names them (bounded: PARSE_CACHE entries, then forgotten)."""
    try:    # msgpack keeps the types apart (True, 1 and 1.0 encode differently)
        key = (parse, pack(value))
    except (TypeError, ValueError, OverflowError):
        return parse(value)
    known = _parse_cache.get(key)
    if known is None:
        known = parse(value)
        if len(_parse_cache) >= PARSE_CACHE:
            _parse_cache.clear()
        _parse_cache[key] = known
    return known


def _candidates_of(value: list[list[Any]]) -> tuple[strategy.Candidate, ...]:
    return tuple(strategy.parse_candidates(value))
