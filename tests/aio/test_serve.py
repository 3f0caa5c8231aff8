"""`pyholepunch serve`: TLS signaling, STUN (TCP + UDP) and the built-in relay behind one port."""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pyholepunch.identity import Identity
from pyholepunch.relay.builtin import open_builtin_relay
from pyholepunch.serve import Rendezvous
from pyholepunch.signal.client import SignalClient
from pyholepunch.signal.protocol import ErrorCode
from pyholepunch.signal.server import ServerConfig
from pyholepunch.stun.codec import AttrType, MessageClass, StunMessage, binding_request

CFG = ServerConfig(sync_pings=2, keepalive=3600)


async def http_get(port: int, path: str = "/metrics") -> tuple[int, dict]:  # type: ignore[type-arg]
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(f"GET {path} HTTP/1.0\r\n\r\n".encode())
    raw = await asyncio.wait_for(r.read(), 5)
    w.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


async def stun_tcp(addr: tuple[str, int]) -> StunMessage:
    r, w = await asyncio.open_connection(*addr)
    req = binding_request(os.urandom(12))
    w.write(req.encode())
    head = await asyncio.wait_for(r.readexactly(20), 5)
    body = await asyncio.wait_for(r.readexactly(int.from_bytes(head[2:4], "big")), 5)
    w.close()
    resp = StunMessage.parse(head + body)
    assert resp.transaction_id == req.transaction_id
    return resp


