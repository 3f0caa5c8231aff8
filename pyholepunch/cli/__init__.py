"""The `pyholepunch` command: every command front end lives in this package.

One module per command (``configure(parser)`` and ``run(args) -> int``, ``run`` may be a
coroutine function); ``args.py`` holds what they share. Exit codes: 0 success, 1 the
operation failed, 2 usage error, 3 this machine cannot do it (not root, missing tool),
4 timed out, 130 interrupted (SIGINT). Any failure is one line on stderr, no traceback
(``-vv`` logs the traceback).
"""
from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import logging
import sys
from collections.abc import Sequence

from .. import __version__
from ..errors import AddressError, HolePunchError, LabError, UsageError
from .args import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_TIMEOUT,
    EXIT_UNSUPPORTED,
    EXIT_USAGE,
    Parser,
    add_global_flags,
    setup_logging,
)

__all__ = ["COMMANDS", "build_parser", "main"]

log = logging.getLogger(__name__)

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("pyholepunch.cli.demo", "two peers behind two lab NATs punch through and echo"),
    "serve": ("pyholepunch.cli.serve", "rendezvous + STUN + relay server on one address"),
    "nat-type": ("pyholepunch.cli.nat", "classify the NAT in front of this host"),
    "listen": ("pyholepunch.cli.peer", "register and accept peer connections (netcat-like)"),
    "connect": ("pyholepunch.cli.peer", "connect to a peer by name or id (netcat-like)"),
    "lab": ("pyholepunch.cli.lab", "build, verify and tear down the netns NAT lab"),
    "api": ("pyholepunch.cli.api", "HTTP API for other programs on 127.0.0.1:12333 (extra [api])"),
}


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The whole parser; given the ``argv`` it will parse, only the command named there is
    imported and configured (the others keep their one-line help): a command's start-up
    does not pay for every other command's modules (the lab, the server, the HTTP API)."""
    chosen = _command_in(argv) if argv is not None else None
    parser = Parser(prog="pyholepunch", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--version", action="version", version=f"pyholepunch {__version__}")
    add_global_flags(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if chosen is not None and name != chosen:
            continue
        module = importlib.import_module(module_name)
        add_global_flags(p, top=False)
        configure = getattr(module, f"configure_{name.replace('-', '_')}", None) or module.configure
        configure(p)
        p.set_defaults(_module=module, _name=name)
    return parser


def _command_in(argv: Sequence[str]) -> str | None:
    """The command ``argv`` names (its first word that is one), or None."""
    return next((word for word in argv if word in COMMANDS), None)


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(words).parse_args(words)
    name = args._name
    if getattr(args, "json", False) is True and getattr(args, "json_stream", "-") == "stderr":
        args.log_format = "json"     # the stream --json writes to carries JSON only
    setup_logging(args, base=logging.INFO if name == "serve" else logging.WARNING)
    module = args._module
    run = getattr(module, f"run_{name.replace('-', '_')}", None) or module.run
    try:
        result = asyncio.run(run(args)) if inspect.iscoroutinefunction(run) else run(args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except (UsageError, AddressError) as exc:
        return _fail(name, exc, EXIT_USAGE, "error: ")
    except LabError as exc:
        return _fail(name, exc, EXIT_UNSUPPORTED)
    except TimeoutError as exc:
        return _fail(name, exc, EXIT_TIMEOUT, "timed out: ")
    except (HolePunchError, OSError, ValueError) as exc:
        return _fail(name, exc, EXIT_FAILED)
    except Exception as exc:            # a bug: still one line, the traceback with -vv
        return _fail(name, exc, EXIT_FAILED, f"internal error ({type(exc).__name__}): ")
    return int(result or 0)


def _fail(name: str, exc: BaseException, code: int, prefix: str = "") -> int:
    log.debug("pyholepunch %s failed", name, exc_info=exc)
    text = str(exc) or type(exc).__name__
    sys.stderr.write(f"pyholepunch {name}: {prefix}{text}\n")
    sys.stderr.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
