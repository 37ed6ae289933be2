"""Real-size SAM training on a GPU: step time and peak memory of FedSAM vs FedMSA.

Times ``LocalTrainer.step`` (forward, BCE loss, backward, Adam) at the paper's size (1024x1024 input,
batch 6 unless --batch) with random weights (speed and memory do not depend on the values), for vit_b and
vit_l, fp32 vs bf16 autocast, segment-anything's attention vs the fused one, with and without per-block
activation checkpointing. Also times inference.

    python bench/gpu_bench.py                 # everything (a few minutes on an H100)
    python bench/gpu_bench.py --variants vit_b --batch 2
    python bench/gpu_bench.py --variants vit_b --compile   # adds bf16 + fused + regional torch.compile rows
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "custom"))

from fedfms.data.synthetic import make_disc_site
from fedfms.models import ModelConfig, build_model, count_parameters
from fedfms.training.trainer import LocalTrainer, TrainConfig


def time_steps(trainer: LocalTrainer, batch: int, size: int, warmup: int, steps: int) -> tuple[float, float]:
    images = torch.rand(batch, 3, size, size)
    masks = (torch.rand(batch, 1, size // 4, size // 4) > 0.5).float()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        trainer.step(images, masks)
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**30


def run_config(site: Path, variant: str, mode: str, amp: str, ckpt: bool, fused: bool, batch: int, warmup: int, steps: int,
               compile_mode: str | bool = False) -> dict:
    row = {"variant": variant, "mode": mode, "precision": "bf16" if amp == "bf16" else "fp32", "checkpointing": ckpt,
           "attention": "fused" if fused else "stock", "batch": batch, "compile": compile_mode}
    trainer = None
    try:
        model_cfg = ModelConfig(variant=variant, mode=mode, pretrained=False, activation_checkpointing=ckpt, fused_attention=fused)
        train_cfg = TrainConfig(batch_size=batch, amp=amp, device="cuda", progress=False, compile=compile_mode)
        trainer = LocalTrainer(model_cfg, train_cfg, str(site))
        if compile_mode:
            warmup = max(warmup, 3)  # the first steps compile the blocks
        row["trainable"] = count_parameters(trainer.model, trainable_only=True)
        step_s, peak = time_steps(trainer, batch, 1024, warmup, steps)
        row.update(step_s=round(step_s, 4), images_per_s=round(batch / step_s, 2), peak_gib=round(peak, 2))
    except torch.cuda.OutOfMemoryError:
        row["error"] = "out of memory"
    finally:
        trainer = None
        torch.cuda.empty_cache()
    return row


@torch.no_grad()
def inference_time(variant: str, amp: str, fused: bool, repeats: int = 10) -> float:
    model = build_model(ModelConfig(variant=variant, mode="fedmsa", pretrained=False, fused_attention=fused)).cuda().eval()
    x = torch.rand(1, 3, 1024, 1024, device="cuda")
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if amp == "bf16" else torch.autocast("cuda", enabled=False)
    times = []
    for i in range(repeats + 3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with ctx:
            model(x)
        torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["vit_b", "vit_l"])
    parser.add_argument("--batch", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--compile", action="store_true", help='also bf16 + fused attention with compile: "regional"')
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: this benchmark needs a CUDA GPU; bench/bench_models.py measures the CPU")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, batch {args.batch}, input 1024x1024", flush=True)
    site = Path(tempfile.mkdtemp()) / "site"
    make_disc_site(site, num_volumes=2, slices_per_volume=2, size=32, image_size=64, mask_size=16)
    rows = []
    for variant in args.variants:
        for mode in ("fedsam", "fedmsa"):
            # (precision, activation checkpointing, fused attention); stock attention = segment-anything's
            configs = [("off", False, False), ("bf16", False, False), ("off", False, True), ("bf16", False, True),
                       ("bf16", True, True)]
            if variant != "vit_b":
                configs = [("bf16", False, False), ("bf16", False, True), ("bf16", True, True)]
            configs = [(*c, False) for c in configs] + ([("bf16", False, True, "regional")] if args.compile else [])
            for amp, ckpt, fused, compile_mode in configs:
                row = run_config(site, variant, mode, amp, ckpt, fused, args.batch, args.warmup, args.steps, compile_mode)
                rows.append(row)
                print(json.dumps(row), flush=True)
    for variant in args.variants:
        for amp, fused in (("off", False), ("bf16", False), ("bf16", True)):
            row = {"variant": variant, "inference_s_per_image": round(inference_time(variant, amp, fused), 4),
                   "precision": "bf16" if amp == "bf16" else "fp32", "attention": "fused" if fused else "stock"}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| variant | mode | precision | attention | checkpointing | s/step (B=%d) | images/s | peak GiB |" % args.batch)
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "mode" in r:
            print(f"| {r['variant']} | {r['mode']} | {r['precision']} | {r['attention']} | {r['checkpointing']} | "
                  f"{r.get('step_s', r.get('error'))} | {r.get('images_per_s', '-')} | {r.get('peak_gib', '-')} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
