"""Does bf16 prediction give the masks fp32 gives? The check behind `fedfms predict`'s bf16 autocast on CUDA.

Runs the same slices through the same model twice, full precision (amp "off") and bf16 autocast ("bf16"), in
``predict``'s own batched path, and prints the logit differences, the share of mask pixels that flip and the Dice
between the two masks. Random weights put many logits near 0, where any rounding flips a pixel, so the flip share
is an upper bound; pass --job/--weights (a trained global model) for the figure that matters.

    python bench/gpu_check_predict.py                                  # vit_b, random weights, 8 random slices
    python bench/gpu_check_predict.py --job jobs/fedmsa --weights FL_global_model.pt --checkpoint sam_vit_b_01ec64.pth
    python bench/gpu_check_predict.py --device cpu --variant tiny      # the script itself, on a CPU
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from fedfms.models import ModelConfig, build_model
from fedfms.training.predict import batched_logits


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--variant", default="vit_b", help="model size for random weights (ignored with --job)")
    ap.add_argument("--job", help="job folder whose model config to use (with --weights)")
    ap.add_argument("--weights", help="a saved global model (travel set)")
    ap.add_argument("--checkpoint", help="SAM checkpoint for the frozen parts (with --job)")
    ap.add_argument("--slices", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but no CUDA GPU here; pass --device cpu to check the script itself")
    if args.job:
        from fedfms.flare.jobs import job_model_config
        from fedfms.training.predict import load_model

        cfg = ModelConfig.from_dict(job_model_config(args.job))
        if args.checkpoint:
            cfg.checkpoint = args.checkpoint
        model = load_model(cfg, args.weights) if args.weights else build_model(cfg)
    else:
        torch.manual_seed(0)
        model = build_model(ModelConfig(variant=args.variant, mode="fedmsa", pretrained=False, init_seed=0))
    model = model.to(device).eval()
    rng = np.random.default_rng(0)
    size = model.image_size
    # smooth random "anatomy" rather than white noise: a blurred field, as images are
    field = rng.random((args.slices, size // 16, size // 16, 3)).astype(np.float32)
    slices = np.kron(field, np.ones((1, 16, 16, 1), np.float32))
    full = torch.cat(list(batched_logits(model, slices, args.batch, amp="off")))
    half = torch.cat(list(batched_logits(model, slices, args.batch, amp="bf16")))
    diff = (full - half).abs()
    mask_full, mask_half = full > 0, half > 0
    inter = (mask_full & mask_half).sum().item()
    total = mask_full.sum().item() + mask_half.sum().item()
    row = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
           "model": args.job or args.variant, "weights": args.weights or "random", "slices": args.slices,
           "max_abs_logit_diff": round(diff.max().item(), 5), "mean_abs_logit_diff": round(diff.mean().item(), 5),
           "logit_scale (mean |fp32 logit|)": round(full.abs().mean().item(), 5),
           "pixels_flipped": round((mask_full != mask_half).float().mean().item(), 6),
           "dice_fp32_vs_bf16": round(2 * inter / total, 6) if total else 1.0}
    print(json.dumps(row, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
