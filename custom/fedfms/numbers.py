"""Small helpers every report shares: a mean that skips what is not a finite number, a score printed with three
decimals or '-' when there is none, and the plain-text table they are printed in."""

from __future__ import annotations

import math


def finite_mean(values) -> float | None:
    """Mean of the finite numbers among ``values`` (None, NaN and non-numbers left out); None when there are none."""
    kept = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(kept) / len(kept) if kept else None


def finite_or_none(x) -> float | None:
    """``x`` as a float when it is a finite number; None otherwise (a metric that could not be computed)."""
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def render_table(header, body) -> str:
    """A plain-text table: the first column left-aligned, the others right-aligned, a rule under the header."""
    table = [list(header)] + [list(r) for r in body]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def fmt_score(value) -> str:
    """``0.734`` for a score, ``-`` for a missing or non-finite one."""
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.3f}"
