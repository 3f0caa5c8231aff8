"""`connect` and `listen` move bytes like netcat: real processes, real pipes, real files.

Each case runs a `listen` and a `connect` against one real `pyholepunch serve` on loopback and
checks: sha256 equal, both processes exit 0, the transfer report adds up. 20 MB covers the
matrix (stdin kinds, directions, engines, TLS or --insecure-plain); 200 MB runs a few
representative cases, timed against a plain copy of the same bytes between two processes.
"""
from __future__ import annotations

import os
import pty
import resource
import subprocess
from pathlib import Path

import pytest

from .helpers import (
    Server,
    cli,
    json_lines,
    listener,
    plain_copy_seconds,
    plain_tls_copy_seconds,
    run,
    sha256_file,
    transfer_of,
)

pytestmark = pytest.mark.timeout(180)
MB = 1_000_000


def _connect(server: Server, home: Path, me: str, peer: str, *extra: str, stdin: object,
             stdout: object = subprocess.PIPE, shell_pipe: Path | None = None
             ) -> subprocess.CompletedProcess[bytes]:
    argv = cli("connect", *server.peer_args(me, home), "--json", *extra, peer)
    if shell_pipe is not None:       # `cat FILE | pyholepunch connect ...`
        cat = subprocess.Popen(["cat", str(shell_pipe)], stdout=subprocess.PIPE)
        try:
            return run(argv, stdin=cat.stdout, stdout=stdout, stderr=subprocess.PIPE, capture_output=False)
        finally:
            assert cat.stdout is not None
            cat.stdout.close()
            assert cat.wait(30) == 0
    return run(argv, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE, capture_output=False)


def _finish(proc: subprocess.Popen[bytes]) -> bytes:
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return err


