"""Build the optional native engine: csrc/*.c behind the single Cython binding.

Set PYHOLEPUNCH_PUREPYTHON=1 (or build on PyPy) to skip it; a failed compile also falls back
to the pure engine, with a warning, so `pip install .` works without a compiler.
"""
import glob
import os
import platform
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # no compiler, no Cython, ...: install pure
            print(f"warning: native engine not built ({exc}); the pure engine will be used",
                  file=sys.stderr)

    def build_extension(self, ext) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            print(f"warning: {ext.name} not built ({exc}); the pure engine will be used",
                  file=sys.stderr)


def extensions() -> list:
    if os.environ.get("PYHOLEPUNCH_PUREPYTHON") or platform.python_implementation() != "CPython":
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        return []
    from setuptools import Extension

    if not os.path.exists("pyholepunch/engine/_native.pyx"):
        return []

    sources = ["pyholepunch/engine/_native.pyx"] + sorted(
        p for p in glob.glob("csrc/*.c") if not os.path.basename(p).startswith("test_")
    )
    # Shipped stripped: no debug info (-g0 overrides Python's own -g) and, on Linux, no symbol
    # table beyond the dynamic one (the module's PyInit). PYHOLEPUNCH_DEBUG_BUILD=1 keeps both.
    debug = bool(os.environ.get("PYHOLEPUNCH_DEBUG_BUILD"))
    ext = Extension(
        "pyholepunch.engine._native",
        sources=sources,
        include_dirs=["csrc"],
        extra_compile_args=["-std=gnu99", "-O2", "-Wall", "-Wextra"] + ([] if debug else ["-g0"]),
        extra_link_args=[] if debug or not sys.platform.startswith("linux") else ["-s"],
    )
    return cythonize([ext], language_level=3, compiler_directives={"embedsignature": True})


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
