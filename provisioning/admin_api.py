#!/usr/bin/env python3
"""Manage FedFMS jobs with the FLARE API from an admin startup kit; ``--help`` for usage.

The code is :mod:`fedfms.deploy.admin_api`; FLARE's ``nvflare job ...`` commands do most of the same (docs/admin.md).
"""

import sys

try:
    from fedfms.deploy.admin_api import main
except ModuleNotFoundError as exc:
    if exc.name != "fedfms":
        raise
    sys.exit("error: the fedfms package is not installed here: pip install -r requirements.txt && pip install ./custom")

if __name__ == "__main__":
    sys.exit(main())
