"""A UPnP IGD / NAT-PMP / PCP router in the lab: Debian's miniupnpd (2.3.1, nftables build)
on a NAT node (docs/lab.md).

miniupnpd creates no nftables tables itself: the lab gives it ``table inet miniupnpd`` with a
forward chain (priority filter - 5) and a prerouting nat chain at dstnat - 10 (the first nat
chain to translate a new flow wins, so it runs before the lab's own dstnat chain), each jumping
to the regular chain miniupnpd fills. It considers every lab public range reserved and then
refuses to forward, unless its own STUN check (``ext_perform_stun``) finds the router's WAN
address unfiltered: the lab runs our STUN server for it on the server host (STUN_PORT and
STUN_PORT + 1 on both addresses) and the NAT ruleset admits those four answers
(``nat.ruleset`` with ``portmap=True``, which also keeps the router's own traffic out of a
port-changing SNAT). Per-node config, pid, lease and log files live in one work directory,
removed on stop. miniupnpd keeps live mappings on SIGTERM (and would re-add them from its lease
file on the next start): ``stop`` flushes its chains and deletes the lease file.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import LabError

log = logging.getLogger(__name__)

BINARY = "miniupnpd"
STUN_PORT = 3488            # our STUN server for the routers; its alternate port is + 1
HTTP_PORT = 5555            # the IGD's HTTP (description + SOAP) port on the LAN side
TABLE = "miniupnpd"
CHAINS = ("miniupnpd", "prerouting_miniupnpd", "postrouting_miniupnpd")
START_TIMEOUT_S = 15.0
ENABLED = "Port forwarding is now enabled"
DISABLED = "Port forwarding is now disabled"


def nft_tables(wan_if: str) -> str:
    """The table and chains miniupnpd writes into (it creates none itself)."""
    wan = f'iifname "{wan_if}"'
    return (
        f"table inet {TABLE} {{\n"
        "  chain miniupnpd { }\n"
        "  chain prerouting_miniupnpd { }\n"
        "  chain postrouting_miniupnpd { }\n"
        "  chain forward {\n    type filter hook forward priority filter - 5; policy accept;\n"
        f"    {wan} jump miniupnpd\n  }}\n"
        "  chain prerouting {\n    type nat hook prerouting priority dstnat - 10; policy accept;\n"
        f"    {wan} jump prerouting_miniupnpd\n  }}\n"
        "  chain postrouting {\n    type nat hook postrouting priority srcnat; policy accept;\n"
        "    jump postrouting_miniupnpd\n  }\n"
        "}\n")


def config(*, wan_if: str, lan_if: str, lan_net: str, stun_host: str, lease_file: str,
           min_lifetime: int = 120, ipv6: bool = False) -> str:
    """miniupnpd.conf for one router: UPnP IGD + NAT-PMP/PCP, secure mode, our STUN server.

    ``system_uptime=no``: the PCP/NAT-PMP epoch counts from the daemon's start, so a restart
    looks like a router reboot to clients (what the epoch exists to tell)."""
    return "\n".join([
        f"ext_ifname={wan_if}", f"listening_ip={lan_if}", f"http_port={HTTP_PORT}",
        f"ipv6_disable={'no' if ipv6 else 'yes'}", "enable_upnp=yes", "enable_natpmp=yes", "secure_mode=yes",
        "system_uptime=no", f"lease_file={lease_file}", f"uuid={uuid.uuid4()}",
        "ext_perform_stun=yes", f"ext_stun_host={stun_host}", f"ext_stun_port={STUN_PORT}",
        f"upnp_table_name={TABLE}", f"upnp_nat_table_name={TABLE}",
        "upnp_forward_chain=miniupnpd", "upnp_nat_chain=prerouting_miniupnpd",
        "upnp_nat_postrouting_chain=postrouting_miniupnpd",
        f"min_lifetime={min_lifetime}", "max_lifetime=86400",
        f"allow 1024-65535 {lan_net} 1024-65535", "deny 0-65535 0.0.0.0/0 0-65535", ""])


Runner = Callable[..., "subprocess.CompletedProcess[str]"]
Spawner = Callable[..., "subprocess.Popen[Any]"]


class Router:
    """One miniupnpd on lab node ``node`` (run through the lab's ``run``/``spawn``)."""

    def __init__(self, node: str, *, run: Runner, spawn: Spawner, wan_if: str, lan_if: str,
                 lan_net: str, stun_host: str, min_lifetime: int = 120, ipv6: bool = False) -> None:
        self.node = node
        self._run, self._spawn = run, spawn
        self.wan_if = wan_if
        self.workdir = tempfile.mkdtemp(prefix=f"hpl-miniupnpd-{node}-")
        self.conf_path = os.path.join(self.workdir, "miniupnpd.conf")
        self.pid_path = os.path.join(self.workdir, "miniupnpd.pid")
        self.lease_path = os.path.join(self.workdir, "leases")
        self.log_path = os.path.join(self.workdir, "miniupnpd.log")
        self._conf = dict(wan_if=wan_if, lan_if=lan_if, lan_net=lan_net, stun_host=stun_host,
                          lease_file=self.lease_path, min_lifetime=min_lifetime)
        self.write_config(ipv6=ipv6)
        self.proc: subprocess.Popen[Any] | None = None
        self.starts = 0

    def write_config(self, *, ipv6: bool = False) -> None:
        """(Re)write the config; ``ipv6`` turns on its IPv6 side (pinholes), effective at the
        next start."""
        with open(self.conf_path, "w") as f:
            f.write(config(**self._conf, ipv6=ipv6))  # type: ignore[arg-type]

    # -- lifecycle ---------------------------------------------------------------------------
    def install_tables(self) -> None:
        self._nft_stdin(nft_tables(self.wan_if), "miniupnpd tables")

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Start miniupnpd and wait until its STUN check has enabled port forwarding."""
        if self.proc is not None and self.proc.poll() is None:
            raise LabError(f"miniupnpd already runs on {self.node}")
        log_file = open(self.log_path, "a")  # noqa: SIM115 - handed to the child
        try:
            self.proc = self._spawn(self.node, [BINARY, "-f", self.conf_path, "-P", self.pid_path,
                                                "-d"], stdout=log_file, stderr=log_file)
        finally:
            log_file.close()
        self.starts += 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log()
            if text.count(ENABLED) >= self.starts:
                return
            if self.proc.poll() is not None:
                break
            if text.count(DISABLED) >= self.starts:
                self.stop()
                raise LabError(f"miniupnpd on {self.node} disabled port forwarding "
                               f"(its STUN check failed):\n{self._tail()}")
            time.sleep(0.05)
        self.stop()
        raise LabError(f"miniupnpd on {self.node} did not enable port forwarding within "
                       f"{timeout:.0f} s:\n{self._tail()}")

    def stop(self, *, keep_state: bool = False) -> None:
        """Stop it by PID (SIGTERM, then SIGKILL). Unless ``keep_state``, flush its chains and
        delete its lease file: miniupnpd leaves both behind on purpose."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if not keep_state:
            self.forget_mappings()

    def forget_mappings(self) -> None:
        for chain in CHAINS:
            self._run(self.node, ["nft", "flush", "chain", "inet", TABLE, chain], timeout=10)
        try:
            os.unlink(self.lease_path)
        except FileNotFoundError:
            pass

    def restart(self, *, lose_state: bool = True) -> None:
        """Like a router reboot: stop, (forget every mapping,) start; the epoch starts again."""
        self.stop(keep_state=not lose_state)
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    # -- inspection --------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def _tail(self, lines: int = 12) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def ruleset(self) -> str:
        """``nft list table inet miniupnpd`` in the router's namespace."""
        r = self._run(self.node, ["nft", "list", "table", "inet", TABLE], timeout=10)
        if r.returncode != 0:
            raise LabError(f"nft list table inet {TABLE} on {self.node}: {r.stderr.strip()}")
        return r.stdout

    def redirects(self, proto: str = "tcp") -> list[tuple[int, str, int]]:
        """(external port, internal ip, internal port) of every DNAT rule miniupnpd holds, as
        it writes them: ``iif "wan" @nh,72,8 0x6 th dport 40000 dnat ip to 10.0.1.2:40000``
        (the IPv4 header's protocol byte: 0x6 TCP, 0x11 UDP)."""
        want = {"tcp": "0x6", "udp": "0x11"}[proto]
        out = []
        for line in self.ruleset().splitlines():
            words = line.split()
            if "dnat" not in words or "dport" not in words:
                continue
            if "@nh,72,8" in words and words[words.index("@nh,72,8") + 1] != want:
                continue
            try:
                ext = int(words[words.index("dport") + 1])
                ip, _, port = words[words.index("to") + 1].rpartition(":")
                out.append((ext, ip, int(port)))
            except (ValueError, IndexError):
                continue
        return out

    def leases(self) -> list[str]:
        try:
            with open(self.lease_path) as f:
                return [line.strip() for line in f if line.strip()]
        except FileNotFoundError:
            return []

    def _nft_stdin(self, text: str, what: str) -> None:
        r = self._run(self.node, ["nft", "-f", "-"], input=text, timeout=10)
        if r.returncode != 0:
            raise LabError(f"nft rejected the {what}: {r.stderr.strip()}")

    def __repr__(self) -> str:
        return f"<miniupnpd on {self.node} pid {self.pid}>"


def available() -> str | None:
    """Why miniupnpd cannot run here, or None."""
    return None if shutil.which(BINARY) else f"{BINARY} is not installed (apt-get install miniupnpd)"


def stun_argv(python: str, server_ip: str, alt_ip: str) -> Sequence[str]:
    """Our STUN server for the routers' ext_perform_stun check (both addresses, two ports)."""
    return [python, "-m", "pyholepunch.stun", "--listen", f"{server_ip}:{STUN_PORT}",
            "--alt-ip", alt_ip]
