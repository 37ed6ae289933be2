#!/usr/bin/env python3
"""Run a FedFMS job in FLARE POC mode on one machine (prepare, start, submit, wait, download, stop, cycle).

The code is :mod:`fedfms.deploy.poc`; ``--help`` for usage, poc/README.md for what each step does.
"""

import sys

try:
    from fedfms.deploy.poc import cli
except ModuleNotFoundError as exc:
    if exc.name != "fedfms":
        raise
    sys.exit("error: the fedfms package is not installed here: make setup (or pip install -e custom)")

if __name__ == "__main__":
    sys.exit(cli())
