"""One real `pyholepunch serve` on loopback for the module, files made once per session."""
from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import Server, make_file, running_server

MB = 1_000_000
_names = itertools.count(1)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("serve")) as srv:
        yield srv


@pytest.fixture(scope="session")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    """name -> (path, sha256): 20 MB a and b, 200 MB big."""
    root = tmp_path_factory.mktemp("data")
    out = {}
    for name, size in (("a20", 20 * MB), ("b20", 20 * MB), ("big", 200 * MB)):
        path = root / name
        out[name] = (path, make_file(path, size))
    return out


@pytest.fixture
def names() -> tuple[str, str]:
    """Fresh peer names: a name is bound to the first key that registers it."""
    n = next(_names)
    return f"bob{n}", f"alice{n}"
