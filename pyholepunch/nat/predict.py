"""Port prediction: where will this NAT map our next connection? (pure, no I/O)

Input: the NAT's profile and fresh observations — the external ports of our most recent
mappings, oldest first, optionally with the (monotonic) time each was seen. Output: candidate
external ports, most likely first, and the window they span; the sweep step (strategy) aims
its SYNs at them. Other hosts behind the same NAT consume ports too: with timestamps the
predictor measures that background rate and shifts the window by what it expects to have
been used up by ``at``.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from .profile import Allocation, Mapping, NatProfile

PORT_MIN, PORT_MAX = 1024, 65535
MAX_WINDOW = 4096


@dataclass(frozen=True, slots=True)
class PortPrediction:
    ports: tuple[int, ...]          # candidates, most likely first ((): cannot predict)
    method: str                     # "exact" | "preserving" | "sequential" | "random" | "unknown"
    delta: int | None = None
    base: int | None = None         # the last observed external port
    skip: int = 0                   # allocations expected to be taken by others before ours
    confidence: float = 0.0
    reason: str = ""

    @property
    def window(self) -> int:
        return len(self.ports)


Observation = int | tuple[float, int]


def _split(recent: Sequence[Observation]) -> tuple[list[float] | None, list[int]]:
    times: list[float] = []
    ports: list[int] = []
    for item in recent:
        if isinstance(item, tuple):
            t, p = item
            times.append(float(t))
            ports.append(int(p))
        else:
            ports.append(int(item))
    for p in ports:
        if not 1 <= p <= 65535:
            raise ValueError(f"observed port {p} is out of range 1..65535")
    if times and len(times) != len(ports):
        raise ValueError("give either all observations with times or none")
    return (times or None), ports


def _wrap(port: int) -> int:
    span = PORT_MAX - PORT_MIN + 1
    return PORT_MIN + (port - PORT_MIN) % span


def _signed(d: int) -> int:
    return (d + 32768) % 65536 - 32768


def observed_delta(ports: Sequence[int]) -> tuple[int | None, float]:
    """The common step between consecutive observed ports, and the share of steps that agree."""
    if len(ports) < 2:
        return None, 0.0
    steps = [_signed(b - a) for a, b in zip(ports, ports[1:], strict=False)]
    delta, count = Counter(steps).most_common(1)[0]
    return (delta if delta != 0 else None), count / len(steps)


def predict_ports(profile: NatProfile, recent: Sequence[Observation], *, window: int = 16,
                  local_port: int | None = None, at: float | None = None) -> PortPrediction:
    """Predict the external port of our *next* new mapping.

    ``recent``: external ports of our latest mappings (oldest first), or ``(time, port)``.
    ``window``: how many candidates to return. ``local_port``: the local port we will use
    (decides the answer for preserving NATs). ``at``: when the mapping will be made (same
    clock as the observation times), to account for ports others take meanwhile.
    """
    if not 1 <= window <= MAX_WINDOW:
        raise ValueError(f"window must be in 1..{MAX_WINDOW}, got {window}")
    times, ports = _split(recent)
    if profile.mapping is Mapping.NONE:
        if local_port is None:
            return PortPrediction((), "exact", reason="no NAT: the external port is the local port")
        return PortPrediction((local_port,), "exact", confidence=1.0, reason="no NAT")
    if profile.allocation is Allocation.PRESERVING and local_port is not None:
        # a collision makes a preserving NAT pick a nearby port: the window spreads around it
        around = [local_port] + [_wrap(local_port + s * k) for k in range(1, window) for s in (1, -1)]
        return PortPrediction(tuple(dict.fromkeys(around))[:window], "preserving",
                              confidence=profile.confidence.get("allocation", 0.8))
    if profile.allocation is Allocation.RANDOM:
        return PortPrediction((), "random", reason="random allocation: use a birthday sweep")
    seen_delta, agree = observed_delta(ports)
    if profile.allocation is Allocation.SEQUENTIAL:
        # with timestamps the profile's own delta plus a measured background rate is the
        # better model; without them the observed step already includes the background
        use_seen = seen_delta is not None and agree >= 0.5 and not (times and profile.delta)
        delta = seen_delta if use_seen else profile.delta
        confidence = profile.confidence.get("allocation", 0.8)
    elif seen_delta is not None and len(ports) >= 3 and agree >= 0.6:
        delta, confidence = seen_delta, 0.5 * agree    # learned from the observations alone
    else:
        return PortPrediction((), "unknown", reason="allocation unknown and observations inconclusive")
    if not delta:
        return PortPrediction((), "unknown", reason="no allocation delta known")
    if not ports:
        return PortPrediction((), "sequential", delta=delta, reason="no recent mapping observed")
    base = ports[-1]
    skip = 0
    if times and len(times) >= 2 and at is not None and times[-1] > times[0]:
        advance = _signed(ports[-1] - ports[0])
        own = delta * (len(ports) - 1)
        background = max(0.0, (advance - own) / delta) / (times[-1] - times[0])  # allocations/s
        skip = max(0, round(background * max(0.0, at - times[-1])))
    first = base + delta * (1 + skip)
    cands = tuple(_wrap(first + delta * k) for k in range(window))
    return PortPrediction(cands, "sequential", delta=delta, base=base, skip=skip,
                          confidence=round(confidence, 2))
