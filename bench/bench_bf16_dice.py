"""How far does a Dice score move when the logits come from bf16 autocast instead of fp32?

The project scores on CUDA under bf16 autocast (like training); the authors' code scored in fp32. The paper code's
rule thresholds the *raw logits* at 0.1, 0.3, 0.5, 0.7 and 0.9, so every logit that bf16 rounding carries across
one of those five values changes its score; this project's rule thresholds sigmoid at 0.5 (a logit of 0) only.
This script runs the same held-out cases through the same model twice, fp32 and bf16 autocast (the autocast the
project's scoring uses, ``fedfms.training.trainer.autocast_for``), and prints each case's Dice under both rules
in both precisions, their differences, the pixels flipped at each threshold, and the means.

Data: synthetic sites of bright discs on noise (``fedfms.data.synthetic``) at the model's sizes, one to train on
and a held-out one to score. The model is the reference flavour's FedMSA (``--flavour project`` for the other);
``--train-epochs`` trains it first in fp32 (default: 20 for ``tiny``, none for the full-size variants, which run
with random init unless ``--checkpoint`` names an official SAM checkpoint). Random weights put many logits near
the thresholds, so their differences say more about rounding than about a trained model; the tiny model trained on
the discs, or a checkpoint plus training on a GPU, is the closer figure.

    python bench/bench_bf16_dice.py                                   # tiny at 128 px, trained 20 epochs, CPU
    python bench/bench_bf16_dice.py --variant vit_b --cases 2         # vit_b at 1024 px, random init, CPU
    python bench/bench_bf16_dice.py --device cuda --variant vit_b --cases 16 --train-epochs 2 \\
        --checkpoint sam_vit_b_01ec64.pth                             # on a GPU
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from fedfms.data.site_dataset import SiteDataset
from fedfms.data.synthetic import make_disc_site
from fedfms.flavours import FLAVOURS, flavour_overrides
from fedfms.models import ModelConfig, get_variant
from fedfms.training.metrics import REFERENCE_THRESHOLDS, SegmentationMetric
from fedfms.training.trainer import LocalTrainer, TrainConfig, autocast_for


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--variant", default="tiny", help="tiny (default), vit_b, vit_l, vit_h")
    ap.add_argument("--image-size", type=int, default=None, help="default: the variant's own (tiny 128, SAM 1024)")
    ap.add_argument("--flavour", default="reference", choices=list(FLAVOURS))
    ap.add_argument("--cases", type=int, default=16, help="held-out slices scored (default 16)")
    ap.add_argument("--train-epochs", type=int, default=None, help="fp32 training first (default: 20 for tiny, else 0)")
    ap.add_argument("--checkpoint", help="official SAM checkpoint (default: random init)")
    ap.add_argument("--batch", type=int, default=2, help="slices per forward pass (default 2)")
    return ap.parse_args(argv)


def per_case_scores(logits: torch.Tensor, masks: torch.Tensor) -> list[dict]:
    """Each case's Dice under both rules, from the project's own metric (one case per update)."""
    rows = []
    for i in range(len(logits)):
        metric = SegmentationMetric(["disc"])
        metric.update(logits[i : i + 1], masks[i : i + 1], [f"case{i}"])
        result = metric.aggregate()
        rows.append({"reference": result["dice_reference"], "project": result["dice"]})
    return rows


def mean_scores(logits: torch.Tensor, masks: torch.Tensor) -> dict:
    metric = SegmentationMetric(["disc"])
    metric.update(logits, masks, [f"case{i}" for i in range(len(logits))])
    result = metric.aggregate()
    return {"reference": result["dice_reference"], "project": result["dice"]}


def run_logits(model, images: torch.Tensor, device: torch.device, amp: str, batch: int) -> tuple[torch.Tensor, float]:
    out, start = [], time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(images), batch):
            with autocast_for(device, amp):
                out.append(model(images[i : i + batch].to(device)).float().cpu())
    return torch.cat(out), time.perf_counter() - start


def fmt(x: float) -> str:
    return "nan" if x != x else f"{x:.6f}"


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but no CUDA GPU here; run with --device cpu")
    variant = get_variant(args.variant, args.image_size)
    epochs = args.train_epochs if args.train_epochs is not None else (20 if args.variant == "tiny" else 0)
    overrides = flavour_overrides(args.flavour)
    cfg = ModelConfig(args.variant, "fedmsa", image_size=args.image_size, pretrained=bool(args.checkpoint),
                      checkpoint=args.checkpoint, **overrides["model"])
    sizes = dict(image_size=variant.image_size, mask_size=variant.mask_size)
    with tempfile.TemporaryDirectory(prefix="bench_bf16_dice_") as tmp:
        train_site = make_disc_site(Path(tmp) / "train", "train", num_volumes=4, slices_per_volume=6, seed=0, **sizes)
        test_site = make_disc_site(Path(tmp) / "test", "test", num_volumes=max(1, -(-args.cases // 4)),
                                   slices_per_volume=4, seed=1, brightness=0.3, **sizes)
        start = time.perf_counter()
        trainer = LocalTrainer(cfg, TrainConfig(batch_size=4, lr=1e-3, val_fraction=0.0, amp="off", device=args.device,
                                                num_workers=0, progress=False, **overrides["train"]), str(train_site))
        if epochs:
            trainer.fit(epochs)
        train_s = time.perf_counter() - start
        model = trainer.model.to(device).eval()
        data = SiteDataset(test_site)
        items = [data[i] for i in range(min(args.cases, len(data)))]
    images = torch.stack([it["image"] for it in items])
    masks = torch.stack([it["mask"] for it in items])

    full, full_s = run_logits(model, images, device, "off", args.batch)
    half, half_s = run_logits(model, images, device, "bf16", args.batch)

    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    print(f"# {args.variant} FedMSA at {variant.image_size} px, flavour {args.flavour}, "
          f"{'checkpoint ' + args.checkpoint if args.checkpoint else 'random init'}, "
          f"{epochs} fp32 training epoch(s) on synthetic discs ({train_s:.0f} s); {len(items)} held-out cases; {name}; "
          f"torch {torch.__version__}")
    print(f"# forward passes: fp32 {full_s:.1f} s, bf16 autocast {half_s:.1f} s (other processes share this machine)")
    diff = (full - half).abs()
    print(f"# logits: mean |fp32| {full.abs().mean():.4f}, |fp32 - bf16| max {diff.max():.5f}, mean {diff.mean():.6f}")
    print(f"# reference rule: thresholds {', '.join(f'{t:g}' for t in REFERENCE_THRESHOLDS)} on the raw logits, averaged; "
          "project rule: sigmoid > 0.5 (empty/empty left out)")
    print()
    header = ["case", "ref fp32", "ref bf16", "ref bf16-fp32", "proj fp32", "proj bf16", "proj bf16-fp32",
              "pixels flipped at " + "/".join(f"{t:g}" for t in REFERENCE_THRESHOLDS)]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    a, b = per_case_scores(full, masks), per_case_scores(half, masks)
    ref_diffs, proj_diffs = [], []
    for i, (x, y) in enumerate(zip(a, b)):
        flips = [int(((full[i] > t) != (half[i] > t)).sum()) for t in REFERENCE_THRESHOLDS]
        rd, pd = y["reference"] - x["reference"], y["project"] - x["project"]
        ref_diffs.append(rd)
        if pd == pd:
            proj_diffs.append(pd)
        print(f"| {i} | {fmt(x['reference'])} | {fmt(y['reference'])} | {rd:+.2e} | {fmt(x['project'])} | "
              f"{fmt(y['project'])} | {pd:+.2e} | {'/'.join(map(str, flips))} |")
    m_full, m_half = mean_scores(full, masks), mean_scores(half, masks)
    print()
    for rule, diffs in (("reference", ref_diffs), ("project", proj_diffs)):
        abs_diffs = [abs(d) for d in diffs] or [float("nan")]
        print(f"{rule:9s} rule: mean Dice fp32 {fmt(m_full[rule])}, bf16 {fmt(m_half[rule])}, "
              f"difference {m_half[rule] - m_full[rule]:+.2e}; per case |difference| max {max(abs_diffs):.2e}, "
              f"median {statistics.median(abs_diffs):.2e}")
    print(f"pixels per case: {full[0].numel()}")
    if not (full > min(REFERENCE_THRESHOLDS)).any():
        print("warning: the fp32 model predicts no foreground at any threshold (a collapsed model); the differences "
              "above say nothing about bf16")
    return 0


if __name__ == "__main__":
    sys.exit(main())
