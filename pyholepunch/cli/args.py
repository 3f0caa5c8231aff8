"""What every command shares: the parser class, the global flags, argument types, output.

Every user mistake is a usage error: one line on stderr, exit 2, no traceback. Address flags
go through :func:`pyholepunch.address.parse_address`, the one parser of the package.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from ..address import Address, parse_address
from ..errors import AddressError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNSUPPORTED, EXIT_TIMEOUT, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``pyholepunch connect: error: ...``), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_global_flags(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """-v/-q/--log-format, accepted before and after the sub-command.

    The top-level parser holds the defaults; each sub-command's copy defaults to SUPPRESS, so
    a flag given after the sub-command overrides one given before, and absence changes nothing.
    """
    kw: dict[str, Any] = {} if top else {"default": argparse.SUPPRESS}
    parser.add_argument("-v", "--verbose", action="count", help="more logging (-v info, -vv debug)",
                        **({"default": 0} if top else kw))
    parser.add_argument("-q", "--quiet", action="count", help="less logging (-q: errors only)",
                        **({"default": 0} if top else kw))
    parser.add_argument("--log-format", choices=("text", "json"),
                        help="log lines as text (default) or one JSON object per line",
                        **({"default": "text"} if top else kw))


def address(default_port: int | None = None, *, allow_zero: bool = False) -> Callable[[str], Address]:
    """An argparse ``type=``: HOST:PORT / [V6]:PORT (and HOST alone with a default port)."""
    def parse(text: str) -> Address:
        try:
            return parse_address(text, default_port=default_port, allow_zero=allow_zero)
        except AddressError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    parse.__name__ = "address"       # argparse names the type in its message
    return parse


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < 1e9:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def port_number(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"not a port number (0..65535): {text!r}")
    return int(text)


# --- logging -------------------------------------------------------------------------------

class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message (and the error, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(),
            "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        if record.exc_info and record.exc_info[1] is not None:
            doc["error"] = repr(record.exc_info[1])
        return json.dumps(doc, sort_keys=True)


def setup_logging(args: argparse.Namespace, *, base: int = logging.WARNING) -> None:
    """The one place handlers are configured. ``base`` is the command's default level."""
    level = base - 10 * args.verbose + 10 * args.quiet
    level = max(logging.DEBUG, min(logging.ERROR, level))
    handler = logging.StreamHandler(sys.stderr)
    if args.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("pyholepunch").setLevel(level)
    if level <= logging.DEBUG:
        root.setLevel(logging.DEBUG)


def emit_json(doc: dict[str, Any], target: str) -> None:
    """One JSON document on one line to ``target``: "-" stdout, "stderr", or a file path."""
    text = json.dumps(doc, sort_keys=True, default=str)
    if target == "-":
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    elif target == "stderr":
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
    else:
        with open(target, "w") as f:
            f.write(text + "\n")
