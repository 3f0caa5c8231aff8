"""The session plan the server hands out in both PUNCHes (strategy.plan_race), with each
peer's profiles and candidates parsed once rather than at every CONNECT that names them."""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import msgpack  # type: ignore[import-untyped]

from .. import strategy
from ..nat.profile import NatProfile

log = logging.getLogger(__name__)
PARSE_CACHE = 8192        # profiles and candidate lists remembered parsed (make_plan)
_parse_cache: dict[Any, Any] = {}


def make_plan(initiator: list[dict[str, Any]], responder: list[dict[str, Any]],
              initiator_candidates: list[list[Any]] | None = None,
              responder_candidates: list[list[Any]] | None = None, *,
              rtt: float = 0.1) -> dict[str, Any] | None:
    """The session's plan (strategy.plan_race: a lane per common address family, raced)."""
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


def _parsed(value: Any, parse: Callable[[Any], Any]) -> Any:
    """``parse(value)``, remembered: the same peer's profile and candidates are parsed once,
    not at every CONNECT that names it (bounded: PARSE_CACHE entries, then forgotten)."""
    try:    # msgpack keeps the types apart (True, 1 and 1.0 encode differently)
        key = (parse, msgpack.packb(value, use_bin_type=True))
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
