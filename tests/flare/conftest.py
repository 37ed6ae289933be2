"""Simulator tests share their job-building helpers (test_simulator) and the components they ship to the
simulated sites (sim_support)."""

import sys
from pathlib import Path

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)
