"""What a simulation spends starting its site processes: ``fedfms simulate`` of the tiny FedMSA job (1 round, 1 epoch)
on N synthetic sites, with the site processes forked from the fork server (fedfms/flare/site_forkserver.py) and
started plainly (``FEDFMS_SITE_FORKSERVER=0``), alternating, each in a fresh ``fedfms`` process. CPU is the whole
process tree's (user + system: the CLI, FLARE's server process, the fork server and every site). Memory, sampled
in the forked runs: the fork server's peak resident memory (``fork_server.rss_gb`` in
custom/fedfms/assets/site_memory.json, which the simulator's placement counts once for all forked sites) and the
largest private memory (USS) of one forked site.

    python bench/bench_sim_sites.py                 # 4 sites, 3 runs per way: ~4 minutes on 2 CPU cores
    python bench/bench_sim_sites.py --sites 8 --runs 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from fedfms.data.synthetic import make_disc_site

WAYS = {"forked from the fork server": "1", "started plainly": "0"}


def run_once(job: Path, data: Path, sites: list[str], work: Path, forkserver: str) -> tuple[float, float, int]:
    env = {**os.environ, "FEDFMS_SITE_FORKSERVER": forkserver}
    cmd = [sys.executable, "-m", "fedfms.cli", "simulate", str(job), "--workspace", str(work), "--clients",
           ",".join(sites), "--data-root", str(data)]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = threading.Event()
    sampler = threading.Thread(target=sample_fork_memory, args=(proc.pid, done), daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - start
    done.set()
    sampler.join()
    return wall, usage.ru_utime + usage.ru_stime, os.waitstatus_to_exitcode(status)


MEMORY = {"fork server rss": 0, "forked site uss": 0}


def sample_fork_memory(pid: int, done: threading.Event) -> None:
    """Peak resident memory of the run's fork server and the largest private memory of a site forked from it."""
    import psutil

    while not done.wait(0.5):
        try:
            tree = psutil.Process(pid).children(recursive=True)
        except psutil.Error:
            return
        for p in tree:
            try:
                if "site_forkserver" not in " ".join(p.cmdline()):
                    continue
                MEMORY["fork server rss"] = max(MEMORY["fork server rss"], p.memory_info().rss)
                for site in p.children():
                    MEMORY["forked site uss"] = max(MEMORY["forked site uss"], site.memory_full_info().uss)
            except psutil.Error:
                continue


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3, help="runs per way (alternating); default 3")
    args = parser.parse_args(argv)
    sites = [f"site-{i + 1}" for i in range(args.sites)]
    with tempfile.TemporaryDirectory(prefix="fedfms-bench-sim-") as tmp:
        tmp = Path(tmp)
        for i, site in enumerate(sites):
            make_disc_site(tmp / "data" / site, site, num_volumes=3, slices_per_volume=2, seed=i)
        job = tmp / "job"
        subprocess.run([sys.executable, "-m", "fedfms.cli", "job", "new", "fedmsa_tiny", str(job), "--rounds", "1",
                        "--train", '{"epochs": 1}', "--sites", ",".join(sites)], check=True, capture_output=True)
        results = {way: [] for way in WAYS}
        for run in range(args.runs):
            for way, flag in WAYS.items():  # alternating, so a busy spell of the machine hits both ways alike
                results[way].append(run_once(job, tmp / "data", sites, tmp / f"ws-{flag}-{run}", flag))
    print(f"fedfms simulate fedmsa_tiny, {args.sites} sites, 1 round of 1 epoch; median of {args.runs} runs per way")
    print(f"{'site processes':30s} {'wall s':>8s} {'CPU-s':>8s}  exit codes")
    medians = {}
    for way, runs in results.items():
        wall, cpu = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
        medians[way] = (wall, cpu)
        print(f"{way:30s} {wall:8.1f} {cpu:8.1f}  {sorted({r[2] for r in runs})}")
    (fork_wall, fork_cpu), (plain_wall, plain_cpu) = medians.values()
    print(f"forked/plain: wall {fork_wall / plain_wall:.2f}, CPU {fork_cpu / plain_cpu:.2f} "
          f"({(plain_cpu - fork_cpu) / args.sites:.1f} CPU-s saved per site)")
    print(f"fork server resident memory: {MEMORY['fork server rss'] / 1e9:.2f} GB (peak); one forked site's private "
          f"memory (USS): {MEMORY['forked site uss'] / 1e9:.2f} GB at most")
    return 0 if all(r[2] == 0 for runs in results.values() for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
