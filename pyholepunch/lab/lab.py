"""`Lab`: a NAT lab as a (sync or async) context manager.

    with Lab(a="port-restricted", b="symmetric-seq", rtt_ms=40, v6_a="firewall") as lab:
        lab.run("a", ["ip", "route"])
        lab.call("b", some_picklable_function, arg)

Teardown (kill every process in the lab's namespaces, delete the namespaces) runs on exit, on
an exception, on SIGINT (KeyboardInterrupt unwinds the with-block), on SIGTERM (a handler is
installed by the first lab if the process had none: it tears the labs down and then dies of
SIGTERM as before) and, as a fallback, at interpreter exit.
"""
from __future__ import annotations

import asyncio
import atexit
import logging
import os
import re
import secrets
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from types import FrameType, TracebackType
from typing import Any

from ..errors import LabError
from . import _ns, background, miniupnpd, state, topology
from .topology import SERVER_ALT_IP, SERVER_ALT_IP6, SERVER_IP, SERVER_IP6

log = logging.getLogger(__name__)

_live: set[Lab] = set()
_live_lock = threading.Lock()
_prev_sigterm: Any = None


def _teardown_all() -> None:
    with _live_lock:
        labs = list(_live)
    for lab in labs:
        lab.close()


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    """Tear the labs down, then die of SIGTERM exactly as the default action would."""
    _teardown_all()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def _install_sigterm() -> None:
    global _prev_sigterm
    if threading.current_thread() is not threading.main_thread() or _prev_sigterm is not None:
        return
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        _prev_sigterm = signal.signal(signal.SIGTERM, _on_sigterm)


atexit.register(_teardown_all)

DELAYER_START_TIMEOUT_S = 15.0
_CONNTRACK_KEY = re.compile(r"^[a-z0-9_]+$")


