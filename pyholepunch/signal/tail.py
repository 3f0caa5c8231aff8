"""A frame of its own behind a PUNCH or RELAY_GRANT on a lossy path (#19).

If the push's segment is lost, the peer's kernel acknowledges the next segment selectively,
and the server's TCP (RACK) sends the lost one again a round trip later, not after its RTO
(>= 0.25 s, doubling): a PUNCH that arrived 0.3-1.2 s late cost the punch its window. The
frame is an unsolicited PONG, which a client takes as a heartbeat and answers with nothing.
Only on a path that has lost a segment of ours or whose round trips spread: a clean one
(a rendezvous at volume) pays no extra frame.
"""
from __future__ import annotations

import socket
import struct
from typing import Any

TAIL_DELAY = 0.01        # s after the push: a segment of its own
LOSSY_SPREAD = 0.02      # s of round-trip spread that counts as a lossy or jittery path
_TOTAL_RETRANS = 100     # offset of tcpi_total_retrans in struct tcp_info (Linux)


def lossy(transport: Any, spread: float) -> bool:
    """Has the connection under ``transport`` re-sent a segment, or jittered ``spread`` s?"""
    if spread >= LOSSY_SPREAD:
        return True
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or not hasattr(socket, "TCP_INFO"):
        return False
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TOTAL_RETRANS + 4)
        return bool(struct.unpack_from("=I", info, _TOTAL_RETRANS)[0])
    except (OSError, struct.error):
        return False
