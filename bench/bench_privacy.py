#!/usr/bin/env python3
"""What the privacy options cost: seconds per round, megabytes a site sends per round, and the final
validation Dice, for plain weights, WEIGHT_DIFF and FLARE's two differential-privacy filters (tiny FedMSA,
2 synthetic sites, CPU, FLARE's simulator).

    python bench/bench_privacy.py --rounds 5

MB per round is what the site's executor hands to FLARE (dense float32 arrays; a DP filter zeroes entries but
does not shrink the message); the share of zeros is printed beside it. Seconds per round come from the run
record, Dice from the sites' validation of the last global model.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

OPTIONS = {
    "weights": {},
    "weight_diff": {"update": "weight_diff"},
    "percentile (10, gamma 0.01)": {"privacy": "percentile", "privacy_args": {"percentile": 10, "gamma": 0.01}},
    "svt (fraction 0.1, eps 0.1)": {"privacy": "svt", "privacy_args": {"fraction": 0.1, "epsilon": 0.1}},
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "flare"))
    from test_simulator import make_sites, write_job

    from fedfms.flare.simulate import run_simulation, server_job_dir
    from fedfms.reporting.run_report import read_curves
    from fedfms.run_record import read_run_record

    rows = []
    with tempfile.TemporaryDirectory(prefix="fedfms_privacy_") as tmp:
        tmp = Path(tmp)
        data = make_sites(tmp / "data", {"site-1": 4, "site-2": 6})
        for name, settings in OPTIONS.items():
            work = tmp / name.split()[0]
            out = work / "rec"
            app = {"sites": ["site-1", "site-2"], "filters": [{"path": "sim_support.RecordingFilter", "args": {"out_dir": str(out)}}]}
            job = write_job(work / "job", "fedmsa_tiny", {"app": app}, num_rounds=args.rounds, **settings)
            rc = run_simulation(job, work / "ws", ["site-1", "site-2"], data_root=data, quiet=True)
            record = read_run_record(server_job_dir(work / "ws")) or {}
            seconds = [r["seconds"] for r in record.get("rounds", []) if r.get("seconds")]
            sent = [dict(np.load(p)) for p in sorted(out.glob("site-*_r*.npz"))]
            mb = np.mean([sum(v.nbytes for v in s.values()) for s in sent]) / 1e6
            zeros = np.mean([np.mean(np.concatenate([v.ravel() for v in s.values()]) == 0) for s in sent])
            curves = read_curves(server_job_dir(work / "ws"))
            last = [pts[-1][1] for site in curves.values() for tag, pts in site.items() if tag.endswith("val_dice")]
            rows.append({"option": name, "exit": rc, "s_per_round": round(float(np.mean(seconds)), 2),
                         "mb_per_site_round": round(float(mb), 3), "zero_share": round(float(zeros), 3),
                         "val_dice_last_round": round(float(np.mean(last)), 3) if last else None})
            print(json.dumps(rows[-1]), flush=True)
    print()
    print("| option | s per round | MB per site per round | share of zeros sent | val Dice, last round | exit |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['option']} | {r['s_per_round']} | {r['mb_per_site_round']} | {r['zero_share']} | "
              f"{r['val_dice_last_round']} | {r['exit']} |")
    return 0 if all(r["exit"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
