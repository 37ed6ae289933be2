"""Where a tiny FLARE round's time goes, read from the simulator's own logs.

Runs FedMSA-tiny on 2 synthetic sites (1 local epoch per round, so FLARE's share shows) for a few settings and
splits each steady round (round 2 on; round 1 carries the site processes' start-up) into

- poll wait: round start -> the site fetched its task (sites ask every ``task_request_interval`` seconds),
- site work: task received -> executor's reply ready (validation of the received model, the local epoch, copies),
- result out: reply ready -> result delivered (result filters, serialisation, FLARE's array download),
- close: the round's last result -> aggregation starts,
- aggregation, persist (the global model saved by the PT persistor), bookkeeping (end of persist -> round finished),
- server gc: ScatterAndGather's ``memory_gc_rounds`` clean-up (gc.collect + malloc_trim) between rounds,

plus the run's fixed costs: start-up until the first task, cross-site evaluation, shut-down. The same validation and
local epoch are also timed in this process without FLARE.

    python bench/bench_round_overhead.py              # ~3 minutes on 2 CPU cores
    python bench/bench_round_overhead.py --rounds 4 --settings 0.5 0.1 0.1:0

A setting is ``INTERVAL[:GC_ROUNDS]``: the sites' task_request_interval in seconds, and optionally the server's
ScatterAndGather ``memory_gc_rounds`` (FLARE's default 1: every round; 0: never), patched into the written job.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import time
from datetime import datetime
from pathlib import Path

import torch

from fedfms.data.synthetic import make_disc_site
from fedfms.flare.fed_job import write_job
from fedfms.flare.simulate import run_simulation
from fedfms.models import ModelConfig
from fedfms.training.trainer import LocalTrainer, TrainConfig

SITES = ["site-1", "site-2"]
LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) - (\S+) - \w+ - (.*)$")


def stamp(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def events(path: Path) -> list[tuple[float, str, str]]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        m = LINE.match(line)
        if m:
            out.append((stamp(m.group(1)), m.group(2), m.group(3)))
    return out


def server_timeline(ws: Path) -> dict:
    ev = events(ws / "server" / "log.txt")
    rounds: dict[int, dict] = {}
    current = None
    t: dict = {"first": ev[0][0], "last": ev[-1][0]}
    for ts, who, msg in ev:
        if m := re.search(r"Round (\d+) started\.", msg):
            current = int(m.group(1))
            rounds[current] = {"start": ts, "results": []}
            if current - 1 in rounds:
                rounds[current - 1]["next"] = ts
        elif current is None:
            continue
        elif "got result from client" in msg and "name=train" in msg:
            rounds[current]["results"].append(ts)
        elif msg.endswith("Start aggregation."):
            rounds[current]["agg_start"] = ts
        elif msg.endswith("End aggregation."):
            rounds[current]["agg_end"] = ts
        elif msg.endswith("End persist model on server."):
            rounds[current]["persist_end"] = ts
        elif re.search(r"Round \d+ finished\.", msg):
            rounds[current]["finished"] = ts
        elif "Finished ScatterAndGather Training" in msg:
            rounds[current]["next"] = ts
        elif "starting workflow cross_site_validate" in msg:
            t["xsite_start"] = ts
        elif "cross_site_validate finalizing" in msg:
            t["xsite_end"] = ts
    t["rounds"] = rounds
    return t


def site_timeline(ws: Path, site: str, first_round: int = 0) -> dict[int, dict]:
    """Per train task of this site: when it arrived, when the executor's reply was ready, when it was delivered."""
    out: dict[int, dict] = {}
    r, pending = first_round - 1, None
    for ts, who, msg in events(ws / site / "log.txt"):
        if "got task assignment: name=train" in msg:
            r += 1
            out[r] = {"got": ts}
            pending = r
        elif pending is not None and who == "FedFMSExecutor" and re.search(r"round \d+: loss", msg):
            out[pending]["ready"] = ts
        elif pending is not None and msg.startswith("SubmitUpdate to: server"):
            out[pending]["sent"] = ts
            pending = None
    return out


def breakdown(ws: Path) -> dict:
    server = server_timeline(ws)
    sites = {s: site_timeline(ws, s) for s in SITES}
    rounds = server["rounds"]
    steady = [r for r in sorted(rounds) if r >= 1 and "next" in rounds[r]]
    rows: dict[str, list[float]] = {k: [] for k in ("period", "poll", "poll_max", "work", "out", "close", "agg",
                                                    "persist", "book", "gc")}
    for r in steady:
        x = rounds[r]
        polls = [sites[s][r]["got"] - x["start"] for s in SITES]
        rows["period"].append(x["next"] - x["start"])
        rows["poll"].append(statistics.mean(polls))
        rows["poll_max"].append(max(polls))
        rows["work"].append(statistics.mean(sites[s][r]["ready"] - sites[s][r]["got"] for s in SITES))
        rows["out"].append(statistics.mean(sites[s][r]["sent"] - sites[s][r]["ready"] for s in SITES))
        rows["close"].append(x["agg_start"] - max(x["results"]))
        rows["agg"].append(x["agg_end"] - x["agg_start"])
        rows["persist"].append(x["persist_end"] - x["agg_end"])
        rows["book"].append(x["finished"] - x["persist_end"])
        rows["gc"].append(x["next"] - x["finished"])
    first_task = min(sites[s][0]["got"] for s in SITES)
    fixed = {"start-up (server up -> first task fetched)": first_task - server["first"],
             "round 1 (first round, sites warm)": rounds[0]["next"] - rounds[0]["start"] - (first_task - rounds[0]["start"]),
             "cross-site evaluation": server.get("xsite_end", server["last"]) - server.get("xsite_start", server["last"]),
             "shut-down (cross-site done -> server log ends)": server["last"] - server.get("xsite_end", server["last"])}
    return {"steady": {k: statistics.mean(v) for k, v in rows.items()} if steady else {}, "fixed": fixed,
            "rounds": len(steady)}


