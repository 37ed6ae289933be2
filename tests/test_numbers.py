"""The shared score helpers: a missing or non-finite score never becomes a number in a table or an average."""

import math

from fedfms.numbers import finite_mean, fmt_score


def test_finite_mean_skips_missing_and_non_finite_values():
    assert finite_mean([0.5, None, float("nan"), 1.0, "x", float("inf")]) == 0.75
    assert finite_mean([None, float("nan")]) is None and finite_mean([]) is None


def test_fmt_score_three_decimals_or_dash():
    assert fmt_score(0.73449) == "0.734" and fmt_score(1) == "1.000"
    assert fmt_score(None) == fmt_score(float("nan")) == fmt_score(math.inf) == "-"


def test_finite_or_none_keeps_only_finite_numbers():
    from fedfms.numbers import finite_or_none

    assert finite_or_none(1) == 1.0 and isinstance(finite_or_none(1), float)
    assert [finite_or_none(v) for v in (float("nan"), float("inf"), None, "0.5")] == [None] * 4


def test_render_table_aligns_columns_under_a_rule():
    from fedfms.numbers import render_table

    assert render_table(["site", "Dice"], [["site-1", "0.734"], ["s3", "-"]]).splitlines() == [
        "site     Dice", "------  -----", "site-1  0.734", "s3          -"]
