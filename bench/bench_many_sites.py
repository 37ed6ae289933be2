#!/usr/bin/env python3
"""The cost of scale in FLARE's simulator: peak host memory and wall time per round against the number of
simulated sites (tiny FedMSA, CPU), with the concurrency `fedfms simulate` chooses (or --threads).

    python bench/bench_many_sites.py                 # 4, 8, 16, 32 sites, 2 rounds each
    python bench/bench_many_sites.py --sites 4 8 --rounds 3 --threads 4

Each run is `fedfms simulate` in a child process; the peaks are the largest sums of RSS and of PSS over that
process and all its descendants (the server and every site process), sampled every 0.5 s. PSS is the honest
figure: the libraries every process maps (torch alone is about 0.5 GB) are counted once, not once per site. Per-round seconds come from the
run record (`fedfms_run.json`), so FLARE's start-up and cross-site evaluation are not in them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]


def tree_memory(proc: psutil.Process) -> tuple[int, int]:
    """(sum of RSS, sum of PSS) over the process and its descendants. RSS counts the shared pages (torch's
    libraries, a memory-mapped checkpoint) once per process; PSS splits them among the processes sharing them,
    so its sum is what the machine really spends."""
    rss = pss = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            info = p.memory_full_info()
            rss += info.rss
            pss += getattr(info, "pss", info.rss)
        except psutil.Error:
            pass
    return rss, pss


def run(num_sites: int, rounds: int, threads: int | None, work: Path) -> dict:
    from fedfms.data.synthetic import make_disc_site
    from fedfms.flare.fed_job import write_job
    from fedfms.run_record import read_run_record

    data = work / f"data{num_sites}"
    sites = [f"site-{i + 1}" for i in range(num_sites)]
    for i, site in enumerate(sites):
        if not (data / site).exists():
            make_disc_site(data / site, site=site, num_volumes=2, slices_per_volume=3, seed=i)
    job = write_job("fedmsa_tiny", work / f"job{num_sites}", overwrite=True, num_rounds=rounds)
    ws = work / f"ws{num_sites}"
    cmd = [sys.executable, "-m", "fedfms.cli", "simulate", str(job), "--workspace", str(ws),
           "--clients", ",".join(sites), "--data-root", str(data), "--quiet"]
    if threads:
        cmd += ["--threads", str(threads)]
    peak = [0, 0]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ps = psutil.Process(proc.pid)
    done = threading.Event()

    def sample():
        while not done.is_set():
            rss, pss = tree_memory(ps)
            peak[0], peak[1] = max(peak[0], rss), max(peak[1], pss)
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate(timeout=3600)
    done.set()
    sampler.join()
    wall = time.perf_counter() - start
    chosen = next((line for line in out.splitlines() if line.startswith("simulating ")), "")
    record = read_run_record(ws / "server" / "simulate_job") or {}
    per_round = [r["seconds"] for r in record.get("rounds", []) if r.get("seconds") is not None]
    all_averaged = all(len(r.get("accepted", {})) == num_sites for r in record.get("rounds", []))
    return {"sites": num_sites, "exit": proc.returncode, "status": record.get("status"), "all_sites_every_round": all_averaged,
            "peak_rss_gib": round(peak[0] / 2**30, 2), "peak_pss_gib": round(peak[1] / 2**30, 2),
            "pss_per_site_gib": round(peak[1] / 2**30 / num_sites, 2),
            "s_per_round": round(sum(per_round) / len(per_round), 1) if per_round else None,
            "wall_s": round(wall, 1), "concurrency": chosen}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--out", help="also write the JSON lines here")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedfms_many_") as tmp:
        for n in args.sites:
            row = run(n, args.rounds, args.threads, Path(tmp))
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    print("| sites | sites at once | peak RSS GiB (sum) | peak PSS GiB (sum) | PSS GiB per site | s per round | wall s | "
          "every site every round |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        at_once = r["concurrency"].split(",")[1].strip().split(" ")[0] if "," in r["concurrency"] else "?"
        print(f"| {r['sites']} | {at_once} | {r['peak_rss_gib']} | {r['peak_pss_gib']} | {r['pss_per_site_gib']} | "
              f"{r['s_per_round']} | {r['wall_s']} | {r['all_sites_every_round']} |")
    if args.out:
        Path(args.out).write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return 0 if all(r["exit"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
