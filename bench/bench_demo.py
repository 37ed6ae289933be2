"""How long `fedfms demo` takes, stage by stage, on this machine (and `fedfms pretrain` per step).

Runs the demo into a temporary folder (or --out) and prints the seconds of each method (preparation and the
figure are the rest of the total), from the demo's own table. `--pretrain-steps N` also times N steps of
`fedfms pretrain` and extrapolates the committed checkpoint's 4000 steps.

    python bench/bench_demo.py                 # the full demo (10 rounds x 3 epochs)
    python bench/bench_demo.py --rounds 3 --epochs 2 --pretrain-steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="demo folder (default: a temporary one)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--pretrain-steps", type=int, default=0)
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} CPU core(s), python {sys.version.split()[0]}")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or Path(tmp) / "demo")
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "fedfms.cli", "demo", "--out", str(out), "--rounds", str(args.rounds),
                               "--epochs", str(args.epochs)], capture_output=True, text=True)
        total = time.perf_counter() - start
        if proc.returncode != 0:
            print(proc.stdout[-2000:], proc.stderr[-2000:])
            return proc.returncode
        table = json.loads(sorted(out.glob("runs/*/demo_table.json"))[-1].read_text())
        print(f"fedfms demo --rounds {args.rounds} --epochs {args.epochs}: {total:.0f} s in all (process start to exit)")
        for key, method in table["methods"].items():
            print(f"  {method['label']:<34} {method['seconds']:6.1f} s")
        rest = total - sum(m["seconds"] for m in table["methods"].values())
        print(f"  {'preparation, scoring, figure, start':<34} {rest:6.1f} s")
        if args.pretrain_steps:
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "fedfms.cli", "pretrain", "--out", str(Path(tmp) / "p.pth"), "--steps",
                            str(args.pretrain_steps), "--threads", "1", "--log-every", str(args.pretrain_steps)],
                           check=True, capture_output=True)
            per_step = (time.perf_counter() - start) / args.pretrain_steps
            print(f"fedfms pretrain: {per_step:.2f} s per step of 32 scenes (1 thread, start-up included); "
                  f"4000 steps ~{4000 * per_step / 60:.0f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
