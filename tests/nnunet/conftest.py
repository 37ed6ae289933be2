"""FednnU-Net tests share the synthetic sites of nnunet_sites.py."""

import sys
from pathlib import Path

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)
