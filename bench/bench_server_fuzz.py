"""Fuzz a running rendezvous server (its own process) with signaling frames over real TLS and
STUN datagrams over UDP: no traceback, no crash, RSS bounded.

Signaling: connections from many loopback source addresses. Most register, then send
FRAMES_PER_CONNECTION - 1 well-formed but adversarial frames that reach the handlers of a
registered peer (CONNECT to anyone with odd candidates and profiles, UPDATE with random
certificates, RELAY and RESULT for sessions that are not theirs, pongs echoing nothing...)
and end with one structurally broken frame (bit flips, truncation, junk, a lying length
prefix, a map of the right type with fields of every wrong shape: huge ints, NaN, nested
lists, names with newlines, 40 kB certificates...), which the server answers by closing the
connection; the rest send broken frames before registering. The count reported is the
server's own (frames it decoded or refused), not what the clients wrote. STUN: binding
requests mutated the same way, sent paced over UDP; the server counts what it received.

Knobs: PYHOLEPUNCH_BENCH_FUZZ_FRAMES (default 1,000,000), PYHOLEPUNCH_BENCH_FUZZ_DATAGRAMS
(default 1,000,000). Results in bench/results/report.json, group "server_fuzz".
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import struct
import time
from pathlib import Path
from typing import Any

import msgpack  # type: ignore[import-untyped]
import pytest

from pyholepunch.signal.protocol import (
    HEADER,
    Connect,
    Message,
    Ping,
    Pong,
    Relay,
    Result,
    Update,
)
from pyholepunch.stun.codec import binding_request
from tests.aio.attack_tools import RawPeer, server_process, source

FRAMES = int(os.environ.get("PYHOLEPUNCH_BENCH_FUZZ_FRAMES", "1000000"))
DATAGRAMS = int(os.environ.get("PYHOLEPUNCH_BENCH_FUZZ_DATAGRAMS", "1000000"))
FRAMES_PER_CONNECTION = 90       # under the per-peer burst of 100 messages
CONCURRENCY = 24
pytestmark = pytest.mark.timeout(3600)   # full size takes minutes
GROUP = "server_fuzz"

WEIRD: list[Any] = [None, True, -1, 0, 2**63, -(2**63), 2**64 - 1, 1e308, float("nan"),
                    float("inf"), "", "bob\n", "x" * 5000, "hp1.\u00b2.x", b"", b"\x00" * 40000,
                    [], [[]] * 50, {}, {"a": {"b": {"c": [1, [2, [3]]]}}}, ["10.0.0.1", 70000],
                    [["224.0.0.1", 1]], [["127.0.0.1", 22]] * 40, [["::", 1]], "a" * 32]
TYPES = ["hello", "register", "registered", "ping", "pong", "update", "connect", "punch",
         "result", "relay", "relay_grant", "error", "nope"]


def _valid(rng: random.Random) -> Message:
    sid = os.urandom(8).hex()
    return rng.choice([
        Ping(t1=time.time()), Pong(t1=time.time(), t2=time.time(), t3=time.time()),
        Connect(session=sid, target=rng.choice(["fuzz-0", "nobody", "a" * 32])),
        Update(candidates=[("198.51.100.7", 4000)], profiles=[{"transport": "tcp"}]),
        Relay(session=sid), Relay(session=sid, relayed=("203.0.113.9", 5000)),
        Result(session=sid, outcome="failed", reason="fuzz"),
    ])


def fuzz_body(rng: random.Random) -> bytes:
    op = rng.random()
    if op < 0.35:                  # a map of the right shape, fields of the wrong one
        body: dict[str, Any] = {"t": rng.choice(TYPES)}
        for key in rng.sample(["session", "target", "candidates", "profiles", "cert", "t1",
                               "t2", "t3", "outcome", "stats", "reason", "relayed", "name",
                               "token", "public_key", "signature", "challenge", "code"],
                              rng.randint(0, 6)):
            body[key] = rng.choice(WEIRD)
        try:
            return bytes(msgpack.packb(body, use_bin_type=True))
        except (OverflowError, ValueError):
            return b"\xc1"
    valid = bytearray(msgpack.packb(_valid(rng).to_wire(), use_bin_type=True))
    if op < 0.55:
        return bytes(valid)
    if op < 0.8:                   # bit flips
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(valid))
            valid[i] ^= 1 << rng.randrange(8)
        return bytes(valid)
    if op < 0.9:
        return bytes(valid[:rng.randrange(len(valid))])
    return os.urandom(rng.randint(0, 300))


def _addr(rng: random.Random) -> tuple[str, int]:
    return (rng.choice(["198.51.100.", "203.0.113.", "10.1.1.", "192.168.0."]) + str(rng.randint(1, 254)),
            rng.randint(1, 65535))


def semantic_frame(rng: random.Random, names: int) -> bytes:
    """Well-formed, adversarial: parses, then has to be judged by the handlers."""
    sid = os.urandom(rng.randint(4, 8)).hex()
    target = rng.choice([f"fuzz-{rng.randrange(max(names, 1))}", "nobody", "a" * 32, "b" * 32])
    profiles = [{"transport": rng.choice(["tcp", "udp", "sctp"]),
                 rng.choice(["nat_type", "mapping", "x"]): rng.choice(WEIRD[:11] + ["open"])}
                for _ in range(rng.randint(0, 3))]
    msg: Message = rng.choice([
        lambda: Connect(session=sid, target=target, profiles=profiles,
                        candidates=[_addr(rng) for _ in range(rng.randint(0, 8))]),
        lambda: Update(candidates=[_addr(rng) for _ in range(rng.randint(0, 4))],
                       profiles=profiles, cert=os.urandom(rng.randint(1, 4096))),
        lambda: Relay(session=sid), lambda: Relay(session=sid, relayed=_addr(rng)),
        lambda: Result(session=sid, outcome=rng.choice(["direct", "relay", "failed"]),
                       stats={"x": rng.random()}, reason="r" * rng.randint(0, 1024)),
        lambda: Ping(t1=rng.uniform(-1e12, 1e12)),
        lambda: Pong(t1=rng.uniform(0, 2e9), t2=rng.uniform(-1e12, 1e12), t3=rng.random()),
    ])()
    body = msgpack.packb(msg.to_wire(), use_bin_type=True)
    return HEADER.pack(len(body)) + body


def fuzz_frame(rng: random.Random) -> bytes:
    body = fuzz_body(rng)
    if rng.random() < 0.03:        # a lying length prefix
        return HEADER.pack(rng.choice([0, 1, 65537, 2**32 - 1, len(body) + 7])) + body
    return HEADER.pack(len(body)) + body


async def _one_connection(srv: Any, rng: random.Random, i: int, stats: dict[str, int]) -> None:
    peer = RawPeer(srv.address, srv.fingerprint, f"fuzz-{i}", bind=source(i % 120))
    try:
        registered = i % 8 != 0
        if registered:
            answer = await peer.register(timeout=10)
            registered = type(answer).__name__ == "Registered"
            stats["registered"] += registered
        else:
            await peer.open()
        assert peer.writer is not None and peer.reader is not None
        if registered:
            for _ in range(FRAMES_PER_CONNECTION - 1):
                peer.writer.write(semantic_frame(rng, i))
                stats["written"] += 1
                if rng.random() < 0.1:
                    await asyncio.sleep(0)
            # The server drops what arrived in the same read as a broken frame (by design):
            # let the handlers see these first.
            await peer.writer.drain()
            await asyncio.sleep(0.05)
        peer.writer.write(fuzz_frame(rng))
        peer.writer.write(HEADER.pack(2**31))     # sure to end it: a frame over any limit
        stats["written"] += 1
        await peer.writer.drain()
        await asyncio.wait_for(peer.reader.read(), 10)       # until the server closes
    except (OSError, TimeoutError, ValueError, EOFError, AssertionError):
        stats["reset"] += 1    # the server closed with our frames unread: expected
    finally:
        await peer.close(abort=True)


async def _signaling(srv: Any, frames: int) -> dict[str, Any]:
    rng = random.Random(11)
    stats = {"written": 0, "connections": 0, "registered": 0, "reset": 0}
    sem = asyncio.Semaphore(CONCURRENCY)
    started = time.monotonic()

    async def run(i: int) -> None:
        async with sem:
            await _one_connection(srv, rng, i, stats)

    i, running = 0, set()
    while stats["written"] < frames:
        task = asyncio.ensure_future(run(i))
        running.add(task)
        task.add_done_callback(running.discard)
        i += 1
        stats["connections"] = i
        if len(running) >= CONCURRENCY:
            await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
    await asyncio.gather(*running)
    return {**stats, "seconds": round(time.monotonic() - started, 1)}


def _stun(srv: Any, datagrams: int) -> dict[str, Any]:
    rng = random.Random(12)
    base = binding_request(os.urandom(12)).encode()
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(8)]
    for k, s in enumerate(socks):
        s.bind((source(k), 0))
        s.setblocking(False)
    replies, sent, started = 0, 0, time.monotonic()
    while sent < datagrams:
        # Paced by the server's own count: a burst smaller than a socket buffer, then wait
        # until the server has read it (its count reaches ours or stops moving).
        seen, deadline = -1, time.monotonic() + 5
        while time.monotonic() < deadline:
            now_seen = srv.metrics()["stun"]["udp_in"]
            if now_seen >= sent or now_seen == seen:
                break
            seen = now_seen
            time.sleep(0.002)
        for _ in range(150):
            data = bytearray(base)
            op = rng.random()
            if op < 0.5:
                for _ in range(rng.randint(1, 6)):
                    j = rng.randrange(len(data))
                    data[j] ^= 1 << rng.randrange(8)
            elif op < 0.7:
                data += struct.pack("!HH", rng.randrange(65536), 4) + os.urandom(4)
                data[2:4] = struct.pack("!H", len(data) - 20)
            elif op < 0.85:
                data = data[:rng.randrange(len(data))]
            else:
                data = bytearray(os.urandom(rng.randint(0, 600)))
            try:
                socks[sent % len(socks)].sendto(bytes(data), srv.address)
            except OSError:
                pass
            sent += 1
        for s in socks:
            while True:
                try:
                    s.recv(2048)
                    replies += 1
                except OSError:
                    break
    for s in socks:
        s.close()
    return {"datagrams": sent, "replies": replies, "seconds": round(time.monotonic() - started, 1)}


async def _fuzz(tmp: Path) -> dict[str, Any]:
    with server_process(tmp) as srv:
        await asyncio.sleep(0.5)
        idle = srv.rss_mb()
        signaling = await _signaling(srv, FRAMES)
        await asyncio.sleep(3.0)
        rss_signaling = srv.rss_mb()
        stun = await asyncio.to_thread(_stun, srv, DATAGRAMS)
        await asyncio.sleep(3.0)
        alive = srv.proc is not None and srv.proc.poll() is None
        rss_end = srv.rss_mb() if alive else -1.0
        counters = srv.metrics() if alive else {}
        log = srv.log()
    sig = counters.get("signal", {})
    signaling["server_frames_in"] = sig.get("frames_in")
    signaling["server_refusals"] = sig.get("refused")
    stun["server_udp_in"] = counters.get("stun", {}).get("udp_in")
    stun["server_errors"] = counters.get("stun", {}).get("errors")
    tracebacks = log.count("Traceback")
    return {"signaling": signaling, "stun": stun, "server_alive": alive,
            "tracebacks": tracebacks, "internal_errors": log.count("internal error"),
            "idle_rss_mb": round(idle, 1), "rss_after_signaling_mb": round(rss_signaling, 1),
            "rss_end_mb": round(rss_end, 1), "log_tail": log[-400:] if tracebacks else ""}


def test_fuzz_server(benchmark: Any, bench_report: Any, tmp_path: Path) -> None:
    result = benchmark.pedantic(lambda: asyncio.run(_fuzz(tmp_path)), rounds=1, iterations=1)
    bench_report.record(GROUP, "fuzz", **result)
    print(json.dumps(result, indent=1))  # noqa: T201
    assert result["server_alive"] and result["tracebacks"] == 0
    assert result["rss_end_mb"] <= 3 * result["idle_rss_mb"]
