"""The console of a quiet simulation: one line per round from the federation monitor, warnings without FLARE's
context prefix, FLARE's INFO logs only in the log files (no FLARE process is started here)."""

from __future__ import annotations

import json
import subprocess
import sys

from fedfms.flare.monitor import progress_line
from fedfms.flare.simulate import quiet_log_config


def test_progress_line_names_every_site_with_loss_and_dice_or_why_not():
    info = {"round": 2, "accepted": {"a": 10, "b": 12}, "failed": {"c": "boom"}, "val_dice": {"a": 0.71234, "b": None},
            "seconds": 3.14159, "updated_model": True}
    line = progress_line(info, 9, ["a", "b", "c", "d"], {"a": 0.4, "b": None})
    assert line == "round 3/10  a loss 0.400 Dice 0.712 | b loss - Dice - | c failed | d missing | 3.1 s"
    info.update(updated_model=False, seconds=None)
    assert progress_line(info, None, ["a"], {}).endswith("(global model not updated)")
    assert progress_line(info, None, ["a"], {}).startswith("round 3  a loss - Dice 0.712")


def test_quiet_console_shows_progress_lines_and_warnings_only(tmp_path):
    (tmp_path / "local").mkdir()
    config = quiet_log_config(tmp_path)
    code = f"""
import json, logging, logging.config
logging.config.dictConfig(json.load(open({str(config)!r})))
logging.getLogger("fedfms.flare.executor").info("an executor detail")
logging.getLogger("nvflare.app_common.workflows.x").info("a FLARE detail")
logging.getLogger("fedfms.progress").info("round 1/2  a loss 0.5 Dice 0.6 | 1.0 s")
logging.getLogger("nvflare.private.y").warning("a FLARE warning")
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert proc.stdout.splitlines() == ["round 1/2  a loss 0.5 Dice 0.6 | 1.0 s", "WARNING nvflare.private.y: a FLARE warning"]
    logged = (tmp_path / "log.txt").read_text()
    for text in ("an executor detail", "a FLARE detail", "round 1/2", "a FLARE warning"):
        assert text in logged
    assert json.loads(config.read_text())["loggers"]["fedfms.progress"]["propagate"] is True
