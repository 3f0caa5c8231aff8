"""The engine the suite runs on is the one $PYHOLEPUNCH_ENGINE names (CI runs tests/aio and
tests/lab a second time with PYHOLEPUNCH_ENGINE=pure): a Peer built without an engine, and a
child process such as a lab peer, both take it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from pyholepunch import engine as engine_mod
from pyholepunch.peer import Peer


def expected() -> str:
    return os.environ.get("PYHOLEPUNCH_ENGINE") or engine_mod.available()[0]


def test_a_peer_takes_the_engine_the_environment_names(tmp_path: Path) -> None:
    peer = Peer(("127.0.0.1", 3478), name="alice", config_dir=tmp_path)
    assert peer.engine.name == expected()


def test_a_child_process_takes_it_too() -> None:
    out = subprocess.run([sys.executable, "-c", "import pyholepunch.engine as e; print(e.get().name)"],
                         capture_output=True, text=True, check=True, timeout=30)
    assert out.stdout.strip() == expected()
