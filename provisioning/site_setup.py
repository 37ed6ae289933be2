#!/usr/bin/env python3
"""Site-local configuration of a FedFMS startup kit (``site``, ``server``, ``stale-jobs``); ``--help`` for usage.

The code is :mod:`fedfms.deploy.site_setup`; install FedFMS on this machine first (provisioning/README.md, step 3).
"""

import sys

try:
    from fedfms.deploy.site_setup import main
except ModuleNotFoundError as exc:
    if exc.name != "fedfms":
        raise
    sys.exit("error: the fedfms package is not installed here: pip install -r requirements.txt && pip install ./custom")

if __name__ == "__main__":
    sys.exit(main())
