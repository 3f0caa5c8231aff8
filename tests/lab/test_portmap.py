"""Port mapping against the real miniupnpd (Debian's 2.3.1) on the lab's NAT node, one test per
protocol: map, renew (at half life, by the mapper itself), delete — each checked in the
router's nftables ruleset and lease file AND by a real connection from the server host to the
mapped address, never by trusting the router's reply.

The mapper runs in peer a's namespace (a thread that entered it); the inbound connection is
made from the server host's namespace. Peer a sits behind a port-restricted NAT, which drops
unsolicited SYNs: a connection gets in only through a mapping.
"""
from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Iterator
from typing import Any, TypeVar

import pytest

from pyholepunch.errors import PortMapError, PortMapUnavailable
from pyholepunch.lab import Lab
from pyholepunch.portmap import PortMapper, cleanup, gateway_for

from .helpers import in_netns

pytestmark = pytest.mark.lab
T = TypeVar("T")
LEASE_S = 4          # renewed at 2 s: the test sees the keeper renew on its own


def inbound(lab: Lab, addr: tuple[str, int], timeout: float = 0.6) -> bool:
    """Can the server host open a TCP connection to ``addr`` and send through it?"""
    s = lab.socket("server")
    s.settimeout(timeout)
    try:
        s.connect(addr)
        s.sendall(b"knock")
        return True
    except OSError:
        return False
    finally:
        s.close()


async def accepts(lab: Lab, listener: socket.socket, addr: tuple[str, int]) -> bool:
    """A real inbound connection to ``addr`` reaches ``listener`` and carries its bytes."""
    loop = asyncio.get_running_loop()
    dial = asyncio.ensure_future(asyncio.to_thread(inbound, lab, addr, 2.0))
    try:
        conn, _ = await asyncio.wait_for(loop.sock_accept(listener), 3)
    except TimeoutError:
        await dial
        return False
    with conn:
        data = await asyncio.wait_for(loop.sock_recv(conn, 16), 2)
    return await dial and data == b"knock"


def make_listener() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 0))
    s.listen(4)
    s.setblocking(False)
    return s


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab(a="port-restricted", b="none", portmap_a=True, portmap_min_lifetime=1) as lab:
        yield lab


def _lease_expiry(lab: Lab, ext_port: int) -> int | None:
    for line in lab.router("a").leases():       # PROTO:EXT:IP:INT:EXPIRY:DESC
        parts = line.split(":")
        if len(parts) >= 5 and parts[1] == str(ext_port):
            return int(parts[4])
    return None


@pytest.mark.parametrize("protocol", ["pcp", "nat-pmp", "upnp"])
def test_map_renew_delete_against_miniupnpd(lab: Lab, protocol: str) -> None:
    router = lab.router("a")
    public = lab.public_ip("a")

    async def scenario() -> dict[str, Any]:
        gw = gateway_for(lab.server_ip)
        assert gw == "10.0.1.1"
        listener = make_listener()
        port = listener.getsockname()[1]
        out: dict[str, Any] = {}
        try:
            assert not await asyncio.to_thread(inbound, lab, (public, port)), \
                "the NAT let an unsolicited connection in before any mapping"
            mapper = PortMapper(gw, lab.private_ip("a"), protocols=(protocol,), lifetime=LEASE_S)
            try:
                probe = await mapper.probe()
                assert probe.available == (protocol,), probe
                assert probe.elapsed < 0.25
                m = await mapper.map(port)
                out["mapping"] = (m.protocol, m.external, m.internal, m.lifetime)
                ext = m.external
                out["rules_mapped"] = router.redirects()
                out["expiry_mapped"] = _lease_expiry(lab, ext[1])
                out["inbound_mapped"] = await accepts(lab, listener, ext)
                deadline = time.monotonic() + LEASE_S + 2
                while m.renewals < 1 and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                out["renewals"] = m.renewals
                out["rules_renewed"] = router.redirects()
                out["expiry_renewed"] = _lease_expiry(lab, ext[1])
                out["inbound_renewed"] = await accepts(lab, listener, ext)
            finally:
                await mapper.close()
            out["rules_deleted"] = router.redirects()
            out["leases_deleted"] = router.leases()
            out["inbound_deleted"] = await asyncio.to_thread(inbound, lab, ext)
            out["pending"] = cleanup.pending()
        finally:
            listener.close()
        return out

    r = in_netns(lab, "a", scenario)
    proto, ext, internal, lifetime = r["mapping"]
    assert proto == protocol and ext[0] == public and internal == (lab.private_ip("a"), internal[1])
    assert 0 < lifetime <= LEASE_S, r
    rule = (ext[1], lab.private_ip("a"), internal[1])
    assert rule in r["rules_mapped"], r
    assert r["inbound_mapped"], "no inbound connection through the fresh mapping"
    assert r["renewals"] >= 1, "the mapper did not renew at half life"
    assert rule in r["rules_renewed"]
    assert r["inbound_renewed"], "no inbound connection after the renewal"
    if r["expiry_mapped"] is not None:      # miniupnpd writes leases with a time limit
        assert r["expiry_renewed"] is not None and r["expiry_renewed"] > r["expiry_mapped"], r
    assert rule not in r["rules_deleted"], r
    assert not r["leases_deleted"], r
    assert not r["inbound_deleted"], "the mapping still lets connections in after close()"
    assert r["pending"] == 0


