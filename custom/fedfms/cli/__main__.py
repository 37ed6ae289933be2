"""``python -m fedfms.cli``: the ``fedfms`` command."""

import sys

from fedfms.cli import main

sys.exit(main())
