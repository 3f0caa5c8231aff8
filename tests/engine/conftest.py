"""Engine test fixtures: every test may take `no_fd_leak` to prove it left no descriptor open."""
from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from .helpers import open_fds


@pytest.fixture
def no_fd_leak() -> Iterator[None]:
    before = open_fds()
    yield
    gc.collect()
    leaked = open_fds() - before
    assert not leaked, f"file descriptors leaked: {sorted(leaked)}"
