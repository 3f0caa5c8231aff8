"""House rules of the package that a linter does not check (STYLE.md): modules stay under 500
lines, every exception class lives in errors.py (a private control-flow one, ``_Name``,
excepted) and nothing raises a bare RuntimeError."""
from __future__ import annotations

import ast
import builtins
import gc
from pathlib import Path

from pyholepunch import errors

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "pyholepunch"
MAX_LINES = 500
EXCEPTIONS = {name for name, obj in [*vars(builtins).items(), *vars(errors).items()]
              if isinstance(obj, type) and issubclass(obj, BaseException)}


def parse(path: Path) -> ast.Module:
    """ast.parse with the collector off (see tests/test_layers.py)."""
    gc.disable()
    try:
        return ast.parse(path.read_text(), str(path))
    finally:
        gc.enable()


def sources(*suffixes: str) -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*") if p.suffix in suffixes)


def _name(node: ast.expr) -> str:
    if isinstance(node, ast.Call):
        node = node.func
    if isinstance(node, ast.Attribute):
        return node.attr
    return node.id if isinstance(node, ast.Name) else ""


def test_no_module_over_500_lines() -> None:
    long = [f"{p.relative_to(ROOT)}: {n} lines" for p in sources(".py", ".pyx", ".pxd")
            if (n := len(p.read_text().splitlines())) >= MAX_LINES]
    assert not long, f"modules of {MAX_LINES} lines or more (split by concern):\n" + "\n".join(long)


def test_exception_classes_live_in_errors_py() -> None:
    found = []
    for path in sources(".py"):
        if path.name == "errors.py" and path.parent == PACKAGE:
            continue
        for node in ast.walk(parse(path)):
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_") \
                    and any(_name(base) in EXCEPTIONS for base in node.bases):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: class {node.name}")
    assert not found, "exception classes outside pyholepunch/errors.py:\n" + "\n".join(found)


def test_nothing_raises_a_bare_runtime_error() -> None:
    found = [f"{path.relative_to(ROOT)}:{node.lineno}"
             for path in sources(".py")
             for node in ast.walk(parse(path))
             if isinstance(node, ast.Raise) and node.exc is not None
             and _name(node.exc) == "RuntimeError"]
    assert not found, ("raise RuntimeError in the library (use an errors.py class):\n"
                       + "\n".join(found))
