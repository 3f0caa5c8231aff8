"""Plumbing the whole-peer lab tests share (test_peer_timing, test_peer_faults,
bench/bench_punch.py): each peer runs as its own process in its node (this file run as a
script with a JSON job), so a peer can be killed like a real one, and writes what happened
(reports, errors, data exchanged) as JSON.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pyholepunch._process import OutputLines

ROOT = Path(__file__).resolve().parents[2]
SERVER_PORT = 3478


@dataclass
class PeerJob:
    """What one peer process does (serialised as JSON onto its command line)."""

    server: str
    fingerprint: str
    name: str
    config_dir: str
    result_file: str
    role: str = "accept"                 # "accept" | "connect"
    target: str = ""                     # connect: the peer's name
    sessions: int = 1                    # connect: how many connects; accept: at most this many
    engine: str | None = None
    skew: float = 0.0                    # seconds added to this peer's clock
    keepalive: dict[str, Any] | None = field(default_factory=lambda: {})   # {} = the default
    ready_file: str = ""                 # touched once registered
    go_file: str = ""                    # connect: wait for this file first (the peer's ready)
    first_wait: float = 0.0              # connect: then this long (its announcement may still
                                         # be on its way to the server: see test_peer_faults)
    stop_file: str = ""                  # accept: stop once it exists
    timeout: float = 15.0                # connect(timeout=...)
    pause: float = 1.0                   # connect: seconds between sessions
    idle: float = 0.0                    # > 0: stay idle this long, then a->b, then b->a
    die_on_punch: float | None = None    # accept: SIGKILL ourselves this long after start_at
                                         # (negative: at once, on receiving PUNCH)
    upgrade_file: str = ""               # connect: a relayed connection writes
                                         # <upgrade_file>.relayed, waits for upgrade_file,
                                         # then calls Connection.upgrade()
    deadline: float = 60.0               # the whole process, seconds
    log_file: str = ""                   # its stderr (set by run_peers)


def _error(exc: BaseException) -> dict[str, Any]:
    return {"type": type(exc).__name__, "mro": [c.__name__ for c in type(exc).__mro__],
            "message": str(exc)}


async def _exchange(conn: Any, job: PeerJob) -> dict[str, Any]:
    """After ``idle`` s of silence: initiator -> responder, then responder -> initiator."""
    out: dict[str, Any] = {"a_to_b": False, "b_to_a": False}
    try:
        if job.role == "connect":
            await asyncio.sleep(job.idle)
            await conn.send(b"ping from a\n")
            out["a_to_b"] = None                          # only the responder can tell
            got = await asyncio.wait_for(conn.reader.readline(), 5.0)
            out["b_to_a"] = got == b"pong from b\n"
        else:
            got = await asyncio.wait_for(conn.reader.readline(), job.idle + 6.0)
            out["a_to_b"] = got == b"ping from a\n"
            await conn.send(b"pong from b\n")
            out["b_to_a"] = None
            await asyncio.wait_for(conn.reader.read(1), 6.0)   # until a has read and closed
    except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
        out["error"] = _error(exc)
    return out


async def _serve_job(job: PeerJob) -> dict[str, Any]:
    from pyholepunch.connection import KeepAlive
    from pyholepunch.peer import Peer

    skew = job.skew
    keepalive: dict[str, Any] = {}
    if job.keepalive is None:
        keepalive["keepalive"] = None
    elif job.keepalive:
        keepalive["keepalive"] = KeepAlive(**job.keepalive)
    peer = Peer(job.server, name=job.name, config_dir=job.config_dir,
                server_fingerprint=job.fingerprint, engine=job.engine,
                clock=lambda: time.time() + skew, **keepalive)
    sessions: list[dict[str, Any]] = []
    result: dict[str, Any] = {"name": job.name, "sessions": sessions}
    if job.die_on_punch is not None:
        _die_on_punch(peer, job.die_on_punch)
    async with peer:
        result["nat"] = peer.tcp_profile.to_dict()
        if job.ready_file:
            Path(job.ready_file).touch()
        if job.role == "connect":
            await _wait_for_file(job.go_file, 20.0)
            await asyncio.sleep(job.first_wait)
            for i in range(job.sessions):
                if i:
                    await asyncio.sleep(job.pause)
                sessions.append(await _connect_once(peer, job))
        else:
            while len(sessions) < job.sessions and not (job.stop_file
                                                         and os.path.exists(job.stop_file)):
                try:
                    conn = await asyncio.wait_for(peer.accept(), 0.2)
                except TimeoutError:
                    continue
                entry: dict[str, Any] = {"ok": True, "report": conn.report.to_dict()}
                if job.idle:
                    entry["exchange"] = await _exchange(conn, job)
                await conn.close()
                sessions.append(entry)
    return result


async def _connect_once(peer: Any, job: PeerJob) -> dict[str, Any]:
    t0 = time.monotonic()
    try:
        conn = await peer.connect(job.target, timeout=job.timeout)
    except Exception as exc:   # noqa: BLE001 - what the application would see, for the test
        return {"ok": False, "elapsed": time.monotonic() - t0, "error": _error(exc),
                "report": peer.last_report.to_dict() if peer.last_report else None}
    entry = {"ok": True, "elapsed": time.monotonic() - t0, "report": conn.report.to_dict()}
    if job.idle:
        entry["exchange"] = await _exchange(conn, job)
    if job.upgrade_file and conn.route == "relay":
        Path(job.upgrade_file + ".relayed").touch()
        await _wait_for_file(job.upgrade_file, 20.0)
        try:
            direct = await conn.upgrade()
        except Exception as exc:   # noqa: BLE001 - what the application would see
            entry["upgraded"] = {"ok": False, "error": _error(exc)}
        else:
            entry["upgraded"] = {"ok": True, "report": direct.report.to_dict()}
            await direct.close()
    await conn.close()
    return entry


def _die_on_punch(peer: Any, after: float) -> None:
    """Fault injection: this process dies of SIGKILL ``after`` s past the PUNCH start time
    (at once if negative), while its own side of the punch runs (the real one, as usual)."""
    respond = peer._respond

    async def respond_then_die(instr: Any) -> None:
        task = asyncio.ensure_future(respond(instr))
        if after >= 0:
            start = instr.start_at - (peer.clock() - time.time())
            await asyncio.sleep(max(0.0, start - time.time()) + after)
        os.kill(os.getpid(), signal.SIGKILL)
        await task

    peer._respond = respond_then_die


async def _wait_for_file(path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while path and not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout} s")
        await asyncio.sleep(0.05)


def _job_main(raw: str) -> None:
    job = PeerJob(**json.loads(raw))

    async def bounded() -> dict[str, Any]:
        async with asyncio.timeout(job.deadline):
            return await _serve_job(job)

    try:
        result = asyncio.run(bounded())
    except BaseException as exc:
        result = {"name": job.name, "fatal": _error(exc)}
    Path(job.result_file).write_text(json.dumps(result, default=str))


@dataclass
class LabServer:
    address: str
    fingerprint: str


def start_server(lab: Any, work: Path, timeout: float = 20.0) -> LabServer:
    """`pyholepunch serve` on the lab's server node (stopped with the lab)."""
    address = f"{lab.server_ip}:{SERVER_PORT}"
    proc = lab.spawn("server", [sys.executable, "-m", "pyholepunch", "serve", "--listen", address,
                                "--alt-ip", lab.server_alt_ip, "--state-dir", str(work / "server")],
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT)
    line = OutputLines(proc, "stdout", "the server").wait_for("fingerprint", timeout)
    return LabServer(address, line.split()[-1])


