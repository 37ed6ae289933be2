"""Prediction speed: seconds per image one slice per forward pass vs batched (``predict_slices``), random weights.

tiny SAM (its native size) and, unless ``--skip-vit-b``, vit_b at the paper's 1024 px. On a CPU autocast stays off
(fp32); on CUDA ``predict_slices`` runs under bf16 autocast.

    python bench/bench_predict.py                          # ~2 minutes on 2 CPU cores
    python bench/bench_predict.py --skip-vit-b
    python bench/bench_predict.py --vit-b-images 8 --vit-b-batch 8   # on a GPU
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from fedfms.models import ModelConfig, build_model
from fedfms.training.predict import PREDICT_BATCH, predict_slices
from fedfms.training.trainer import pick_device


def seconds_per_image(model, images: np.ndarray, batch_size: int, repeats: int, device: torch.device) -> float:
    predict_slices(model, images[:batch_size], batch_size=batch_size)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        predict_slices(model, images, batch_size=batch_size)  # returns numpy: synchronised
    return (time.perf_counter() - start) / (repeats * len(images))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--tiny-images", type=int, default=32)
    parser.add_argument("--batch", type=int, default=PREDICT_BATCH)
    parser.add_argument("--skip-vit-b", action="store_true")
    parser.add_argument("--vit-b-images", type=int, default=2)
    parser.add_argument("--vit-b-batch", type=int, default=2)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    runs = [("tiny", None, args.tiny_images, args.batch, 3)]
    if not args.skip_vit_b:
        runs.append(("vit_b", 1024, args.vit_b_images, args.vit_b_batch, 1))
    print(f"device {device}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}")
    print("| model | input px | images | s/image, batch 1 | s/image, batched | batch | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for variant, size, n, batch, repeats in runs:
        model = build_model(ModelConfig(variant, "fedmsa", num_classes=1, image_size=size, pretrained=False)).eval().to(device)
        images = np.random.default_rng(0).uniform(0, 1, size=(n, 256, 256, 3)).astype(np.float32)
        one = seconds_per_image(model, images, 1, repeats, device)
        many = seconds_per_image(model, images, batch, repeats, device)
        print(f"| {variant} | {model.image_size} | {n} | {one:.4f} | {many:.4f} | {batch} | {one / many:.2f}x |", flush=True)
        del model


if __name__ == "__main__":
    main()
