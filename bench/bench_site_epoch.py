#!/usr/bin/env python3
"""What a site actually gets: images per second of a real local epoch (PNG decoding, the project's DataLoader,
host-to-device copies and the training step) next to the step alone on a batch already on the device, and, on
a GPU, the model FLOP utilisation (FLOPs per image counted with torch.utils.flop_counter, peak from the device).

    python bench/bench_site_epoch.py --site /data/prostate/BIDMC --variant vit_b --mode fedmsa   # a prepared site
    python bench/bench_site_epoch.py --variant tiny --samples 48                                 # a synthetic one

Prints one JSON line per setting (num_workers / cache) and a table. The ratio real epoch / step only is what the
data path costs; issue #13's goal is >= 0.9 on a GPU site.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

# dense bf16 peak, TFLOP/s, by device name (vendor data sheets); MFU is left out for other devices
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0,
                    "RTX 4090": 165.0, "RTX 6000 Ada": 365.0}


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--site", help="a prepared site folder (default: a synthetic one)")
    ap.add_argument("--variant", default="tiny")
    ap.add_argument("--mode", default="fedmsa", choices=["fedsam", "fedmsa"])
    ap.add_argument("--samples", type=int, default=48, help="synthetic site size")
    ap.add_argument("--batch-size", type=int, default=6)
    ap.add_argument("--workers", nargs="+", default=["0", "auto"], help="num_workers settings to compare")
    ap.add_argument("--steps", type=int, default=5, help="timed steps for the step-only figure")
    args = ap.parse_args()

    from fedfms.data.synthetic import make_disc_site
    from fedfms.models import ModelConfig, build_model_on_meta
    from fedfms.reporting.tables import count_flops
    from fedfms.training.trainer import LocalTrainer, TrainConfig, pick_device

    model_cfg = ModelConfig(variant=args.variant, mode=args.mode, pretrained=False)
    device = pick_device("auto")
    flops_train = count_flops(build_model_on_meta(model_cfg), train=True) if args.variant != "unet" else None
    peak = peak_tflops(device)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedfms_epoch_") as tmp:
        site = args.site
        if site is None:
            meta = build_model_on_meta(model_cfg)
            site = make_disc_site(Path(tmp) / "site", num_volumes=max(2, args.samples // 8), slices_per_volume=8,
                                  image_size=meta.image_size, mask_size=meta.mask_size)
        for workers in args.workers:
            for cache in (False, True):
                nw = workers if workers == "auto" else int(workers)
                cfg = TrainConfig(batch_size=args.batch_size, num_workers=nw, cache_decoded=cache, val_fraction=0.0001,
                                  progress=False)
                trainer = LocalTrainer(model_cfg, cfg, site)
                batch = next(iter(trainer._loader("train", shuffle=True)))
                images, masks = batch["image"].to(device), batch["mask"].to(device)
                for _ in range(2):  # warm-up (allocations, autotuning)
                    trainer.step(images, masks)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(args.steps):
                    trainer.step(images, masks)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                step_ips = args.steps * len(images) / (time.perf_counter() - start)
                trainer.fit(epochs=1)  # first epoch: decoding (and the cache filling, if any)
                start = time.perf_counter()
                trainer.fit(epochs=1)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                epoch_ips = trainer.num_train_samples / (time.perf_counter() - start)
                row = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                       "variant": args.variant, "mode": args.mode, "num_workers": trainer.num_workers, "cache": cache,
                       "samples": trainer.num_train_samples, "step_only_img_s": round(step_ips, 2),
                       "epoch_img_s": round(epoch_ips, 2), "ratio": round(epoch_ips / step_ips, 3),
                       "train_gflop_per_img": round(flops_train / 1e9, 2) if flops_train else None,
                       "mfu": round(epoch_ips * flops_train / 1e12 / peak, 4) if (peak and flops_train) else None}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print()
    print("| device | workers | cache | step only img/s | real epoch img/s | ratio | MFU |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else "needs a known GPU"
        print(f"| {r['device']} | {r['num_workers']} | {r['cache']} | {r['step_only_img_s']} | {r['epoch_img_s']} | "
              f"{r['ratio']} | {mfu} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
