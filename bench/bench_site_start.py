"""What a site's process pays to start: CPU seconds and peak memory of importing what a simulated site imports
(FLARE's simulator worker, then fedfms's executor: torch, torchvision, segment-anything, MONAI), each time in a
fresh interpreter, with fedfms's MONAI import (fedfms/monai_import.py) and with a plain ``import monai`` first
(MONAI then loads MLflow, TensorBoard, matplotlib, pandas, SciPy, scikit-learn and scikit-image as well).

    python bench/bench_site_start.py            # 5 fresh processes per way, ~1 minute on 2 CPU cores
    python bench/bench_site_start.py --runs 9

Every simulated site, POC/production site job and ``fedfms`` subprocess that trains pays this once per job; a
16-site simulation pays it 16 times at once. The test suite starts ~130 such processes (tests/README.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

from fedfms.monai_import import HIDDEN_WHILE_IMPORTING

PROBE = """
import json, resource, sys, time
{first}
import nvflare.private.fed.app.simulator.simulator_worker
import fedfms.flare.executor
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({{"cpu": usage.ru_utime + usage.ru_stime, "rss_mb": usage.ru_maxrss / 1024,
                   "loaded": sorted(n for n in {hidden!r} if n in sys.modules)}}))
"""

WAYS = {"fedfms (MONAI extras hidden)": "", "plain `import monai` first": "import monai"}


def measure(first: str) -> dict:
    code = PROBE.format(first=first, hidden=HIDDEN_WHILE_IMPORTING)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="fresh processes per way (alternating); default 5")
    args = parser.parse_args(argv)
    results = {way: [] for way in WAYS}
    for _ in range(args.runs):
        for way, first in WAYS.items():  # alternating, so a busy spell of the machine hits both ways alike
            results[way].append(measure(first))
    print(f"site process start (imports only), median of {args.runs} fresh processes each, {sys.platform}")
    print(f"{'way':32s} {'CPU-s':>7s} {'peak RSS MB':>12s}  MONAI's extras loaded")
    medians = {}
    for way, runs in results.items():
        cpu = statistics.median(r["cpu"] for r in runs)
        rss = statistics.median(r["rss_mb"] for r in runs)
        medians[way] = (cpu, rss)
        print(f"{way:32s} {cpu:7.2f} {rss:12.0f}  {', '.join(runs[-1]['loaded']) or '-'}")
    (lean_cpu, lean_rss), (full_cpu, full_rss) = medians.values()
    print(f"saved per site process: {full_cpu - lean_cpu:.2f} CPU-s ({1 - lean_cpu / full_cpu:.0%}), "
          f"{full_rss - lean_rss:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
