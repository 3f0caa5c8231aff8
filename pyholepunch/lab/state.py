"""Who owns which lab: one small JSON record per live lab under /run/pyholepunch-lab/, so that
`lab exec NAME` and `lab down NAME` work from another process, and `lab down --all-mine`
removes only the leftovers of crashed runs (namespaces "hpl*" whose owning process is gone).
"""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import time
from typing import Any

from . import _ns

log = logging.getLogger(__name__)

STATE_DIR = os.environ.get("PYHOLEPUNCH_LAB_STATE", "/run/pyholepunch-lab")
PREFIX = "hpl"
NAME_RE = re.compile(r"^hpl[0-9a-f]{5}$")


def _path(name: str) -> str:
    return os.path.join(STATE_DIR, f"{name}.json")


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise ValueError(f"not a lab name: {name!r} (expected 'hpl' + 5 hex digits)")
    return name


def write(name: str, record: dict[str, Any]) -> None:
    os.makedirs(STATE_DIR, exist_ok=True)
    tmp = _path(name) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f)
    os.replace(tmp, _path(name))


def read(name: str) -> dict[str, Any] | None:
    try:
        with open(_path(check_name(name))) as f:
            data: dict[str, Any] = json.load(f)
            return data
    except (OSError, ValueError):
        return None


def forget(name: str) -> None:
    try:
        os.unlink(_path(name))
    except FileNotFoundError:
        pass


def owner_alive(record: dict[str, Any] | None) -> bool:
    if not record:
        return False
    pid, start = record.get("pid"), record.get("pid_start")
    return isinstance(pid, int) and _ns.process_start_time(pid) == start


def namespaces_of(name: str) -> list[str]:
    return [n for n in _ns.list_names() if n.startswith(name + "-")]


def lab_names() -> list[str]:
    """Every lab (by prefix) that has a namespace or a record on this machine."""
    names = {n.split("-", 1)[0] for n in _ns.list_names() if n.startswith(PREFIX) and "-" in n}
    try:
        names |= {f[:-5] for f in os.listdir(STATE_DIR) if f.endswith(".json")}
    except FileNotFoundError:
        pass
    return sorted(n for n in names if NAME_RE.match(n))


def remove(name: str) -> list[str]:
    """Kill every process in the lab's namespaces and delete them; return what was removed."""
    spaces = namespaces_of(check_name(name))
    _ns.kill_all(spaces)
    for n in spaces:
        _ns.remove(n)
    forget(name)
    return spaces


def down(name: str, timeout: float = 10.0) -> list[str]:
    """Stop lab `name`: ask a live owner to tear it down (SIGTERM), else remove it directly."""
    record = read(name)
    before = namespaces_of(name)
    if owner_alive(record):
        assert record is not None
        pid = int(record["pid"])
        if pid != os.getpid():
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and namespaces_of(name):
                time.sleep(0.05)
    remove(name)
    return before


def down_all_mine() -> dict[str, list[str]]:
    """Remove labs whose owner is gone; live labs (another test, another `lab up`) are kept."""
    removed = {}
    for name in lab_names():
        if not owner_alive(read(name)):
            removed[name] = remove(name)
            log.info("removed leftover lab %s (%d namespaces)", name, len(removed[name]))
    return removed
