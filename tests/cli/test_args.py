"""Global flags anywhere, --json streams that hold JSON only, --json-file apart."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

from pyholepunch.cli import build_parser

from .helpers import Server, cli, json_lines, listener, run


def test_global_flags_before_or_after_the_command() -> None:
    parser = build_parser()
    for argv, verbose in ((["-v", "-v", "--log-format", "json", "serve"], 2),
                          (["serve", "-vv", "--log-format", "json"], 2),
                          (["--log-format", "text", "serve", "-v", "--log-format", "json"], 1)):
        args = parser.parse_args(argv)
        assert (args.verbose, args.log_format) == (verbose, "json"), argv
    args = parser.parse_args(["connect", "--server", "127.0.0.1:1", "-q", "bob"])
    assert (args.quiet, args.verbose, args.log_format, args.peer) == (1, 0, "text", "bob")


def test_json_is_a_flag_not_a_file() -> None:
    """`connect --json bob` connects to bob (it once wrote a file named bob)."""
    args = build_parser().parse_args(["connect", "--server", "h:1", "--json", "bob"])
    assert args.peer == "bob" and args.json is True and args.json_file is None


def test_json_stream_holds_json_only(server: Server, tmp_path: Path, names: tuple[str, str]) -> None:
    """No pinned fingerprint: the trust-on-first-use warning is logged, as JSON, on the same
    stream as the report; every line parses. --json-file gets the report (and transfer)."""
    bob, alice = names
    with listener(server, tmp_path, "--echo", "--once", name=bob) as lproc:
        argv = [a for a in server.peer_args(alice, tmp_path) if a != server.fingerprint
                and a != "--server-fingerprint"]
        r = run(cli("connect", *argv, "--json", "--json-file", str(tmp_path / "r.json"), "-v", bob),
                input=b"x")
        assert r.returncode == 0, r.stderr
        assert lproc.wait(30) == 0
    docs = json_lines(r.stderr)
    logs = [d for d in docs if "level" in d]
    assert any("trusting new rendezvous server" in d["message"] and d["level"] == "warning"
               for d in logs), docs
    assert any(d["level"] == "info" for d in logs)                 # -v after the command
    report = next(d["report"] for d in docs if "report" in d)
    transfer = next(d["transfer"] for d in docs if "transfer" in d)
    assert report["route"] == "direct" and transfer["sent_bytes"] == 1
    on_disk = json.loads((tmp_path / "r.json").read_text())
    assert on_disk["route"] == "direct" and on_disk["transfer"] == transfer
    assert r.stdout == b"x"


def test_log_format_json_for_serve(tmp_path: Path) -> None:
    proc = subprocess.Popen(cli("serve", "--listen", "127.0.0.1:0", "--log-format", "json",
                                "--state-dir", str(tmp_path / "s"), "--json"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        doc = json.loads(proc.stdout.readline())
        assert set(doc) >= {"listen", "fingerprint", "services"}
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert out == b""
    lines = json_lines(err)
    assert lines and all({"time", "level", "logger", "message"} <= set(d) for d in lines)


def test_nat_type_json_is_only_json(server: Server) -> None:
    r = run(cli("nat-type", "--server", server.address, "--transport", "tcp", "--json",
                "--local-ip", "127.0.0.1", "-v"))
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["schema"] == 2 and doc["profiles"]["ipv4"]["tcp"]["nat_type"] == "open"
