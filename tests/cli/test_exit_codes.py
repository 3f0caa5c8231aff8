"""The README's exit-code table, one row at a time, and the ways a transfer can go wrong.

Every row of the table is read from README.md and must have a scenario here that produces
that code with the real command (a row without one fails the test).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from .helpers import Server, cli, listener, run, wait_line

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_exit_codes() -> dict[int, str]:
    text = README.read_text()
    table = text.split("<!-- exit-codes -->")[1]
    rows = re.findall(r"^\| `(\d+)` \| ([^|]+) \|", table, re.MULTILINE)
    assert rows, "no exit-code table in README.md"
    return {int(code): meaning.strip() for code, meaning in rows}


def _one_line(stderr: bytes) -> str:
    lines = stderr.decode().strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in lines[0]
    return lines[0]


def ok(server: Server, tmp: Path) -> None:
    with listener(server, tmp, "--echo", "--once", name="row0-bob") as lproc:
        r = run(cli("connect", *server.peer_args("row0-alice", tmp), "row0-bob"), input=b"hi\n")
        assert (r.returncode, r.stdout) == (0, b"hi\n"), r.stderr
        assert lproc.wait(30) == 0


def failed(server: Server, tmp: Path) -> None:
    r = run(cli("connect", *server.peer_args("row1-alice", tmp), "nobody-online"),
            stdin=subprocess.DEVNULL)
    assert r.returncode == 1
    assert "nobody-online" in _one_line(r.stderr)


def usage(server: Server, tmp: Path) -> None:
    cases = [
        cli("connect", "--server", "127.0.0.1:99999", "--name", "a", "bob"),
        cli("connect", "--server", "2001:db8::1:3478", "bob"),
        cli("connect", "--server", server.address, "--timeout", "-1", "bob"),
        cli("connect", "--server", server.address, "--relay", "turn:", "bob"),
        cli("connect", "--server", server.address),
        cli("listen", "--server", server.address, "--echo", "--exec", "cat"),
        cli("nat-type", "--server", "h:x"),
        cli("serve", "--alt-ip", "127.0.0.2"),
        cli("serve", "--listen", "127.0.0.1:0", "--alt-ip", "0.0.0.0"),
        cli("serve", "--issue-token", "60"),
        cli("serve", "--relay-secret", "short"),
        cli("serve", "--relay-secret", "x" * 16, "--no-relay"),
        cli("serve", "--relay-secret-file", str(tmp / "no-such-file")),
        cli("--log-format", "xml", "serve"),
        cli("no-such-command"),
    ]
    env = os.environ | {"PYHOLEPUNCH_TOKEN": "", "PYHOLEPUNCH_RELAY_SECRET": ""}
    procs = [(argv, subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env)) for argv in cases]
    for argv, proc in procs:          # all at once: each is a Python start-up, nothing more
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 2, (argv, err)
        assert "error" in _one_line(err), argv


def unsupported(server: Server, tmp: Path) -> None:
    r = run(cli("lab", "verify"), env=os.environ | {"PATH": str(tmp / "empty")})
    assert r.returncode == 3, r.stderr
    assert "needs" in _one_line(r.stderr)


def timeout(server: Server, tmp: Path) -> None:
    with listener(server, tmp, "--once", name="row4-bob"):
        r = run(cli("connect", *server.peer_args("row4-alice", tmp), "--timeout", "0.001",
                    "row4-bob"), stdin=subprocess.DEVNULL)
    assert r.returncode == 4, r.stderr
    assert "timed out" in _one_line(r.stderr)


def interrupted(server: Server, tmp: Path) -> None:
    proc = subprocess.Popen(cli("serve", "--listen", "127.0.0.1:0", "--state-dir", str(tmp / "s")),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        wait_line(proc.stdout, b"fingerprint", 30, proc)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert b"Traceback" not in err


SCENARIOS: dict[int, Callable[[Server, Path], None]] = {
    0: ok, 1: failed, 2: usage, 3: unsupported, 4: timeout, 130: interrupted}


@pytest.mark.parametrize("code", sorted(readme_exit_codes()))
def test_readme_exit_code_row(code: int, server: Server, tmp_path: Path) -> None:
    assert code in SCENARIOS, f"README lists exit code {code} but no test produces it"
    SCENARIOS[code](server, tmp_path)


def test_every_scenario_is_a_readme_row() -> None:
    assert set(SCENARIOS) == set(readme_exit_codes())


@pytest.mark.parametrize("victim", ["listen", "connect"])
@pytest.mark.parametrize("plain", [False, True], ids=["tls", "insecure-plain"])
def test_peer_killed_mid_transfer(victim: str, plain: bool, server: Server, tmp_path: Path,
                                  names: tuple[str, str]) -> None:
    """SIGKILL one side while bytes flow: the other exits 1 with a message, never 0."""
    bob, alice = names
    extra = ["--insecure-plain"] if plain else []
    lproc = subprocess.Popen(cli("listen", *server.peer_args(bob, tmp_path), *extra),
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    cproc = None
    try:
        assert lproc.stderr is not None and lproc.stdout is not None and lproc.stdin is not None
        wait_line(lproc.stderr, b"listening", 30, lproc)
        cproc = subprocess.Popen(cli("connect", *server.peer_args(alice, tmp_path), *extra, bob),
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert cproc.stdin is not None and cproc.stdout is not None
        # alice -> bob: 1 MB arrives at bob's stdout, with both stdins still open
        cproc.stdin.write(os.urandom(1 << 20))
        cproc.stdin.flush()
        got = 0
        while got < 1 << 20:
            chunk = lproc.stdout.read1(1 << 20)
            assert chunk, lproc.stderr.read()
            got += len(chunk)
        killed, survivor = (lproc, cproc) if victim == "listen" else (cproc, lproc)
        killed.kill()
        killed.wait(10)
        t = time.monotonic()
        _, err = survivor.communicate(timeout=30)
        took = time.monotonic() - t
    finally:
        for p in (lproc, cproc):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    assert survivor.returncode == 1, err
    line = err.decode().strip().splitlines()[-1]     # (--insecure-plain also logs its warning)
    assert line.startswith(f"pyholepunch {'connect' if victim == 'listen' else 'listen'}: "), err
    assert "before its end-of-stream" in line or "broke" in line, line
    assert took < 10, took


def test_a_failing_exec_command_fails_both_sides(server: Server, tmp_path: Path,
                                                 names: tuple[str, str]) -> None:
    """`listen --exec` whose command exits 3: the peer is told (an error frame) and both exit 1,
    each saying which command failed; a command that stops reading early is a loss too."""
    bob, alice = names
    # (a command that exits without reading is caught either way: by its exit status or by
    # the write that found its input closed, whichever the two processes' timing shows first)
    for command, says in (("exit 3", "command 'exit 3'"),
                          ("head -c 10 >/dev/null", "stopped reading its input")):
        with listener(server, tmp_path, "--exec", command, "--once", name=bob) as lproc:
            r = run(cli("connect", *server.peer_args(alice, tmp_path), bob),
                    input=os.urandom(8 << 20))
            _, lerr = lproc.communicate(timeout=30)
        assert r.returncode == 1 and lproc.returncode == 1, (r.stderr, lerr)
        assert says in _one_line(r.stderr), r.stderr
        assert says in lerr.decode().strip().splitlines()[-1], lerr
