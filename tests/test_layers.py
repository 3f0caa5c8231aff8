"""The layering of pyholepunch holds: every import in the package (module-level, inside
functions, under ``if TYPE_CHECKING``) is an arrow the part table in pyholepunch/_layers.py
allows. A cycle hidden behind a function-level import is still a cycle.
"""
from __future__ import annotations

import ast
import gc
import re
from collections.abc import Iterator
from pathlib import Path

from pyholepunch import _layers

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "pyholepunch"
# Cython cannot be parsed by ``ast``: its Python-level imports are read line by line.
PYX_IMPORT = re.compile(r"^\s*(?:from\s+(\S+)\s+(?:c?import)\s+(.+)|(?:c?import)\s+(\S+))")


def module_name(path: Path) -> str:
    """``pyholepunch/nat/probe.py`` -> ``nat.probe``; a package's ``__init__`` is the package."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_package(module: str) -> bool:
    return (PACKAGE.joinpath(*module.split(".")) / "__init__.py").exists() if module else True


def is_module(module: str) -> bool:
    base = PACKAGE.joinpath(*module.split("."))
    return is_package(module) or any(base.with_suffix(s).exists() for s in (".py", ".pyx"))


def resolve(importer: str, level: int, target: str | None, names: list[str]) -> Iterator[str]:
    """The package modules an import statement reaches (below ``pyholepunch``)."""
    if level:
        base = importer.split(".") if importer else []
        if not is_package(importer):
            base = base[:-1]
        if level > 1:
            base = base[: len(base) - (level - 1)]
        dotted = ".".join(base + (target.split(".") if target else []))
    elif target == "pyholepunch" or (target or "").startswith("pyholepunch."):
        dotted = (target or "").removeprefix("pyholepunch").lstrip(".")
    else:
        return                                    # not ours
    reached = False
    for name in names:                            # `from . import engine` reaches engine
        sub = f"{dotted}.{name}" if dotted else name
        if name != "*" and is_module(sub):
            reached = True
            yield sub
    if not reached or not names:
        yield dotted


def imports_of(path: Path) -> Iterator[tuple[int, str]]:
    """(line, imported module) for every import of a package module in ``path``."""
    importer = module_name(path)
    if path.suffix == ".pyx":
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            m = PYX_IMPORT.match(line)
            if not m:
                continue
            if m.group(1):
                target = m.group(1)
                level = len(target) - len(target.lstrip("."))
                names = [n.strip().split(" ")[0] for n in m.group(2).strip("()").split(",")]
                for mod in resolve(importer, level, target.lstrip(".") or None, names):
                    yield lineno, mod
            else:
                yield from ((lineno, mod) for mod in resolve(importer, 0, m.group(3), []))
        return
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                for mod in resolve(importer, 0, alias.name, []):
                    yield node.lineno, mod
        elif isinstance(node, ast.ImportFrom):
            names = [alias.name for alias in node.names]
            for mod in resolve(importer, node.level, node.module, names):
                yield node.lineno, mod


def parse(path: Path) -> ast.Module:
    """ast.parse with the collector off: CPython 3.11 can fail "AST constructor recursion depth
    mismatch" when a finalizer runs in the middle of building the tree."""
    gc.disable()
    try:
        return ast.parse(path.read_text(), str(path))
    finally:
        gc.enable()


def sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*") if p.suffix in (".py", ".pyx"))


def forbidden_arrows() -> list[str]:
    found = []
    for path in sources():
        importer = module_name(path)
        rel = path.relative_to(ROOT)
        if _layers.part_of(importer) is None:
            found.append(f"{rel}: module {importer or '__init__'!r} has no part in "
                         "pyholepunch/_layers.py (give it a row or a prefix)")
            continue
        for lineno, imported in imports_of(path):
            if not _layers.allowed(importer, imported):
                src, dst = _layers.part_of(importer), _layers.part_of(imported)
                found.append(f"{rel}:{lineno}: {src.name if src else '?'} ({importer}) may not "
                             f"import {dst.name if dst else 'an unknown module'} ({imported})")
    return found


def test_every_import_is_an_allowed_arrow() -> None:
    arrows = forbidden_arrows()
    assert not arrows, "imports the layer table forbids:\n" + "\n".join(arrows)


def test_the_reader_sees_every_kind_of_import() -> None:
    """The reader is not blind: relative, absolute, function-level, type-only and .pyx imports."""
    seen = {(path.relative_to(ROOT).as_posix(), mod)
            for path in sources() for _, mod in imports_of(path)}
    assert ("pyholepunch/nat/classify.py", "nat.probe") in seen           # function-level
    assert ("pyholepunch/engine/_native.pyx", "engine._base") in seen     # Cython, absolute
    assert ("pyholepunch/__init__.py", "engine") in seen                  # `from . import x`
    assert ("pyholepunch/peer.py", "signal.client") in seen               # relative, module level
    assert ("pyholepunch/signal/server.py", "signal.protocol") in seen


def test_the_table_allows_what_the_design_says() -> None:
    assert not _layers.allowed("engine.pure", "nat.profile")
    assert not _layers.allowed("stun.client", "nat.classify")
    assert not _layers.allowed("relay.turn", "signal.client")
    assert _layers.allowed("relay.turn", "signal.protocol")
    assert not _layers.allowed("lab.lab", "stun.codec")
    assert _layers.allowed("lab.lab", "errors")
    assert _layers.allowed("cli.nat", "nat.classify") and _layers.part_of("cli.nat").name == "Face"
    assert not _layers.allowed("peer", "cli")


def test_the_readme_shows_this_table() -> None:
    assert _layers.markdown_table() in (ROOT / "README.md").read_text()