class Lab:
    """Peers `a` and `b` behind NATs of the given types, a two-address server, one core router.

    `v6_a` / `v6_b`: each side's IPv6 behaviour beside its IPv4 type (nat.V6_BEHAVIOURS):
    "none" (no IPv6, the default), "open", "firewall" (stateful, RFC 6092), "firewall-rst",
    "blackhole" (an address and a route, every IPv6 packet dropped at the uplink). With IPv6 on
    either side the server has two IPv6 addresses too (`server_ip6`, `server_alt_ip6`). An IPv4
    type "no-ipv4" makes an IPv6-only peer.
    """

    def __init__(self, a: str = "port-restricted", b: str = "port-restricted", *, rtt_ms: float = 0,
                 jitter_ms: float = 0, loss_pct: float = 0.0, same_nat: bool = False,
                 hairpin: bool = False, conntrack: dict[str, int] | None = None,
                 portmap_a: bool = False, portmap_b: bool = False,
                 portmap_min_lifetime: int = 120, v6_a: str = "none", v6_b: str = "none",
                 background_rate: float | Mapping[str, float] = 0.0) -> None:
        for label, v in (("rtt_ms", rtt_ms), ("jitter_ms", jitter_ms)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 10_000:
                raise ValueError(f"{label} must be a number in [0, 10000], got {v!r}")
        if isinstance(loss_pct, bool) or not isinstance(loss_pct, (int, float)) or not 0 <= loss_pct < 100:
            raise ValueError(f"loss_pct must be in [0, 100), got {loss_pct!r}")
        self.conntrack = dict(conntrack or {})
        for key, value in self.conntrack.items():
            if not _CONNTRACK_KEY.match(str(key)):
                raise ValueError(f"bad conntrack setting name {key!r} (e.g. 'tcp_timeout_established')")
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"conntrack {key} must be a non-negative int, got {value!r}")
        self.rtt_ms, self.jitter_ms, self.loss_pct = float(rtt_ms), float(jitter_ms), float(loss_pct)
        self.same_nat, self.hairpin = same_nat, hairpin
        seq_offset = secrets.randbelow(10_000)
        portmap = tuple(p for p, on in (("a", portmap_a), ("b", portmap_b)) if on)
        if same_nat and len(portmap) > 1:
            raise ValueError("with same_nat both peers share one router: set portmap_a only")
        self._plan = topology.plan(a, b, same_nat=same_nat, hairpin=hairpin, seq_offset=seq_offset,
                                   portmap=portmap, v6_a=v6_a, v6_b=v6_b)
        self.portmap_min_lifetime = portmap_min_lifetime
        self.background_rate = background.rates(background_rate, self._plan)
        self.routers: dict[str, miniupnpd.Router] = {}   # peer -> the miniupnpd of its NAT
        self.a_type, self.b_type = self._plan.types["a"], self._plan.types["b"]
        self.v6_a, self.v6_b = self._plan.v6["a"], self._plan.v6["b"]
        self.name = ""
        self.server_ip, self.server_alt_ip = SERVER_IP, SERVER_ALT_IP
        self.server_ip6, self.server_alt_ip6 = SERVER_IP6, SERVER_ALT_IP6
        self.nodes: tuple[str, ...] = tuple(self._plan.nodes)
        self.startup_s: float | None = None
        self._procs: list[subprocess.Popen[Any] | asyncio.subprocess.Process] = []
        self._owner = 0
        self._closed = False
        self._delayer: subprocess.Popen[str] | None = None

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> Lab:
        if self.name:
            raise LabError(f"lab {self.name} already started")
        delay = self.rtt_ms > 0 or self.jitter_ms > 0
        _ns.require_support(delay)
        t0 = time.monotonic()
        self._owner = os.getpid()
        self.name = self._new_name()
        state.write(self.name, self.describe() | {"pid": self._owner,
                                                   "pid_start": _ns.process_start_time(self._owner)})
        with _live_lock:
            _live.add(self)
        _install_sigterm()
        try:
            # The delayer (a python start-up) boots while the namespaces are being wired.
            topology.build(self.name, self._plan, conntrack=self.conntrack, loss_pct=self.loss_pct,
                           delay=delay, after_namespaces=self._spawn_delayer if delay else None)
            if delay:
                self._await_delayer()
            if self._plan.routers:
                self._start_routers()
            if self.background_rate:
                background.start(self, self._plan, self.background_rate)
        except BaseException as exc:
            self.close()
            if isinstance(exc, LabError):
                raise
            if isinstance(exc, Exception):
                raise LabError(f"building lab failed: {exc}") from exc
            raise
        self.startup_s = time.monotonic() - t0
        log.info("lab %s up in %.3f s: a=%s b=%s v6_a=%s v6_b=%s", self.name, self.startup_s,
                 self.a_type, self.b_type, self.v6_a, self.v6_b)
        return self

    @staticmethod
    def _new_name() -> str:
        taken = set(state.lab_names())
        while True:
            name = state.PREFIX + secrets.token_hex(3)[:5]
            if name not in taken:
                return name

    def _spawn_delayer(self) -> None:
        argv = [sys.executable, "-m", "pyholepunch.lab.delay", "--queue", str(topology.DELAY_QUEUE),
                "--delay-ms", repr(self.rtt_ms / 2), "--jitter-ms", repr(self.jitter_ms)]
        self._delayer = self.spawn("core", argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def _await_delayer(self) -> None:
        proc = self._delayer
        assert proc is not None and proc.stdout is not None
        # The delayer flushes "ready" once bound to the queue (a python start-up: ~0.1 s).
        ready, _, _ = select.select([proc.stdout], [], [], DELAYER_START_TIMEOUT_S)
        line = proc.stdout.readline() if ready else "(no answer)"
        if line.strip() != "ready":
            err = proc.stderr.read() if proc.stderr and proc.poll() is not None else ""
            raise LabError(f"the NFQUEUE delayer did not start: {line.strip()} {err.strip()}")

    def _start_routers(self) -> None:
        """Our STUN server (for the routers' forwarding check), then miniupnpd on each router."""
        blocker = miniupnpd.available()
        if blocker:
            raise LabError(blocker)
        stun = self.spawn("server", miniupnpd.stun_argv(sys.executable, SERVER_IP, SERVER_ALT_IP),
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert stun.stdout is not None
        ready, _, _ = select.select([stun.stdout], [], [], DELAYER_START_TIMEOUT_S)
        line = stun.stdout.readline() if ready else ""
        if not line.startswith("ready"):
            raise LabError(f"the STUN server for the routers did not start: {line.strip()!r}")
        for peer, node in self._plan.routers.items():
            nat = self._plan.nodes[node].nat
            assert nat is not None
            router = miniupnpd.Router(node, run=self.run, spawn=self.spawn, wan_if=nat.wan_if,
                                      lan_if=nat.lan_if, lan_net=nat.lan_net, stun_host=SERVER_IP,
                                      min_lifetime=self.portmap_min_lifetime)
            self.routers[peer] = router
            router.install_tables()
            router.start()

    def router(self, peer: str) -> miniupnpd.Router:
        """The miniupnpd in front of ``peer`` (Lab(portmap_a=True) for "a")."""
        if peer not in self.routers:
            raise ValueError(f"no port-mapping router in front of {peer!r} "
                             f"(Lab(portmap_{peer}=True)); routers: {sorted(self.routers)}")
        return self.routers[peer]

    def close(self) -> None:
        """Tear everything down; idempotent, and a no-op in forked children."""
        if self._closed or not self.name or os.getpid() != self._owner:
            return
        self._closed = True
        with _live_lock:
            _live.discard(self)
        for router in self.routers.values():
            try:
                router.close()
            except (OSError, subprocess.SubprocessError, LabError) as exc:
                log.warning("lab %s: stopping %r failed: %s", self.name, router, exc)
        for proc in self._procs:
            try:
                proc.kill()
            except (ProcessLookupError, OSError):
                pass
        for proc in self._procs:
            if isinstance(proc, subprocess.Popen):
                try:
                    proc.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    log.warning("lab %s: process %d did not die", self.name, proc.pid)
                for stream in (proc.stdin, proc.stdout, proc.stderr):
                    if stream is not None:
                        stream.close()
        removed = state.remove(self.name)
        log.info("lab %s down (%d namespaces removed)", self.name, len(removed))

    def __enter__(self) -> Lab:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    async def __aenter__(self) -> Lab:
        build = asyncio.ensure_future(asyncio.to_thread(self.start))
        try:
            return await asyncio.shield(build)
        except asyncio.CancelledError:
            # The build thread cannot be interrupted: let it finish (well under a second),
            # then tear down what it made.
            try:
                await build
            except BaseException:  # noqa: BLE001 - start() already cleaned up after itself
                pass
            await asyncio.to_thread(self.close)
            raise

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        # Reap asyncio children on the loop first, then tear down off the loop.
        for proc in self._procs:
            if isinstance(proc, asyncio.subprocess.Process) and proc.returncode is None:
                try:
                    proc.kill()
                except ProcessLookupError:
                    pass
                try:
                    await asyncio.wait_for(proc.wait(), 2)
                except (TimeoutError, ProcessLookupError):
                    pass
        await asyncio.to_thread(self.close)

    # --- addresses -------------------------------------------------------------------------
    def _node(self, node: str) -> str:
        if node not in self._plan.nodes:
            raise ValueError(f"no node {node!r} in this lab; nodes: {', '.join(self.nodes)}")
        return node

    def netns(self, node: str) -> str:
        if not self.name:
            raise LabError("the lab is not started")
        return f"{self.name}-{self._node(node)}"

    def private_ip(self, node: str) -> str:
        if node == "server":
            return self.server_ip
        if node not in self._plan.types:
            raise ValueError(f"private_ip is for the peers 'a' and 'b', not {node!r}")
        if node not in self._plan.private:
            raise ValueError(f"peer {node} has no IPv4 (type {self._plan.types[node]!r})")
        return self._plan.private[node]

    def public_ip(self, node: str) -> str:
        if node == "server":
            return self.server_ip
        if node not in self._plan.types:
            raise ValueError(f"public_ip is for the peers 'a' and 'b', not {node!r}")
        if node not in self._plan.public:
            raise ValueError(f"peer {node} has no IPv4 (type {self._plan.types[node]!r})")
        return self._plan.public[node]

    def public_ip6(self, node: str) -> str:
        """The peer's global IPv6 address (no NAT on IPv6: the host's own), or the server's."""
        if not self._plan.public6:
            raise ValueError("this lab has no IPv6 (v6_a and v6_b are 'none')")
        if node == "server":
            return self.server_ip6
        if node not in self._plan.types:
            raise ValueError(f"public_ip6 is for the peers 'a' and 'b', not {node!r}")
        if node not in self._plan.public6:
            raise ValueError(f"peer {node} has no IPv6 (v6 behaviour 'none')")
        return self._plan.public6[node]

    def nat_type(self, node: str) -> str:
        return self._plan.types[node]

    def v6_behaviour(self, node: str) -> str:
        return self._plan.v6[node]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "a": self.a_type, "b": self.b_type, "nodes": list(self.nodes),
                "server_ip": self.server_ip, "server_alt_ip": self.server_alt_ip,
                "private": dict(self._plan.private), "public": dict(self._plan.public),
                "v6_a": self.v6_a, "v6_b": self.v6_b, "server_ip6": self.server_ip6,
                "server_alt_ip6": self.server_alt_ip6, "public6": dict(self._plan.public6),
                "rtt_ms": self.rtt_ms, "jitter_ms": self.jitter_ms, "loss_pct": self.loss_pct,
                "same_nat": self.same_nat, "hairpin": self.hairpin,
                "portmap": dict(self._plan.routers), "background_rate": dict(self.background_rate)}

    # --- running things inside ------------------------------------------------------------
    def _argv(self, node: str, argv: Sequence[str]) -> list[str]:
        if isinstance(argv, str) or not argv:
            raise ValueError("argv must be a non-empty list of strings, e.g. ['ip', 'addr']")
        return ["ip", "netns", "exec", self.netns(node), *map(str, argv)]

    def run(self, node: str, argv: Sequence[str], *, timeout: float = 30,
            **kwargs: Any) -> subprocess.CompletedProcess[str]:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(self._argv(node, argv), timeout=timeout, check=False, **kwargs)

    def spawn(self, node: str, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
        proc: subprocess.Popen[Any] = subprocess.Popen(self._argv(node, argv), **popen_kwargs)
        self._procs.append(proc)
        return proc

    def call(self, node: str, fn: Callable[..., Any], *args: Any, timeout: float = 30,
             **kwargs: Any) -> Any:
        return _ns.call(self.netns(node), fn, args, kwargs, timeout)

    def socket(self, node: str, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM,
               proto: int = 0) -> socket.socket:
        """A socket living in `node`'s namespace, usable from this process (no fork needed)."""
        return _ns.socket_in(self.netns(node), family, type, proto)

    async def arun(self, node: str, argv: Sequence[str], *, timeout: float = 30,
                   input: bytes | None = None) -> subprocess.CompletedProcess[str]:
        full = self._argv(node, argv)
        proc = await asyncio.create_subprocess_exec(
            *full, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(proc.communicate(input), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise subprocess.TimeoutExpired(full, timeout) from None
        return subprocess.CompletedProcess(full, proc.returncode or 0, out.decode(errors="replace"),
                                           err.decode(errors="replace"))

    async def aspawn(self, node: str, argv: Sequence[str], **kwargs: Any) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(*self._argv(node, argv), **kwargs)
        self._procs.append(proc)
        return proc

    async def acall(self, node: str, fn: Callable[..., Any], *args: Any, timeout: float = 30,
                    **kwargs: Any) -> Any:
        return await asyncio.to_thread(_ns.call, self.netns(node), fn, args, kwargs, timeout)

    def __repr__(self) -> str:
        v6 = f" v6_a={self.v6_a} v6_b={self.v6_b}" if (self.v6_a, self.v6_b) != ("none", "none") else ""
        return f"<Lab {self.name or '(not started)'} a={self.a_type} b={self.b_type}{v6}>"
