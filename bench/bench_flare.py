"""FLARE's overhead: a simulator round vs the same local epoch without FLARE, and bytes sent per site.

1. tiny SAM, 2 synthetic sites: wall time per federated round (simulator, from a 1-round and a 3-round run)
   next to one local epoch of ``LocalTrainer`` on the same data, in the same process, without FLARE.
2. vit_b (random init; 256 px input so a CPU can run it, 1 step of batch 1 per round): the bytes each site's
   result message carried to the server (read from FLARE's own log line) for FedSAM vs FedMSA, next to
   the travel-set prediction at 256 px and at the paper's 1024 px.

    python bench/bench_flare.py            # ~4-6 minutes on 2 CPU cores
    python bench/bench_flare.py --skip-vit-b
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from pathlib import Path

import torch

from fedfms.data.synthetic import make_disc_site
from fedfms.flare.fed_job import write_job
from fedfms.flare.simulate import run_simulation
from fedfms.models import ModelConfig, build_model_on_meta, travel_bytes, travel_spec
from fedfms.training.trainer import LocalTrainer, TrainConfig

SITES = ["site-1", "site-2"]
# FLARE 2.9 sends model arrays out of band: the message holds a reference and the receiver downloads the
# arrays from the sender, which logs the finished transfer with its byte count.
SERVED_LINE = re.compile(r"download tx \S+ done: status=finished .*?\(([\d,]+) bytes\)")


def simulate(root: Path, name: str, variant: str, rounds: int, data: Path, quiet: bool = True, **overrides) -> float:
    job = write_job(variant, root / f"job_{name}", num_rounds=rounds, min_clients=len(SITES), **overrides)
    start = time.perf_counter()
    rc = run_simulation(job, root / f"ws_{name}", SITES, data_root=data, quiet=quiet)
    if rc != 0:
        raise SystemExit(f"error: simulation {name} failed (exit {rc}); see {root / f'ws_{name}' / 'server' / 'log.txt'}")
    return time.perf_counter() - start


def sent_bytes(workspace: Path, site: str) -> list[int]:
    """Bytes of each model array transfer this site served, in order (the first is its round-0 result)."""
    return [int(m.group(1).replace(",", "")) for m in SERVED_LINE.finditer((workspace / site / "log.txt").read_text())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-vit-b", action="store_true")
    parser.add_argument("--skip-overhead", action="store_true")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench_flare_"))
    data = root / "data"
    for i, site in enumerate(SITES):
        make_disc_site(data / site, site=site, num_volumes=6, slices_per_volume=4, seed=i)

    if not args.skip_overhead:
        overhead(root, data)
    if not args.skip_vit_b:
        upload_bytes(root, data)
    print(f"\nworkspaces kept in {root}")


def overhead(root: Path, data: Path) -> None:
    print("## 1. tiny SAM (FedMSA), 2 sites x 24 slices, 1 local epoch per round", flush=True)
    one = simulate(root, "r1", "fedmsa_tiny", 1, data)
    three = simulate(root, "r3", "fedmsa_tiny", 3, data)
    per_round = (three - one) / 2
    one_d = simulate(root, "r1d", "fedmsa_tiny", 1, data, task_request_interval=2.0)
    three_d = simulate(root, "r3d", "fedmsa_tiny", 3, data, task_request_interval=2.0)
    torch.set_num_threads(1)
    trainer = LocalTrainer(ModelConfig(variant="tiny", mode="fedmsa", pretrained=False),
                           TrainConfig(lr=1e-3, loss="bce_dice", val_fraction=0.2, threads=1, progress=False), str(data / "site-1"))
    trainer.fit()
    start = time.perf_counter()
    for _ in range(3):
        trainer.fit()
    epoch = (time.perf_counter() - start) / 3
    print(f"simulator job, 1 round: {one:.1f} s; 3 rounds: {three:.1f} s -> {per_round:.2f} s per extra round "
          f"(sites poll every 0.5 s, the tiny jobs' setting)")
    print(f"with FLARE's default 2 s task_request_interval: 1 round {one_d:.1f} s; 3 rounds {three_d:.1f} s -> "
          f"{(three_d - one_d) / 2:.2f} s per extra round")
    print(f"same local epoch without FLARE: {epoch:.3f} s ({trainer.num_train_samples} samples)")
    print(f"FLARE overhead per round (start-up excluded): {per_round - epoch:.2f} s", flush=True)


def upload_bytes(root: Path, data: Path) -> None:
    print("\n## 2. bytes sent per site per round, vit_b (random init, 256 px, 1 step)", flush=True)
    rows = []
    for mode in ("fedsam", "fedmsa"):
        variant = f"{mode}_tiny"  # tiny's CPU training settings, with the model swapped for vit_b
        model = {"variant": "vit_b", "image_size": 256, "init_seed": 0}
        simulate(root, f"vitb_{mode}", variant, 1, data, model=model,
                 train={"batch_size": 1, "max_steps_per_epoch": 1, "threads": 1}, quiet=True)
        measured = sent_bytes(root / f"ws_vitb_{mode}", "site-1")
        at256 = travel_bytes(travel_spec(build_model_on_meta(ModelConfig(variant="vit_b", mode=mode, image_size=256)), mode))
        at1024 = travel_bytes(travel_spec(build_model_on_meta(ModelConfig(variant="vit_b", mode=mode)), mode))
        rows.append((mode, measured[0] if measured else None, at256, at1024))
    print("| mode | site-1's round result as FLARE sent it (256 px) | travel set fp32 (256 px) | "
          "travel set fp32 (1024 px) | 16-bit (1024 px) |")
    print("|---|---|---|---|---|")
    for mode, measured, at256, at1024 in rows:
        sent = f"{measured / 1e6:.1f} MB" if measured else "not found in log"
        print(f"| {mode} | {sent} | {at256 / 1e6:.1f} MB | {at1024 / 1e6:.1f} MB | {at1024 / 2e6:.1f} MB |")


if __name__ == "__main__":
    main()
