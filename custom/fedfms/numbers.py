"""Small number helpers every report shares: a mean that skips what is not a finite number, and a score printed
with three decimals or '-' when there is none."""

from __future__ import annotations

import math


def finite_mean(values) -> float | None:
    """Mean of the finite numbers among ``values`` (None, NaN and non-numbers left out); None when there are none."""
    kept = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(kept) / len(kept) if kept else None


def fmt_score(value) -> str:
    """``0.734`` for a score, ``-`` for a missing or non-finite one."""
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.3f}"