def run_peers(lab: Any, server: LabServer, work: Path, *, accept: dict[str, Any],
              connect: dict[str, Any], timeout: float = 60.0,
              names: tuple[str, str] = ("alice", "bob")) -> tuple[dict[str, Any], dict[str, Any]]:
    """Peer ``names[1]`` (accepting) in node b and ``names[0]`` (connecting to it) in node a,
    each its own process; (a's result, b's result). Both are stopped before this returns.
    ``accept`` / ``connect``: further PeerJob fields of each side. Thread-safe."""
    work.mkdir(parents=True, exist_ok=True)
    stamp = f"{time.monotonic_ns()}"
    a, b = names
    ready, stop = work / f"{b}-ready-{stamp}", work / f"{b}-stop-{stamp}"
    bob = PeerJob(server.address, server.fingerprint, b, str(work / b),
                  str(work / f"{b}-{stamp}.json"), role="accept", ready_file=str(ready),
                  stop_file=str(stop), deadline=timeout,
                  log_file=str(work / f"{b}-{stamp}.log"), **accept)
    alice = PeerJob(server.address, server.fingerprint, a, str(work / a),
                    str(work / f"{a}-{stamp}.json"), role="connect", target=b,
                    go_file=str(ready), deadline=timeout,
                    log_file=str(work / f"{a}-{stamp}.log"), **connect)
    procs = {}
    try:
        for node, job in (("b", bob), ("a", alice)):
            with open(job.log_file, "wb") as log:
                procs[node] = lab.spawn(node, [sys.executable, __file__, json.dumps(asdict(job))],
                                        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log)
        _wait(procs["a"], timeout + 5)
        stop.touch()
        _wait(procs["b"], 10)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    return _result(alice), _result(bob)


def _wait(proc: subprocess.Popen[Any], timeout: float) -> None:
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout)


def _result(job: PeerJob) -> dict[str, Any]:
    path, log = Path(job.result_file), Path(job.log_file)
    if not path.exists():   # killed (on purpose or by the deadline): show its log instead
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        return {"name": job.name, "died": True, "log": tail}
    result: dict[str, Any] = json.loads(path.read_text())
    return result


@contextlib.contextmanager
def lab_with_server(tmp: Path, **lab_kwargs: Any) -> Iterator[tuple[Any, LabServer]]:
    from pyholepunch.lab import Lab

    with Lab(**lab_kwargs) as lab:
        yield lab, start_server(lab, tmp)


def winning_step(report: dict[str, Any]) -> dict[str, Any]:
    steps: list[dict[str, Any]] = report["steps"]
    for step in steps:
        if step["outcome"] == "success":
            return step
    raise AssertionError(f"no successful step: {report['steps']}")


def planned_delay(report: dict[str, Any], kind: str, role: str) -> float:
    """The plan's start_delay for ``role`` in the (first) step of ``kind``."""
    for step in (report.get("plan") or {}).get("steps", []):
        if step["kind"] == kind:
            return float(step[role].get("start_delay", 0.0))
    raise AssertionError(f"no step {kind} in the plan")


if __name__ == "__main__":
    _job_main(sys.argv[1])
