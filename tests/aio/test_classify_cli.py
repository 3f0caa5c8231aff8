"""`pyholepunch nat-type` against a standalone `python -m pyholepunch.stun` process."""
from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator

import pytest

from pyholepunch.cli import nat as nat_cli
from pyholepunch.cli.args import address


def main(argv: list[str]) -> int:
    """`pyholepunch nat-type ...` through this command's own configure/run (the top-level
    parser imports every sub-command, some of which other engineers are still writing)."""
    parser = argparse.ArgumentParser()
    nat_cli.configure(parser)
    assert argv[0] == "nat-type"
    return asyncio.run(nat_cli.run(parser.parse_args(argv[1:])))


@pytest.fixture
def stun_process() -> Iterator[tuple[str, int]]:
    proc = subprocess.Popen([sys.executable, "-m", "pyholepunch.stun", "--listen", "127.0.0.1:0",
                             "--alt-ip", "127.0.0.2"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        assert line[0] == "ready", line
        host, port = line[1].rsplit(":", 1)
        assert line[2:4] == ["other", f"127.0.0.2:{line[3].rsplit(':', 1)[1]}"]
        yield host, int(port)
    finally:
        proc.terminate()
        proc.wait(10)


def test_json_schema(stun_process: tuple[str, int], capsys: pytest.CaptureFixture[str]) -> None:
    host, port = stun_process
    rc = main(["nat-type", "--server", f"{host}:{port}", "--local-ip", "127.0.0.1", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert doc["schema"] == 2 and set(doc["profiles"]) == {"ipv4"}   # a one-family server
    assert set(doc["profiles"]["ipv4"]) == set(doc["seconds"]["ipv4"]) == {"udp", "tcp"}
    assert doc["servers"] == {"ipv4": f"{host}:{port}"}
    tcp = doc["profiles"]["ipv4"]["tcp"]
    assert {"transport", "mapping", "filtering", "allocation", "delta", "hairpin", "unsolicited_syn",
            "public_ips", "local_ips", "confidence", "not_learned", "server", "nat_type",
            "label", "family"} <= set(tcp)
    assert tcp["nat_type"] == "open" and tcp["unsolicited_syn"] == "accept"
    assert tcp["family"] == "ipv4"


def test_json_has_a_profile_per_family_against_a_dual_stack_server(
        capsys: pytest.CaptureFixture[str]) -> None:
    """Given the IPv4 address of a dual-stack `serve`, nat-type learns its IPv6 address from
    the server (OTHER-FAMILY-ADDRESS) and classifies both families."""
    proc = subprocess.Popen([sys.executable, "-m", "pyholepunch", "serve", "--listen", "127.0.0.1:0",
                             "--listen", "[::1]:0", "--no-relay", "--quiet"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("pyholepunch serve on "), line
        v4, _, v6 = line.split()[3:6]
        rc = main(["nat-type", "--server", v4, "--transport", "tcp", "--json"])
    finally:
        proc.terminate()
        proc.wait(10)
    doc = json.loads(capsys.readouterr().out)
    assert rc == 0 and doc["schema"] == 2
    assert doc["servers"] == {"ipv4": v4, "ipv6": v6}
    v6tcp = doc["profiles"]["ipv6"]["tcp"]
    assert v6tcp["family"] == "ipv6" and v6tcp["public_ips"] == ["::1"]
    assert v6tcp["nat_type"] == "open" and doc["profiles"]["ipv4"]["tcp"]["nat_type"] == "open"


def test_human_table(stun_process: tuple[str, int], capsys: pytest.CaptureFixture[str]) -> None:
    host, port = stun_process
    rc = main(["nat-type", "--server", f"{host}:{port}", "--transport", "udp", "--local-ip", "127.0.0.1"])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.splitlines()[0].split() == ["UDP"]
    assert "NAT type" in out and "open" in out and "unsolicited SYN  n/a" in out


def test_unreachable_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as hole:
        hole.bind(("127.0.0.1", 0))
        rc = main(["nat-type", "--server", f"127.0.0.1:{hole.getsockname()[1]}", "--transport", "udp",
                   "--timeout", "0.3"])
    assert rc == 1
    assert "no UDP answer" in capsys.readouterr().out


def test_parse_hostport() -> None:
    parse_hostport = address(3478)
    assert parse_hostport("example.org") == ("example.org", 3478)
    assert parse_hostport("1.2.3.4:5") == ("1.2.3.4", 5)
    assert parse_hostport("[2001:db8::1]:99") == ("2001:db8::1", 99)
    for bad, msg in [("1.2.3.4:0", "bad port"), ("[::1", "missing"), (":5", "no host"),
                     ("h:x", "bad port")]:
        with pytest.raises(argparse.ArgumentTypeError, match=msg):
            parse_hostport(bad)
