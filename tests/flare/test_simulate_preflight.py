"""`fedfms simulate` refuses a federation that cannot run before FLARE starts: one line, exit 2, no workspace."""

from __future__ import annotations

from pathlib import Path

from fedfms.cli import main
from fedfms.data.synthetic import make_disc_site

JOB = Path(__file__).resolve().parents[2] / "jobs" / "fedmsa_tiny"


def test_missing_site_folder_or_data_root_is_one_line_and_leaves_nothing(tmp_path, capsys):
    make_disc_site(tmp_path / "data" / "site-1", site="site-1", num_volumes=2, slices_per_volume=2, seed=0)
    ws = tmp_path / "ws"
    base = ["simulate", str(JOB), "--workspace", str(ws), "--clients", "site-1,site-2"]
    assert main([*base, "--data-root", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tmp_path / 'data'}: no site folder for client(s) site-2; expected one prepared site folder "
                   "per --clients name (found: site-1)"]
    assert main([*base, "--data-root", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--data-root does not exist" in err[0]
    assert not ws.exists()
