"""The `pyholepunch` command: one sub-command per part, each defined beside its part.

Every sub-command module exposes ``configure(parser)`` and ``run(args) -> int`` (``run`` may
be a coroutine function). Exit codes: 0 success, 1 the operation failed, 2 usage error,
3 this machine cannot do it (not root, missing tool), 4 timed out, 130 interrupted.
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
from ..errors import HolePunchError, LabError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNSUPPORTED, EXIT_TIMEOUT, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("pyholepunch.cli.demo", "two peers behind two lab NATs punch through and echo"),
    "serve": ("pyholepunch.serve", "rendezvous + STUN + relay server on one address"),
    "nat-type": ("pyholepunch.cli.nat", "classify the NAT in front of this host"),
    "listen": ("pyholepunch.cli.peer", "register and accept peer connections (netcat-like)"),
    "connect": ("pyholepunch.cli.peer", "connect to a peer by name or id (netcat-like)"),
    "lab": ("pyholepunch.cli.lab", "build, verify and tear down the netns NAT lab"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyholepunch", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"pyholepunch {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more logging (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=help_text)
        configure = getattr(module, f"configure_{name.replace('-', '_')}", None) or module.configure
        configure(p)
        p.set_defaults(_module=module, _name=name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                        stream=sys.stderr)
    module = args._module
    run = getattr(module, f"run_{args._name.replace('-', '_')}", None) or module.run
    try:
        result = asyncio.run(run(args)) if inspect.iscoroutinefunction(run) else run(args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except LabError as exc:
        print(f"pyholepunch {args._name}: {exc}", file=sys.stderr)
        return EXIT_UNSUPPORTED
    except TimeoutError as exc:
        print(f"pyholepunch {args._name}: timed out: {exc}", file=sys.stderr)
        return EXIT_TIMEOUT
    except (HolePunchError, OSError) as exc:
        print(f"pyholepunch {args._name}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