def test_a_refusal_moves_on_to_the_next_protocol(lab: Lab) -> None:
    """PCP refuses a MAP whose client address is not the packet's source (ADDRESS_MISMATCH);
    the mapper moves on and NAT-PMP (which takes the source address) maps the port. When every
    protocol refuses, the error names each refusal; UPnP's secure mode refuses another host's
    mapping with 718, surfaced as PortMapError.code. (A PCP MAP for a port outside the allow
    rule made 2.3.1 stop answering altogether, so that refusal is not used here.)"""
    async def scenario() -> tuple[str, str, list[tuple[int, str, int]]]:
        gw = gateway_for(lab.server_ip)
        assert gw is not None
        mapper = PortMapper(gw, lab.private_ip("a"))
        try:
            await mapper.probe()
            mapper.local_ip = "10.0.1.77"          # what PCP's request claims, not our source
            m = await mapper.map(41000)
            mapper.local_ip = lab.private_ip("a")
            rules = lab.router("a").redirects()
            strict = PortMapper(gw, "10.0.1.77", protocols=("pcp",))
            strict._wire = mapper._wire              # the real source stays 10.0.1.2
            with pytest.raises(PortMapError) as info:
                await strict.map(41001)
            # UPnP's secure mode: a mapping for another LAN host is refused with 718.
            igd = await mapper.igd()
            with pytest.raises(PortMapError) as upnp_info:
                await igd.soap(await igd.wan(), "AddPortMapping", [
                    ("NewRemoteHost", ""), ("NewExternalPort", "41002"), ("NewProtocol", "TCP"),
                    ("NewInternalPort", "41002"), ("NewInternalClient", "10.0.1.77"),
                    ("NewEnabled", "1"), ("NewPortMappingDescription", "x"),
                    ("NewLeaseDuration", "60")])
            assert upnp_info.value.code == 718, upnp_info.value
            return m.protocol, str(info.value), rules
        finally:
            mapper.local_ip = lab.private_ip("a")
            await mapper.close()

    protocol, why, rules = in_netns(lab, "a", scenario)
    assert protocol == "nat-pmp"
    assert (41000, lab.private_ip("a"), 41000) in rules
    assert why.startswith("no protocol mapped the port: PCP: ") and "ADDRESS_MISMATCH" in why, why
    assert lab.router("a").redirects() == []


def test_a_router_that_answers_nothing_costs_at_most_300_ms() -> None:
    """No miniupnpd and every port-mapping datagram dropped at the router: the probe gives up
    within its budget, map() says so, and nothing is left to clean."""
    with Lab(a="port-restricted", b="none") as lab:
        drop = ("nft insert rule ip hpl_nat inp iifname lan udp dport { 1900, 5351 } drop").split()
        assert lab.run("nat_a", drop).returncode == 0

        async def scenario() -> tuple[float, str]:
            gw = gateway_for(lab.server_ip)
            assert gw is not None
            async with PortMapper(gw, lab.private_ip("a")) as mapper:
                t = time.monotonic()
                with pytest.raises(PortMapUnavailable) as info:
                    await mapper.map(41000)
                return time.monotonic() - t, str(info.value)

        elapsed, why = in_netns(lab, "a", scenario)
    assert elapsed < 0.3, elapsed
    assert "no port-mapping router answered" in why


def test_no_gateway_on_loopback() -> None:
    """On the host's loopback there is no router to ask: nothing is ever sent."""
    assert gateway_for("127.0.0.1") is None
    assert os.path.exists("/proc/net/route")


