"""The ``fedfms`` command: prepare data, make and run FLARE jobs, report, predict.

One module per command group in this package, each with ``add_parsers(sub)``. A command imports what it runs
inside its function, so only the commands that use FLARE load it (building the parser loads neither nvflare nor
fedfms.flare).
Problems a user can fix are printed as one line ``error: ...`` with exit code 2, never as a traceback."""

from __future__ import annotations

import argparse
import sys

from fedfms.cli import check_site, demo, evaluate, export, job, predict, prepare, pretrain, report, simulate, tables
from fedfms.errors import FedFMSError

# in the order `fedfms --help` lists them
COMMANDS = (prepare, evaluate, tables, export, job, simulate, demo, pretrain, report, check_site, predict)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedfms", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FedFMSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

