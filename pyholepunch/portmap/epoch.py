"""Did the router lose its mappings? The epoch rule of RFC 6887 §8.5 (NAT-PMP's epoch of
RFC 6886 §3.6 means the same and gets the same test).

A PCP/NAT-PMP server reports its epoch (seconds since its mapping state began) in every
response. Between two responses the server's clock and ours must advance alike (within 2 s
plus 1/16 drift); an epoch that went back, or moved differently, means a reboot or lost
state: every mapping must be made again.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EpochSample:
    client_time: float          # our monotonic clock when the response arrived (s)
    server_epoch: int           # the epoch the response carried (s)


def epoch_lost(prev: EpochSample | None, now: EpochSample) -> bool:
    """True when ``now`` shows the server lost its state since ``prev`` (None: first sample)."""
    if prev is None:
        return False
    if now.server_epoch + 1 < prev.server_epoch:
        return True
    client_delta = now.client_time - prev.client_time
    server_delta = now.server_epoch - prev.server_epoch
    return (client_delta + 2 < server_delta - server_delta / 16
            or server_delta + 2 < client_delta - client_delta / 16)