CASES = [
    # (id, engine, extra flags, how connect's stdin is fed, listen mode)
    ("file-to-file", "native", (), "file", "stdout"),
    ("file-to-file-pure", "pure", (), "file", "stdout"),
    ("cat-to-exec-sha256sum", "native", (), "cat", "exec"),
    ("cat-to-exec-pure", "pure", (), "cat", "exec"),
    ("devnull-reverse", "native", (), "devnull", "stdout"),
    ("both-ways", "pure", (), "file", "both"),
    ("plain-cat-both-ways", "pure", ("--insecure-plain",), "cat", "both"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_transfer_20mb(case: tuple[str, str, tuple[str, ...], str, str], server: Server,
                       files: dict[str, tuple[Path, str]], names: tuple[str, str],
                       tmp_path: Path) -> None:
    _, engine, extra, feed, mode = case
    bob, alice = names
    flags = ("--engine", engine, *extra)
    a_path, a_sum = files["a20"]
    b_path, b_sum = files["b20"]
    got_b = tmp_path / "at-bob"
    got_a = tmp_path / "at-alice"
    listen_args: list[str] = [*flags, "--json"]
    listen_stdin: object = subprocess.DEVNULL
    if mode == "exec":
        listen_args += ["--exec", "sha256sum", "--once"]
    elif mode == "both" or feed == "devnull":     # devnull: only bob sends
        listen_stdin = open(b_path, "rb")
    with open(got_b, "wb") as bob_out, listener(server, tmp_path, *listen_args, name=bob,
                                                 stdin=listen_stdin, stdout=bob_out) as lproc:
        with open(a_path, "rb") as src, open(got_a, "wb") as alice_out:
            if feed == "devnull":
                stdin: object = subprocess.DEVNULL
            else:
                stdin = src
            r = _connect(server, tmp_path, alice, bob, *flags, stdin=stdin, stdout=alice_out,
                         shell_pipe=a_path if feed == "cat" else None)
        assert r.returncode == 0, r.stderr.decode(errors="replace")[-2000:]
        lerr = _finish(lproc)
    if hasattr(listen_stdin, "close"):
        listen_stdin.close()  # type: ignore[attr-defined]
    mine, theirs = transfer_of(r.stderr), transfer_of(lerr)
    sent = 0 if feed == "devnull" else 20 * MB
    assert mine["sent_bytes"] == theirs["received_bytes"] == sent
    if mode == "exec":          # sha256sum's answer came back as alice's output
        assert got_a.read_text().split()[0] == a_sum
    else:
        if sent:
            assert sha256_file(got_b) == a_sum
        if mode == "both" or feed == "devnull":
            assert sha256_file(got_a) == b_sum
            assert mine["received_bytes"] == 20 * MB
        else:
            assert got_a.read_bytes() == b""
    report = [d["report"] for d in json_lines(r.stderr) if "report" in d][0]
    assert report["route"] == "direct" and report["tls"] is ("--insecure-plain" not in extra)


def test_tty_stdin(server: Server, names: tuple[str, str], tmp_path: Path) -> None:
    """stdin a terminal: typed lines go over, Ctrl-D ends the stream like a file's end."""
    bob, alice = names
    got = tmp_path / "got"
    primary, secondary = pty.openpty()
    try:
        with open(got, "wb") as out, listener(server, tmp_path, name=bob, stdout=out) as lproc:
            proc = subprocess.Popen(cli("connect", *server.peer_args(alice, tmp_path), bob),
                                    stdin=secondary, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            os.write(primary, b"typed line\n\x04")    # Ctrl-D at a line start: end of input
            out_a, err_a = proc.communicate(timeout=60)
            assert proc.returncode == 0, err_a
            _finish(lproc)
    finally:
        os.close(primary)
        os.close(secondary)
    assert got.read_bytes() == b"typed line\n" and out_a == b""


def test_echo(server: Server, names: tuple[str, str], tmp_path: Path) -> None:
    bob, alice = names
    data = os.urandom(300_000)
    with listener(server, tmp_path, "--echo", "--once", name=bob) as lproc:
        r = run(cli("connect", *server.peer_args(alice, tmp_path), bob), input=data)
        assert r.returncode == 0, r.stderr
        _finish(lproc)
    assert r.stdout == data


def _timed_200mb(server: Server, files: dict[str, tuple[Path, str]], names: tuple[str, str],
                 tmp_path: Path, extra: tuple[str, ...], feed: str,
                 got: Path | None = None) -> tuple[float, float, float]:
    """Wall seconds of the transfer (connect's view) and the CPU seconds connect and listen
    each spent; the listener writes into ``got`` (default: a new file under ``tmp_path``)."""
    bob, alice = names
    path, digest = files["big"]
    tmp_path.mkdir(exist_ok=True)
    got = got or tmp_path / "got"
    with open(got, "wb") as out, listener(server, tmp_path, "--json", *extra, name=bob,
                                          stdout=out) as lproc:
        with open(path, "rb") as src:
            r = _connect(server, tmp_path, alice, bob, *extra, stdin=src,
                         shell_pipe=path if feed == "cat" else None)
        assert r.returncode == 0, r.stderr.decode(errors="replace")[-2000:]
        lerr = _finish(lproc)
    assert sha256_file(got) == digest
    mine, theirs = transfer_of(r.stderr), transfer_of(lerr)
    assert mine["sent_bytes"] == theirs["received_bytes"] == 200 * MB
    return float(mine["seconds"]), float(mine["cpu_seconds"]), float(theirs["cpu_seconds"])


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@pytest.mark.parametrize("extra,feed", [((), "file"), (("--insecure-plain",), "cat")],
                         ids=["tls-file", "plain-cat"])
def test_200mb_within_twice_a_plain_copy(extra: tuple[str, ...], feed: str, server: Server,
                                                files: dict[str, tuple[Path, str]],
                                                names: tuple[str, str], tmp_path: Path) -> None:
    """200 MB arrive intact, and both sides together spend at most twice the CPU time of a
    plain copy of the same bytes between two processes into the same output file (a TCP copy
    for --insecure-plain, a TLS 1.3 copy with our certificates for the encrypted stream). Best
    of two, interleaved. The wall times are printed, not asserted: on this shared 2-core
    machine they swing 3-10x with the neighbours' load (bench/bench_cli_transfer.py asserts
    them, best of three)."""
    path, _ = files["big"]
    ours, base = [], []
    for i in range(2):          # interleaved, best of two: the neighbours' load comes and goes
        cpu = _children_cpu()
        copy = plain_copy_seconds if extra else plain_tls_copy_seconds
        wall = copy(path, tmp_path / "copy")
        base.append((_children_cpu() - cpu, wall))
        bob, alice = names
        seconds, cpu_c, cpu_l = _timed_200mb(server, files, (f"{bob}r{i}", f"{alice}r{i}"),
                                             tmp_path / str(i), extra, feed,
                                             got=tmp_path / "copy")   # the same output file
        ours.append((cpu_c + cpu_l, seconds))
    ours_wall, base_wall = min(w for _, w in ours), min(w for _, w in base)
    ours_cpu, base_cpu = min(c for c, _ in ours), min(c for c, _ in base)
    print(f"\n200 MB {' '.join(extra) or 'TLS'} via {feed}: {ours_wall:.3f} s "
          f"({200 / ours_wall:.0f} MB/s), {ours_cpu:.2f} CPU s; plain copy {base_wall:.3f} s "
          f"({200 / base_wall:.0f} MB/s), {base_cpu:.2f} CPU s")
    assert ours_cpu <= 2 * base_cpu, (ours, base)


def test_200mb_cat_to_exec_sha256sum(server: Server, files: dict[str, tuple[Path, str]],
                                     names: tuple[str, str], tmp_path: Path) -> None:
    bob, alice = names
    path, digest = files["big"]
    with listener(server, tmp_path, "--exec", "sha256sum", "--once", name=bob) as lproc:
        r = _connect(server, tmp_path, alice, bob, stdin=None, shell_pipe=path)
        assert r.returncode == 0, r.stderr.decode(errors="replace")[-2000:]
        _finish(lproc)
    assert r.stdout.split()[0].decode() == digest