def prometheus_samples(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """A scrape of ``url``, parsed by prometheus_client: (name, sorted labels) -> value."""
    with urllib.request.urlopen(url, timeout=10) as response:   # noqa: S310 - loopback
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def serve_process(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "pyholepunch", "serve", "--listen",
                             "127.0.0.1:0", "--no-stun", "--no-relay", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_metrics_port_is_a_deprecated_alias_of_metrics() -> None:
    proc = serve_process("--metrics-port", "0")
    try:
        assert proc.stdout is not None and proc.stderr is not None
        lines = [proc.stdout.readline() for _ in range(3)]
        url = re.search(r"prometheus metrics (http://127\.0\.0\.1:\d+/metrics)", lines[2])
        assert url is not None, lines
        assert ("pyholepunch_server_registrations_total", ()) in prometheus_samples(url.group(1))
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert "--metrics-port is deprecated and will go: use --metrics 127.0.0.1:0" in err


def test_metrics_port_with_metrics_is_a_usage_error() -> None:
    proc = serve_process("--metrics-port", "0", "--metrics", "127.0.0.1:0")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and "give --metrics alone" in err and out == ""


def stun_udp(addr: tuple[str, int]) -> StunMessage:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(3)
        s.bind(("127.0.0.1", 0))
        req = binding_request(os.urandom(12))
        s.sendto(req.encode(), addr)
        resp = StunMessage.parse(s.recv(2048))
        assert resp.transaction_id == req.transaction_id
        return resp


@pytest.mark.asyncio
async def test_one_port_serves_signaling_stun_and_relay() -> None:
    async with Rendezvous(("127.0.0.1", 0), metrics_port=0, config=CFG) as app:
        a = SignalClient(app.address, Identity.generate(), name="alice",
                         server_fingerprint=app.fingerprint)
        b = SignalClient(app.address, Identity.generate(), name="bob",
                         server_fingerprint=app.fingerprint)
        async with a, b:
            p = await a.connect("bob")
            await b.next_event(5)
            ga = await a.request_relay(p.session)
            gb = await b.next_event(5)
            assert ga.relay == gb.relay == app.address
            (ra, wa), (rb, wb) = await asyncio.gather(
                open_builtin_relay(ga.relay, ga.token, timeout=5),
                open_builtin_relay(gb.relay, gb.token, timeout=5))   # type: ignore[union-attr]
            wb.write(b"through the relay")
            assert await asyncio.wait_for(ra.readexactly(17), 5) == b"through the relay"
            wa.close()
            wb.close()
            await a.report_result(p.session, "relay")

            resp = await stun_tcp(app.address)
            assert resp.cls is MessageClass.SUCCESS
            assert resp.mapped_address is not None and resp.mapped_address[0] == "127.0.0.1"
            udp = await asyncio.to_thread(stun_udp, app.address)
            assert udp.mapped_address is not None and udp.mapped_address[0] == "127.0.0.1"

            # garbage first bytes: dropped, the port keeps working
            r, w = await asyncio.open_connection(*app.address)
            w.write(b"GET / HTTP/1.1\r\n\r\n")
            try:       # closed unread: EOF or RST, never an answer
                assert await asyncio.wait_for(r.read(), 5) == b""
            except ConnectionResetError:
                pass
            w.close()

            await asyncio.sleep(0.05)
            status, m = await http_get(app.metrics_port)   # type: ignore[arg-type]
            assert status == 200
            assert m["signal"]["registrations"] == 2 and m["signal"]["punches"] == 1
            assert m["signal"]["relays"] == 1 and m["signal"]["relayed"] == 1
            assert m["demux"] == {"tls": 2, "stun": 1, "relay": 2, "unknown": 1}
            assert m["relay"]["relays_total"] == 1 and m["stun"]["udp_in"] == 1
            assert (await http_get(app.metrics_port, "/nope"))[0] == 404   # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_alt_ip_gives_rfc5780_port_set() -> None:
    async with Rendezvous(("127.0.0.1", 0), alt_ip="127.0.0.2", config=CFG, relay=False) as app:
        host, port = app.address
        udp = await asyncio.to_thread(stun_udp, (host, port))
        other = udp.get(AttrType.OTHER_ADDRESS)
        assert other is not None and other[0] == "127.0.0.2" and other[1] != port
        for addr in ((host, port), ("127.0.0.2", port), (host, other[1]), other):
            resp = await stun_tcp(addr)                         # all four TCP listeners demux
            assert resp.cls is MessageClass.SUCCESS, addr
        c = SignalClient(other, Identity.generate(), name="x", server_fingerprint=app.fingerprint)
        async with c:
            assert c.registrations == 1


def test_cli_serve_process(tmp_path: Path) -> None:
    """The real command: prints address + fingerprint, writes the state dir, stops on SIGTERM."""
    state = tmp_path / "state"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyholepunch", "serve", "--listen", "127.0.0.1:0",
         "--state-dir", str(state), "--metrics", "127.0.0.1:0", "--token", "s3cret"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(3)]
        port = int(re.search(r"on 127\.0\.0\.1:(\d+)", lines[0]).group(1))  # type: ignore[union-attr]
        fp = re.search(r"sha256 ([0-9a-f]{64})", lines[1]).group(1)  # type: ignore[union-attr]
        metrics_url = re.search(r"prometheus metrics (http://\S+/metrics)", lines[2]).group(1)  # type: ignore[union-attr]
        assert (state / "server.fingerprint").read_text().strip() == fp
        assert (state / "server.key").stat().st_mode & 0o777 == 0o600

        async def scenario() -> None:
            c = SignalClient(("127.0.0.1", port), Identity.generate(), name="zed",
                             server_fingerprint=fp, reconnect=False)
            with pytest.raises(Exception) as e:
                await c.start()
            assert getattr(e.value, "code", None) == ErrorCode.TOKEN_REQUIRED
            issued = subprocess.run(
                [sys.executable, "-m", "pyholepunch", "serve", "--token", "s3cret", "--issue-token", "60"],
                capture_output=True, text=True, check=True, timeout=30).stdout.strip()
            assert issued.startswith("hp1.")
            async with SignalClient(("127.0.0.1", port), Identity.generate(), name="zed",
                                    server_fingerprint=fp, token=issued):
                m = await asyncio.to_thread(prometheus_samples, metrics_url)
                assert m[("pyholepunch_server_registrations_total", ())] == 1
                assert m[("pyholepunch_server_refusals_total",
                          (("reason", "TOKEN_REQUIRED"),))] == 1
        asyncio.run(scenario())
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    assert proc.returncode == 0, err
    assert "registered zed" in err            # one INFO line per registration