@pytest.mark.parametrize("protocol", ["pcp", "nat-pmp", "upnp"])
def test_router_reboot_mapping_is_made_again(lab: Lab, protocol: str) -> None:
    """miniupnpd restarted mid-session with its state lost (chains flushed, lease file gone,
    epoch back to 0): PCP/NAT-PMP see the epoch go back at the next check and re-create the
    mapping; UPnP (no epoch) gets it back at the next renewal. Checked by the rule and by a
    real inbound connection."""
    router = lab.router("a")

    async def scenario() -> dict[str, Any]:
        gw = gateway_for(lab.server_ip)
        assert gw is not None
        listener = make_listener()
        port = listener.getsockname()[1]
        lease = LEASE_S if protocol == "upnp" else 120
        mapper = PortMapper(gw, lab.private_ip("a"), protocols=(protocol,), lifetime=lease,
                            check_interval=0.5)
        out: dict[str, Any] = {}
        try:
            m = await mapper.map(port)
            sample = mapper._epochs.get(protocol)
            if sample is not None and sample.server_epoch < 4:   # a reboot must look like one
                await asyncio.sleep(4 - sample.server_epoch)
            await asyncio.to_thread(router.restart)
            out["rules_after_reboot"] = router.redirects()
            deadline = time.monotonic() + LEASE_S + 3
            rule = (m.external[1], lab.private_ip("a"), port)
            # The rule shows up while the renewal is still in flight: wait for its end too.
            while (rule not in router.redirects() or m.recreations + m.renewals == 0) \
                    and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            out["rules_back"] = router.redirects()
            out["rule"] = rule
            out["counts"] = (m.recreations, m.renewals)
            out["inbound"] = await accepts(lab, listener, m.external)
        finally:
            await mapper.close()
            listener.close()
        return out

    r = in_netns(lab, "a", scenario)
    assert r["rule"] not in r["rules_after_reboot"], "the reboot did not lose the mapping"
    assert r["rule"] in r["rules_back"], r
    recreations, renewals = r["counts"]
    if protocol == "upnp":
        assert renewals >= 1, r
    else:
        assert recreations >= 1, r
    assert r["inbound"], "no inbound connection through the re-created mapping"
    assert router.redirects() == []


SIGTERM_SCRIPT = """
import asyncio, sys, time
from pyholepunch.portmap import PortMapper, gateway_for
async def main():
    m = PortMapper(gateway_for(sys.argv[1]), sys.argv[2], protocols=(sys.argv[3],), lifetime=600)
    mapping = await m.map(int(sys.argv[4]))
    print("mapped", mapping.external[1], flush=True)
    await asyncio.sleep(60)
asyncio.run(main())
"""


