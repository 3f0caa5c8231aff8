"""`pyholepunch demo`: two peers behind two lab NATs punch through and exchange data.

It builds a NAT lab (default: two port-restricted NATs, 40 ms RTT), starts `pyholepunch
serve` on the lab's server host, `pyholepunch listen --echo` behind NAT b and `pyholepunch
connect` behind NAT a, and shows what happened: both classifications, the plan, each step,
the route, the time to connect and the echo. Everything is the real CLI in real network
namespaces; nothing reaches outside the machine. Without root (or without nft) it says why
and runs the same flow on loopback, without NATs.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .._process import OutputLines, stop_processes
from ..address import format_address
from ..errors import LabError, ProcessError
from ..lab.nat import NAT_TYPES
from .args import positive_float

PORT = 3478
METRICS_PORT = 9464      # `serve --metrics` inside the server's namespace (run_pair's server_metrics)
MESSAGE = b"hello through the NATs\n"

Spawner = Callable[..., "subprocess.Popen[bytes]"]


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--a", default="port-restricted", choices=NAT_TYPES, help="NAT type of peer a")
    p.add_argument("--b", default="port-restricted", choices=NAT_TYPES, help="NAT type of peer b")
    p.add_argument("--rtt-ms", type=float, default=40.0, help="round trip across the lab")
    p.add_argument("--engine", choices=("native", "pure"), help="punching engine (default: best)")
    p.add_argument("--loopback", action="store_true", help="skip the lab: run on loopback")
    p.add_argument("--timeout", type=positive_float, default=30.0, help="seconds for each stage")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


class Progress:
    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.t0 = time.monotonic()

    def __call__(self, text: str) -> None:
        if not self.quiet:
            print(f"[{time.monotonic() - self.t0:6.2f}s] {text}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _environment(args: argparse.Namespace, progress: Progress
                 ) -> Iterator[tuple[Spawner, str, str, dict[str, Any]]]:
    """(spawn(node, argv), server ip, alt ip, description) for the lab or for loopback."""
    from .. import lab as lab_mod

    blocker = None if args.loopback else lab_mod.unavailable()
    if args.loopback or blocker:
        if blocker:
            print(f"pyholepunch demo: {blocker}; running the same flow on loopback, without NATs",
                  file=sys.stderr)

        def spawn_local(node: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen[bytes]:
            return subprocess.Popen(list(argv), **kw)

        yield spawn_local, "127.0.0.1", "127.0.0.2", {"mode": "loopback"}
        return
    progress(f"building the NAT lab: a behind {args.a}, b behind {args.b}, "
             f"{args.rtt_ms:g} ms RTT")
    t = time.monotonic()
    with lab_mod.Lab(a=args.a, b=args.b, rtt_ms=args.rtt_ms) as lab:
        desc = {"mode": "lab", "lab": lab.name, "a": args.a, "b": args.b, "rtt_ms": args.rtt_ms,
                "start_up_s": round(time.monotonic() - t, 3),
                "a_public": lab.public_ip("a"), "b_public": lab.public_ip("b")}
        progress(f"lab {lab.name} up in {desc['start_up_s']:.2f} s: server {lab.server_ip} "
                 f"(+{lab.server_alt_ip}); a {lab.private_ip('a')} -> {lab.public_ip('a')}; "
                 f"b {lab.private_ip('b')} -> {lab.public_ip('b')}")
        yield lab.spawn, lab.server_ip, lab.server_alt_ip, desc


def _cli(*argv: str) -> list[str]:
    return [sys.executable, "-m", "pyholepunch", *argv]


def run(args: argparse.Namespace) -> int:
    progress = Progress(args.json)
    with tempfile.TemporaryDirectory(prefix="pyholepunch-demo-") as tmp:
        try:
            with _environment(args, progress) as (spawn, server_ip, alt_ip, desc):
                result = run_pair(spawn, server_ip, alt_ip, Path(tmp), engine=args.engine,
                                  timeout=args.timeout, progress=progress)
                result["environment"] = desc
        except LabError:
            raise
        except (ProcessError, subprocess.TimeoutExpired, OSError) as exc:
            print(f"pyholepunch demo: {exc}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True, default=str))
    else:
        _show(result)
    return 0 if result["echo_ok"] else 1


def run_pair(spawn: Spawner, server_ip: str, alt_ip: str, work: Path, *,
             engine: str | None = None, timeout: float = 30.0, connect_args: Sequence[str] = (),
             progress: Callable[[str], None] = lambda text: None,
             server_metrics: bool = False, serve_args: Sequence[str] = (),
             listen_args: Sequence[str] = (),
             peer_servers: dict[str, str] | None = None) -> dict[str, Any]:
    """serve on node "server", `listen --echo` on "b", `connect` on "a": the echo and reports.

    ``spawn(node, argv, **popen_kwargs)`` starts a process on a node (``Lab.spawn``, or a
    plain Popen on loopback); ``connect_args`` go to `connect` only (e.g. its --relay),
    ``listen_args`` to `listen`, ``serve_args`` to `serve` (e.g. a second family's --listen
    and --alt-ip); ``peer_servers`` gives a peer ("a"/"b") another server address to use
    (e.g. the server's IPv6 address for an IPv6-only peer).
    Returns ``report`` (a's), ``responder_report`` (b's, if it wrote one), ``echo``,
    ``echo_ok``, ``exit_code``, ``elapsed`` (s, peer a's process from start to exit); with
    ``server_metrics``, ``server_metrics`` too: the server's Prometheus exposition once it
    has counted the session. Every process is stopped before this returns.
    """
    procs: list[subprocess.Popen[bytes]] = []
    try:
        result = _flow(spawn, server_ip, alt_ip, work, procs, engine, timeout, list(connect_args),
                       progress, server_metrics, list(serve_args), list(listen_args),
                       dict(peer_servers or {}))
        if server_metrics:
            result["server_metrics"] = _scrape(spawn, f"http://127.0.0.1:{METRICS_PORT}/metrics")
        return result
    finally:
        stop_processes(*procs)
        for p in procs:
            for stream in (p.stdin, p.stdout, p.stderr):
                if stream is not None:
                    stream.close()


def _flow(spawn: Spawner, server_ip: str, alt_ip: str, work: Path,
          procs: list[subprocess.Popen[bytes]], engine: str | None, timeout: float,
          connect_args: list[str], progress: Callable[[str], None],
          server_metrics: bool = False, serve_args: tuple[str, ...] | list[str] = (),
          listen_args: tuple[str, ...] | list[str] = (),
          peer_servers: dict[str, str] | None = None) -> dict[str, Any]:
    server = format_address((server_ip, PORT))
    peer_servers = peer_servers or {}
    engine_opt = ["--engine", engine] if engine else []
    metrics_opt = ["--metrics", f"127.0.0.1:{METRICS_PORT}"] if server_metrics else []
    progress(f"starting `pyholepunch serve` on {server} (alt {alt_ip})")
    srv = spawn("server", _cli("serve", "--listen", server, "--alt-ip", alt_ip, *serve_args,
                               "--state-dir", str(work / "server"), *metrics_opt),
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    procs.append(srv)
    line = OutputLines(srv, "stdout", "the server").wait_for("fingerprint", timeout)
    fingerprint = line.split()[-1]
    common = ["--server-fingerprint", fingerprint, *engine_opt]
    server_a, server_b = (["--server", peer_servers.get(n, server)] for n in ("a", "b"))

    progress("peer b: classifying its NAT and registering as 'bob' (`pyholepunch listen --echo`)")
    bob = spawn("b", _cli("listen", *server_b, *common, *listen_args, "--name", "bob", "--echo",
                          "--once",
                          "--config-dir", str(work / "bob"), "--json-file", str(work / "bob.json")),
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    procs.append(bob)
    OutputLines(bob, "stderr", "peer b").wait_for("listening as", timeout)

    progress("peer a: classifying its NAT, registering as 'alice' and connecting to 'bob'")
    t = time.monotonic()
    alice = spawn("a", _cli("connect", *server_a, *common, *connect_args, "--name", "alice", "bob",
                            "--config-dir", str(work / "alice"), "--json-file", str(work / "alice.json"),
                            "--timeout", str(timeout)),
                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    procs.append(alice)
    out, err = alice.communicate(MESSAGE, timeout=timeout + 30)
    elapsed = time.monotonic() - t
    report: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        report = json.loads((work / "alice.json").read_text())
    if not report:
        tail = err.decode(errors="replace").strip().splitlines()[-8:]
        raise ProcessError("peer a did not connect:\n  " + "\n  ".join(tail))
    progress(f"peer a finished in {elapsed:.2f} s (classification, registration, punch, echo)")
    with contextlib.suppress(subprocess.TimeoutExpired):
        bob.wait(5)                            # --once: it leaves when the echo is done
    responder: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        responder = json.loads((work / "bob.json").read_text())
    return {"report": report, "responder_report": responder, "echo": out.decode(errors="replace"),
            "echo_ok": out == MESSAGE, "exit_code": alice.returncode,
            "elapsed": elapsed}    # peer a's whole flow: classify, register, connect, echo


def _scrape(spawn: Spawner, url: str, deadline: float = 5.0) -> str:
    """The server's metrics once the session's outcome is in (the initiator's RESULT may
    still be on its way when the echo is done)."""
    end = time.monotonic() + deadline
    text = ""
    while time.monotonic() < end:
        proc = spawn("server", ["curl", "-sS", "--max-time", "2", url],
                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        text = proc.communicate(timeout=10)[0].decode(errors="replace")
        if "pyholepunch_server_punch_outcomes_total{" in text:
            break
        time.sleep(0.1)
    return text


def _show(result: dict[str, Any]) -> None:
    r = result["report"]
    env = result["environment"]
    lines = ["", "pyholepunch demo"]
    if env["mode"] == "lab":
        lines.append(f"  lab         {env['lab']}: a behind {env['a']}, b behind {env['b']}, "
                     f"{env['rtt_ms']:g} ms RTT (start-up {env['start_up_s']:.2f} s)")
    else:
        lines.append("  loopback    no NATs: every peer on 127.0.0.1")
    for who, key in (("a (alice)", "local_nat"), ("b (bob)", "remote_nat")):
        nat = r.get(key) or {}
        lines.append(f"  NAT {who:9s} {nat.get('label', '?')}: mapping {nat.get('mapping')}, "
                     f"filtering {nat.get('filtering')}, unsolicited SYN {nat.get('unsolicited_syn')}")
    plan = r.get("plan") or {}
    lines.append(f"  plan        {plan.get('reason', '')}")
    for s in r.get("steps", []):
        stats = s.get("stats") or {}
        dur = s.get("duration")
        lines.append(f"    step      {s['kind']:16s} {s['outcome']:8s} "
                     f"{'' if dur is None else f'{dur * 1000:7.1f} ms'}  "
                     f"SYNs {stats.get('syns_sent', 0)}, RSTs {stats.get('rsts_seen', 0)}"
                     + (f"  ({s['error']})" if s.get("error") else ""))
    total = r.get("total_time")
    lines.append(f"  route       {r.get('route')}"
                 + (f" (relay: {r['relay_reason']})" if r.get("relay_reason") else ""))
    lines.append(f"  connected   in {total * 1000:.1f} ms from connect() to TLS established"
                 if total is not None else "  connected   no")
    lines.append(f"  echo        {result['echo'].strip()!r} "
                 f"{'(matches)' if result['echo_ok'] else '(MISMATCH)'}")
    print("\n".join(lines))
