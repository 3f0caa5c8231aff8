"""Every example in README.md and docs/ runs, as written, against a real `pyholepunch serve`.

```python blocks run as scripts (each in a fresh directory, the server's address put in place
of 127.0.0.1:3478); ```sh blocks of docs/cli.md run under bash the same way; ```text blocks
are formats and transcripts, not run; docs/api.md's examples need `pyholepunch api` and are
tests/api's. The README's two-peer script is also checked with
`mypy --strict`, as a user's script would be. And no document points outside the repository.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import Server, running_server

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# docs/api.md (the HTTP API) is run by tests/api: its examples need a running `pyholepunch api`.
RUN = [doc for doc in DOCS if doc.name != "api.md"]
PLACEHOLDER = "127.0.0.1:3478"
FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.MULTILINE | re.DOTALL)
LAB_ONLY = "pyholepunch.lab import Lab"

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server per example: examples reuse names (bob, alice), bound to a key on first use."""
    with running_server(tmp_path_factory.mktemp("serve")) as srv:
        yield srv


def blocks(kind: str) -> list[tuple[str, str]]:
    out = []
    for doc in RUN:
        for n, (lang, body) in enumerate(FENCE.findall(doc.read_text())):
            if lang == kind:
                out.append((f"{doc.relative_to(ROOT)}#{n}", body))
    return out


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _run(argv: list[str], cwd: Path, *, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def test_docs_have_examples() -> None:
    assert len(blocks("python")) >= 7 and blocks("sh")
    assert {p.name for p in DOCS} >= {"README.md", "architecture.md", "protocol.md", "lab.md",
                                       "cli.md", "python-api.md"}


@pytest.mark.parametrize("where,code", blocks("python"), ids=[w for w, _ in blocks("python")])
def test_python_example_runs(where: str, code: str, server: Server, tmp_path: Path) -> None:
    if LAB_ONLY in code and os.geteuid() != 0 and not os.environ.get("CI"):
        pytest.skip("the lab example needs root")
    script = tmp_path / "example.py"
    script.write_text(code.replace(PLACEHOLDER, server.address))
    r = _run([sys.executable, str(script)], tmp_path)
    assert r.returncode == 0, f"{where}:\n{r.stdout}\n{r.stderr}"


def test_the_readme_two_peer_script_connects_and_typechecks(server: Server, tmp_path: Path) -> None:
    """A user following the README: two peers in one process connect; mypy --strict is happy."""
    code = next(body for where, body in blocks("python")
                if where.startswith("README.md") and "alice.connect" in body)
    script = tmp_path / "two_peers.py"
    script.write_text(code.replace(PLACEHOLDER, server.address))
    r = _run([sys.executable, str(script)], tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].startswith("direct ") and r.stdout.splitlines()[-1] == "b'hello'"
    r = _run([sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(script)], tmp_path,
             timeout=110)
    assert r.returncode == 0, r.stdout + r.stderr


CLI_SESSIONS = [(w, c) for w, c in blocks("sh") if w.startswith("docs/")]


@pytest.mark.parametrize("where,code", CLI_SESSIONS, ids=[w for w, _ in CLI_SESSIONS])
def test_cli_session_example_runs(where: str, code: str, tmp_path: Path) -> None:
    import socket
    with socket.socket() as s:           # a free port for the example's server
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = _run(["bash", "-c", code.replace(PLACEHOLDER, f"127.0.0.1:{port}")], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr


def test_no_reference_outside_the_repository() -> None:
    texts = {p: p.read_text() for p in DOCS}
    for path in (ROOT / "pyholepunch").rglob("*.py"):
        texts[path] = path.read_text()
    for path, text in texts.items():
        assert "DESIGN.md" not in text and "DESIGN §" not in text, path
        if path.suffix != ".md":
            continue
        for link in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
            if not link.startswith(("http://", "https://")):
                assert (path.parent / link).exists(), f"{path}: broken link {link}"