@pytest.mark.parametrize("protocol", ["pcp", "upnp"])
def test_sigterm_leaves_no_mapping_behind(lab: Lab, protocol: str) -> None:
    """A process holding a mapping is killed by SIGTERM: its handler deletes the mapping
    before the process dies; the ruleset and lease file are empty afterwards."""
    import signal
    import subprocess
    import sys

    router = lab.router("a")
    proc = lab.spawn("a", [sys.executable, "-c", SIGTERM_SCRIPT, lab.server_ip, lab.private_ip("a"),
                           protocol, "43210"], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout is not None else ""
        assert line.startswith("mapped"), line
        assert (int(line.split()[1]), lab.private_ip("a"), 43210) in router.redirects()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == -signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    assert router.redirects() == []
    assert router.leases() == []


def test_nat_type_says_via_which_protocol(lab: Lab) -> None:
    """`pyholepunch nat-type` behind the mapping router: the TCP profile ends "via PCP" (the
    first protocol that granted a mapping, deleted right after), the JSON lists what answered;
    with --no-portmap nothing is asked. (Our STUN server for the routers' check serves here.)"""
    import json
    import sys

    from pyholepunch.lab.miniupnpd import STUN_PORT

    argv = [sys.executable, "-m", "pyholepunch", "nat-type", "--server",
            f"{lab.server_ip}:{STUN_PORT}", "--transport", "tcp", "--json"]
    out = lab.run("a", argv, timeout=30)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    tcp = doc["profiles"]["ipv4"]["tcp"]
    assert tcp["mapped_by"] == "PCP" and tcp["label"] == "port-restricted (preserving) via PCP", tcp
    assert tcp["port_mapping"][0] == lab.public_ip("a")
    assert doc["portmap"] == {"gateway": "10.0.1.1", "available": ["pcp", "nat-pmp", "upnp"],
                              "mapped_by": "PCP"}
    assert lab.router("a").redirects() == []
    off = json.loads(lab.run("a", argv + ["--no-portmap"], timeout=30).stdout)
    assert off["portmap"] is None and off["profiles"]["ipv4"]["tcp"]["port_mapping"] is None


def _enable_ipv6(lab: Lab) -> tuple[str, str]:
    """IPv6 on a's LAN only (fd00:1::/64; the lab itself is IPv4): the router's and a's
    addresses. miniupnpd's IPv6 side is switched on by a restart with ipv6_disable=no."""
    cmds = {"nat_a": ["sysctl -qw net.ipv6.conf.all.disable_ipv6=0 net.ipv6.conf.lan.disable_ipv6=0 "
                      "net.ipv6.conf.wan.disable_ipv6=0 net.ipv6.conf.all.forwarding=1",
                      "ip -6 addr add fd00:1::1/64 dev lan nodad",
                      "ip -6 addr add 2001:db8:1::2/64 dev wan nodad"],
            "a": ["sysctl -qw net.ipv6.conf.all.disable_ipv6=0 net.ipv6.conf.eth0.disable_ipv6=0",
                  "ip -6 addr add fd00:1::2/64 dev eth0 nodad",
                  "ip -6 route add default via fd00:1::1"]}
    for node, lines in cmds.items():
        for line in lines:
            r = lab.run(node, ["sh", "-c", line])
            assert r.returncode == 0, (node, line, r.stderr)
    router = lab.router("a")
    router.stop()
    router.write_config(ipv6=True)
    router.start()
    return "fd00:1::1", "fd00:1::2"


def _pinholes(lab: Lab, port: int) -> list[str]:
    """miniupnpd's IPv6 pinhole rules for ``port`` to fd00:1::2 (it matches the address as
    raw header bytes: ``@nh,192,128 0xfd00...0002``)."""
    return [line.strip() for line in lab.router("a").ruleset().splitlines()
            if f"dport {port} " in line and "0xfd000001000000000000000000000002" in line]


def test_ipv6_pinholes_upnp_and_pcp() -> None:
    """IPv6 pinholes through the real miniupnpd 2.3.1: UPnP WANIPv6FirewallControl AddPinhole /
    UpdatePinhole / DeletePinhole (over IPv6: secure mode refuses an IPv4 control point with
    606) and a PCP MAP for an IPv6 address, each checked in the router's ruleset. The lab has
    no IPv6 path from the server host, so no inbound IPv6 connection is tried: the rule is
    the evidence here."""
    from pyholepunch.portmap.igd import Igd

    with Lab(a="port-restricted", b="none", portmap_a=True) as lab:
        router_v6, a_v6 = _enable_ipv6(lab)

        async def scenario() -> dict[str, Any]:
            out: dict[str, Any] = {}
            igd = Igd(router_v6, a_v6, f"http://[{router_v6}]:5555/rootDesc.xml")
            uid = await igd.add_pinhole((a_v6, 45000), "tcp", 60)
            out["added"] = _pinholes(lab, 45000)
            await igd.update_pinhole(uid, 120)
            out["updated"] = _pinholes(lab, 45000)
            await igd.delete_pinhole(uid)
            out["deleted"] = _pinholes(lab, 45000)
            v4 = Igd("10.0.1.1", lab.private_ip("a"), "http://10.0.1.1:5555/rootDesc.xml")
            with pytest.raises(PortMapError) as info:
                await v4.add_pinhole((a_v6, 45001), "tcp", 60)
            out["v4_refused"] = info.value.code
            async with PortMapper(router_v6, a_v6, protocols=("pcp",), lifetime=60) as mapper:
                m = await mapper.map(45002)
                out["pcp"] = (m.external, _pinholes(lab, 45002))
            out["pcp_deleted"] = _pinholes(lab, 45002)
            return out

        r = in_netns(lab, "a", scenario)
    assert len(r["added"]) == 1 and r["updated"] == r["added"], r
    assert r["deleted"] == [] and r["v4_refused"] == 606, r
    external, rules = r["pcp"]
    assert external[1] == 45002 and len(rules) == 1, r
    assert r["pcp_deleted"] == [], r
