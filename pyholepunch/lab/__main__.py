"""`python -m pyholepunch.lab ...`: the same as `pyholepunch lab ...`."""
from __future__ import annotations

import argparse
import logging
import sys

from ..cli import lab as cli
from ..cli.lab import _say
from ..errors import LabError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pyholepunch.lab",
                                     description=(cli.__doc__ or "").splitlines()[0])
    parser.add_argument("-v", "--verbose", action="count", default=0)
    cli.configure(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return cli.run(args)
    except KeyboardInterrupt:
        return 130
    except LabError as exc:
        _say(f"pyholepunch lab: {exc}", err=True)
        return 3


if __name__ == "__main__":
    sys.exit(main())
