"""Report helpers that need no FLARE run (the simulator tests cover the rest)."""

import json

import pytest

from fedfms.errors import DataError
from fedfms.report import find_run_dir, format_table


def test_find_run_dir_takes_the_shallowest_result(tmp_path):
    deep = tmp_path / "download" / "job1" / "workspace" / "cross_site_val"
    deep.mkdir(parents=True)
    (deep / "cross_val_results.json").write_text(json.dumps({}))
    assert find_run_dir(tmp_path / "download") == deep.parent
    with pytest.raises(DataError, match="no cross_site_val"):
        find_run_dir(tmp_path / "download" / "job1" / "workspace" / "cross_site_val")
    with pytest.raises(DataError, match="not a folder"):
        find_run_dir(tmp_path / "missing")


def test_format_table_aligns_and_marks_missing_values():
    text = format_table([{"site": "HK", "dice": 0.81234, "iou": None, "num_samples": 12}])
    header, rule, row = text.splitlines()
    assert header.split()[:3] == ["site", "Dice", "r0"]
    assert "0.812" in row and "-" in row and row.endswith("12")
    assert len(rule) == len(header)
