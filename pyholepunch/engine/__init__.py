"""Engine selection: the native C engine when built, else the pure-Python twin.

``get(name)`` with ``name`` or ``$PYHOLEPUNCH_ENGINE`` = ``native`` | ``pure``. Asking for
``native`` when it is not built is an error; the implicit default falls back to ``pure``
with one logged warning.
"""
from __future__ import annotations

import logging
import os
from functools import cache

from ..address import Address
from ._base import (
    Engine,
    PunchResult,
    PunchStats,
    RawSynStats,
    RelayStats,
    SweepPair,
    sweep_pairs,
)

__all__ = [
    "Address",
    "Engine",
    "PunchResult",
    "PunchStats",
    "RawSynStats",
    "RelayStats",
    "SweepPair",
    "available",
    "get",
    "native_available",
    "sweep_pairs",
]

log = logging.getLogger(__name__)
NAMES = ("native", "pure")


def native_available() -> bool:
    try:
        from . import _native  # noqa: F401
    except ImportError:
        return False
    return True


def available() -> list[str]:
    """Engine names usable here, preferred first."""
    return [n for n in NAMES if n != "native" or native_available()]


@cache
def _load(name: str) -> Engine:
    if name == "native":
        from .native import NativeEngine

        return NativeEngine()
    from .pure import PureEngine

    return PureEngine()


_warned = False


def get(name: str | None = None) -> Engine:
    """Return the engine called ``name`` (or chosen by $PYHOLEPUNCH_ENGINE, or the best)."""
    global _warned
    chosen = name or os.environ.get("PYHOLEPUNCH_ENGINE") or None
    if chosen is not None:
        if chosen not in NAMES:
            raise ValueError(f"unknown engine {chosen!r}; choose one of {', '.join(NAMES)}")
        if chosen == "native" and not native_available():
            raise ImportError(
                "the native engine is not built (reinstall with a C compiler and Cython, "
                "without PYHOLEPUNCH_PUREPYTHON)"
            )
        return _load(chosen)
    if native_available():
        return _load("native")
    if not _warned:
        _warned = True
        log.warning("native engine not built; using the pure-Python engine")
    return _load("pure")
