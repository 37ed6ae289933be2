"""Manual GPU check of FednnU-Net at the paper's configuration (not collected by pytest; CI has no GPU).

    PYTHONPATH=custom python tests/nnunet/gpu_check_nnunet.py OUT_DIR [--device cuda] [--mask 256] [--iterations 50]

1. Three synthetic sites prepared like the paper's data (1024 px images, 256 px masks); their fingerprints merged
   and planned with nnU-Net's defaults (the ``fednnunet`` job's settings): the plan, its parameter count and the
   megabytes each site sends per round.
2. One site trains ``--iterations`` nnU-Net iterations per round for 3 rounds on the device (nnU-Net's float16
   autocast + GradScaler): seconds per iteration, peak GPU memory, validation Dice per round.
3. The trained network scored on a held-out site with nnU-Net's predictor (mirroring on): Dice under both rules.
4. The ``fednnunet`` job in FLARE's simulator on two sites, 2 rounds of ``--iterations``: exit code, plan digest at
   every site, rounds averaged.

``--device cpu --mask 64 --iterations 2`` runs the same steps small on a CPU (a smoke test of this script).
"""

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from fedfms.data.synthetic import make_disc_site
from fedfms.nnunet.config import NnUNetConfig, PAPER_TRAIN
from fedfms.nnunet.evaluate import evaluate_sites, write_plan
from fedfms.nnunet.fingerprint import merge_fingerprints, site_fingerprint
from fedfms.nnunet.plan import describe, make_plan, plan_digest, travel_spec
from fedfms.nnunet.sitedata import NnUNetSiteData
from fedfms.nnunet.trainer import NnUNetSiteTrainer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--device", default="cuda")
    p.add_argument("--mask", type=int, default=256)
    p.add_argument("--iterations", type=int, default=50)
    a = p.parse_args()
    if a.device.startswith("cuda"):
        assert torch.cuda.is_available(), "no CUDA device"
    shutil.rmtree(a.out, ignore_errors=True)
    a.out.mkdir(parents=True)
    sites = [make_disc_site(a.out / "data" / s, site=s, num_volumes=6, slices_per_volume=8, size=a.mask,
                            image_size=4 * a.mask, mask_size=a.mask, brightness=b, seed=i)
             for i, (s, b) in enumerate((("a", 0.3), ("b", 0.4), ("c", 0.35)))]
    report = {"device": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu"}

    # 1. the plan
    cfg = NnUNetConfig.from_dict({**PAPER_TRAIN, "iterations_per_epoch": a.iterations, "total_epochs": 3, "device": a.device})
    data = {s.name: NnUNetSiteData(s, cfg.val_fraction, cfg.split_seed) for s in sites}
    start = time.perf_counter()
    plan = make_plan(merge_fingerprints({n: site_fingerprint(d) for n, d in list(data.items())[:2]}), cfg)
    spec = travel_spec(plan)
    params = sum(torch.Size(shape).numel() for shape, _ in spec.values())
    report["plan"] = {"describe": describe(plan), "digest": plan_digest(plan), "parameters": params,
                      "mb_per_round": round(params * 4 / 1e6, 1), "seconds": round(time.perf_counter() - start, 1)}
    print(report["plan"], flush=True)

    # 2. a site trains on the device
    trainer = NnUNetSiteTrainer(plan, cfg, data["a"])
    if a.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    rounds = []
    for r in range(3):
        result = trainer.train_round(None, round_index=r)
        rounds.append({"round": r, "val_dice_before": result.metrics["val_before"]["dice"],
                       "loss": result.metrics["train"]["loss"], "lr": result.metrics["train"]["lr"],
                       "s_per_iteration": result.metrics["train"]["seconds"] / max(result.metrics["train"]["steps"], 1)})
        print(rounds[-1], flush=True)
    report["training"] = {"rounds": rounds, "val_dice_after": trainer.evaluate("val")["dice"]}
    if a.device.startswith("cuda"):
        report["training"]["peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)

    # 3. held-out scoring with nnU-Net's predictor
    folder = a.out / "model"
    write_plan(plan, folder)
    torch.save({"model": trainer.travel_weights()}, folder / "FL_global_model.pt")
    start = time.perf_counter()
    row = evaluate_sites({"variant": "nnunet", "num_classes": 1}, folder / "FL_global_model.pt", [sites[2]], device=a.device)[0]
    report["held_out"] = {k: row[k] for k in ("dice", "iou", "dice_reference", "iou_reference", "volume_dice", "num_samples")}
    report["held_out"]["seconds"] = round(time.perf_counter() - start, 1)
    print(report["held_out"], flush=True)

    # 4. the job in FLARE's simulator, two sites
    from fedfms.flare.jobs import RECIPE_KEY
    from fedfms.run_record import read_run_record
    from fedfms.flare.fed_job import write_job
    from fedfms.flare.simulate import run_simulation, server_job_dir

    job = write_job("fednnunet", a.out / "job", num_rounds=2, sites=["a", "b"], samples_per_site=48,
                              train={"iterations_per_epoch": a.iterations, "device": a.device})
    meta = json.loads((job / "meta.json").read_text())
    meta.pop(RECIPE_KEY)  # used exactly as written here (the simulator renders a job with a recipe again)
    (job / "meta.json").write_text(json.dumps(meta))
    start = time.perf_counter()
    rc = run_simulation(job, a.out / "ws", ["a", "b"], data_root=a.out / "data", threads=2, quiet=True)
    record = read_run_record(server_job_dir(a.out / "ws"))
    report["simulator"] = {"exit_code": rc, "status": record["status"], "seconds": round(time.perf_counter() - start, 1),
                           "val_dice": [r["val_dice"] for r in record["rounds"]]}
    print(report["simulator"], flush=True)
    (a.out / "gpu_check_nnunet.json").write_text(json.dumps(report, indent=2))
    assert rc == 0 and report["held_out"]["num_samples"] == 48
    print("OK")


if __name__ == "__main__":
    sys.exit(main())
