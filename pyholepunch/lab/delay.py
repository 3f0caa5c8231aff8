"""The lab's link delay: a user-space NFQUEUE delayer run inside the core router namespace.

This kernel has no sch_netem, so the core's FORWARD chain sends every packet to NFQUEUE
(``iptables -t mangle -A FORWARD -j NFQUEUE --queue-bypass``) and this process accepts each
one when its due time comes: one-way delay = rtt_ms/2 ± uniform jitter_ms (as netem's `delay D J`),
since every host-to-host path crosses the core exactly once per direction. Packets wait in a
heap ordered by due time (jitter may reorder them, as it does on real links).

Run as ``python -m pyholepunch.lab.delay --delay-ms D [--jitter-ms J]`` inside the namespace
(the Lab does this); it prints ``ready`` once bound and runs until SIGTERM.
"""
from __future__ import annotations

import argparse
import heapq
import random
import select
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

QUEUE_MAX_LEN = 65536          # punch sweeps burst thousands of SYNs; never drop for lack of room
SOCK_RCVBUF = 16 * 1024 * 1024


@dataclass
class DelaySchedule:
    """Sans-IO core: due times for packets, in arrival order, from an injected clock value."""

    delay_s: float
    jitter_s: float = 0.0
    rng: random.Random = field(default_factory=random.Random)
    _heap: list[tuple[float, int, Any]] = field(default_factory=list)
    _seq: int = 0

    def __post_init__(self) -> None:
        if self.delay_s < 0 or self.jitter_s < 0:
            raise ValueError(f"delay and jitter must be >= 0, got {self.delay_s}, {self.jitter_s}")

    def push(self, item: Any, now: float) -> float:
        d = self.delay_s
        if self.jitter_s:
            d = max(0.0, d + self.rng.uniform(-self.jitter_s, self.jitter_s))
        due = now + d
        heapq.heappush(self._heap, (due, self._seq, item))
        self._seq += 1
        return due

    def pop_due(self, now: float) -> list[Any]:
        out = []
        while self._heap and self._heap[0][0] <= now:
            out.append(heapq.heappop(self._heap)[2])
        return out

    def next_due(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def __len__(self) -> int:
        return len(self._heap)


def run(queue_num: int, delay_s: float, jitter_s: float) -> None:
    from netfilterqueue import COPY_META, NetfilterQueue

    sched = DelaySchedule(delay_s, jitter_s)
    stop = False

    def on_term(signum: int, frame: Any) -> None:
        nonlocal stop
        stop = True

    def on_packet(pkt: Any) -> None:
        sched.push(pkt, time.monotonic())

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    nfq = NetfilterQueue()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # rcvbuf capped by rmem_max: fine
        nfq.bind(queue_num, on_packet,
                 max_len=QUEUE_MAX_LEN, mode=COPY_META, range=0, sock_len=SOCK_RCVBUF)
    fd = nfq.get_fd()
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    try:
        while not stop:
            due = sched.next_due()
            timeout = 0.5 if due is None else max(0.0, due - time.monotonic())
            try:
                readable, _, _ = select.select([fd], [], [], timeout)
            except InterruptedError:
                continue
            if readable:
                nfq.run(block=False)
            for pkt in sched.pop_due(time.monotonic()):
                pkt.accept()
    finally:
        for pkt in sched.pop_due(float("inf")):  # let in-flight packets go rather than drop them
            pkt.accept()
        nfq.unbind()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pyholepunch.lab.delay", description=__doc__.splitlines()[0])
    p.add_argument("--queue", type=int, default=0)
    p.add_argument("--delay-ms", type=float, required=True, help="one-way delay per crossing")
    p.add_argument("--jitter-ms", type=float, default=0.0,
                   help="uniform spread: each crossing takes delay ± jitter")
    args = p.parse_args(argv)
    run(args.queue, args.delay_ms / 1000.0, args.jitter_ms / 1000.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