def run(root: Path, data: Path, rounds: int, interval: float, gc_rounds: int | None) -> tuple[float, dict]:
    name = f"tri{interval:g}" + ("" if gc_rounds is None else f"_gc{gc_rounds}")
    job = write_job("fedmsa_tiny", root / f"job_{name}", num_rounds=rounds, min_clients=len(SITES), task_request_interval=interval,
                    train={"epochs": 1}, overwrite=True)
    if gc_rounds is not None:  # the job as FLARE reads it (simulate then uses the edited job as it is)
        path = job / "app" / "config" / "config_fed_server.json"
        config = json.loads(path.read_text())
        for wf in config["workflows"]:
            if wf["path"].endswith("ScatterAndGather"):
                wf["args"]["memory_gc_rounds"] = gc_rounds
        path.write_text(json.dumps(config, indent=2))
    start = time.perf_counter()
    rc = run_simulation(job, root / f"ws_{name}", SITES, data_root=data, quiet=True)
    wall = time.perf_counter() - start
    if rc != 0:
        raise SystemExit(f"error: simulation {name} failed (exit {rc}); see {root / f'ws_{name}' / 'server' / 'log.txt'}")
    return wall, breakdown(root / f"ws_{name}")


def local_reference(data: Path) -> tuple[float, float]:
    """Seconds of the received model's validation and of one local epoch, in this process, no FLARE."""
    torch.set_num_threads(1)
    trainer = LocalTrainer(ModelConfig(variant="tiny", mode="fedmsa", pretrained=False, init_seed=0),
                           TrainConfig(**{"epochs": 1, "batch_size": 6, "lr": 3e-3, "loss": "bce_dice", "val_fraction": 0.2,
                                          "threads": 1, "device": "cpu", "progress": False}), str(data / "site-1"))
    trainer.fit(), trainer.evaluate("val")  # warm-up
    t0 = time.perf_counter()
    for _ in range(3):
        trainer.evaluate("val")
    t1 = time.perf_counter()
    for _ in range(3):
        trainer.fit()
    return (t1 - t0) / 3, (time.perf_counter() - t1) / 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--settings", nargs="+", default=["0.5", "0.1", "0.1:0"],
                        help="INTERVAL[:GC_ROUNDS] per run (default: the tiny jobs' 0.5 s; 0.1 s; 0.1 s without server gc)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench_round_overhead_"))
    data = root / "data"
    for i, site in enumerate(SITES):
        make_disc_site(data / site, site=site, num_volumes=6, slices_per_volume=4, seed=i)
    results = []
    for setting in args.settings:
        interval, _, gc = setting.partition(":")
        wall, b = run(root, data, args.rounds, float(interval), int(gc) if gc else None)
        results.append((setting, wall, b))
    val_s, epoch_s = local_reference(data)

    print(f"## FedMSA-tiny, 2 sites x 24 slices (20 train / 4 val), 1 local epoch per round, {args.rounds} rounds; "
          f"mean of rounds 2..{args.rounds} (s)")
    head = [f"interval {s.split(':')[0]} s" + (f", server gc every {s.split(':')[1]} rounds" if ":" in s else "")
            for s, _, _ in results]
    labels = [("period", "round period (start -> next start)"), ("poll", "poll wait, mean of sites"),
              ("poll_max", "poll wait, slower site"), ("work", "site work (val before + epoch + copies)"),
              ("out", "result out (filters, serialise, send)"), ("close", "last result -> aggregation"),
              ("agg", "aggregation"), ("persist", "persist global model"), ("book", "bookkeeping (monitor, selector)"),
              ("gc", "server gc between rounds")]
    print("| | " + " | ".join(head) + " |")
    print("|---|" + "---|" * len(head))
    for key, label in labels:
        print(f"| {label} | " + " | ".join(f"{b['steady'].get(key, float('nan')):.3f}" for _, _, b in results) + " |")
    for key in results[0][2]["fixed"]:
        print(f"| {key} | " + " | ".join(f"{b['fixed'][key]:.2f}" for _, _, b in results) + " |")
    print("| whole simulation, wall | " + " | ".join(f"{w:.1f}" for _, w, _ in results) + " |")
    print(f"\nwithout FLARE, same process: validation of the received model {val_s:.3f} s, local epoch {epoch_s:.3f} s "
          f"(site-1, 1 thread)")
    print(f"workspaces kept in {root}")


if __name__ == "__main__":
    main()
