"""FedSAM vs FedMSA: what trains, what each site uploads per round, and what a training step costs here.

    python bench/bench_models.py            # counts for vit_b/vit_l + step times for tiny and vit_b@256
    python bench/bench_models.py --quick    # skip the vit_b timing (a minute or two on a CPU)

Counts come from models built on the meta device (no memory, no checkpoint). Step times use random
initialisation and random data: forward + BCE loss + backward + Adam step, median and best after a warm-up.
Other processes on the same cores distort the times: the load average is printed with them.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from fedfms.models import ModelConfig, build_model, build_model_on_meta
from fedfms.models.travel import count_parameters, travel_bytes, travel_spec

MODES = ("fedsam", "fedmsa")
MB = 1e6


def size_rows(variants, num_classes: int) -> list[list[str]]:
    rows = []
    for variant in variants:
        for mode in MODES:
            model = build_model_on_meta(ModelConfig(variant, mode, num_classes=num_classes))
            spec = travel_spec(model, mode)
            rows.append([
                variant, mode,
                f"{count_parameters(model):,}",
                f"{count_parameters(model, trainable_only=True):,}",
                f"{travel_bytes(spec) / MB:.1f}",
                f"{travel_bytes(spec, bytes_per_value=2) / MB:.1f}",
            ])
    return rows


def step_times(variant: str, image_size: int, batch: int, steps: int, warmup: int, num_classes: int) -> dict[str, list[float]]:
    """Seconds per training step of each mode. The modes take turns step by step, so a burst of load
    from other processes hits both alike instead of whichever happened to run then."""
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, image_size, image_size, generator=gen)
    target = (torch.rand(batch, num_classes, image_size // 4, image_size // 4, generator=gen) > 0.5).float()
    loss_fn = torch.nn.BCEWithLogitsLoss()
    runs = {}
    for mode in MODES:
        model = build_model(ModelConfig(variant, mode, num_classes=num_classes, image_size=image_size, pretrained=False)).train()
        runs[mode] = (model, torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4))
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for i in range(warmup + steps):
        for mode, (model, optimizer) in runs.items():
            start = time.perf_counter()
            loss = loss_fn(model(images), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if i >= warmup:
                times[mode].append(time.perf_counter() - start)
    return times


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]

    def line(cells):
        return "  ".join(str(c).rjust(w) if i > 1 else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the vit_b step timing")
    parser.add_argument("--num-classes", type=int, default=2)
    parser.add_argument("--vit-b-size", type=int, default=256, help="input size of the vit_b timing")
    parser.add_argument("--vit-b-batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per mode (vit_b: at most 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPU(s), {torch.get_num_threads()} torch thread(s), {args.num_classes}-class head\n")
    print("Parameters and upload per site per round (the travel set; MB = 10^6 bytes)")
    print(table(["variant", "mode", "total params", "trainable", "upload fp32 MB", "upload 16-bit MB"],
                size_rows(("vit_b", "vit_l"), args.num_classes)))
    print("FedSAM uploads the whole state dict (incl. the prompt encoder's 256-value random-Fourier buffer);")
    print("FedMSA uploads the adapters, the mask decoder and the head only.\n")

    runs = [("tiny", 128, 6, args.steps, 2)]  # (variant, input size, batch, timed steps, warm-up steps)
    if not args.quick:
        runs.append(("vit_b", args.vit_b_size, args.vit_b_batch, min(args.steps, 3), 1))
    rows = []
    for variant, size, batch, steps, warmup in runs:
        for mode, times in step_times(variant, size, batch, steps, warmup, args.num_classes).items():
            median = statistics.median(times)
            rows.append([variant, mode, str(size), str(batch), f"{median:.3f}", f"{min(times):.3f}", f"{median / batch:.3f}", str(steps)])
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    print(f"Training step on this CPU (forward + backward + Adam, random init, after warm-up{load})")
    print(table(["variant", "mode", "input", "batch", "median s/step", "best s/step", "median s/image", "steps"], rows))
    if args.quick:
        print("(--quick: vit_b timing skipped)")


if __name__ == "__main__":
    main()
