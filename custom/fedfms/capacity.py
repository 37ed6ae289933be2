"""How many simulated sites fit at once: each simulated site is its own process holding its own model,
optimiser and activations, so running every site together runs out of GPU (or host) memory long before a
consortium's size. FLARE's simulator runs N sites on fewer threads (the rest wait their turn); this module
chooses that number from what is free and what one site of the job's variant needs.

Per-site figures: GPU peaks measured at batch 6, 1024 px, bf16, fused attention
(``bench/results/gpu_bench_h200_fused.txt``); host memory of one tiny site process measured on the CPU
(``bench/results/bench_many_sites_cpu.txt``). FLARE-free and torch-light: it only asks torch for free
device memory when CUDA is there.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

# GiB of GPU memory one site needs at batch 6 (bf16, fused attention), without / with activation checkpointing
GPU_GIB_BATCH6 = {
    ("vit_b", "fedsam"): (13.5, 3.4), ("vit_b", "fedmsa"): (9.4, 2.6),
    ("vit_l", "fedsam"): (34.9, 8.7), ("vit_l", "fedmsa"): (23.9, 5.4),
    ("vit_h", "fedsam"): (60.0, 15.0), ("vit_h", "fedmsa"): (40.0, 9.0),  # not measured: vit_l scaled by size
    ("tiny", "fedsam"): (0.3, 0.3), ("tiny", "fedmsa"): (0.3, 0.3), ("unet", "fedsam"): (4.0, 4.0),
}
CUDA_CONTEXT_GIB = 1.0  # every site process creates its own CUDA context
# GiB of host memory one site process needs: interpreter, torch (0.5), segment-anything + torchvision (0.2),
# MONAI (0.2), FLARE, the model and its data loader; tiny measured, the others estimated from their weights
HOST_GIB = {"tiny": 1.1, "unet": 1.5, "vit_b": 3.0, "vit_l": 5.0, "vit_h": 8.0}
# GiB the simulator's own process (server, global model, float64 accumulation) needs besides the sites
SERVER_GIB = {"tiny": 1.5, "unet": 2.0, "vit_b": 4.0, "vit_l": 8.0, "vit_h": 12.0}
HEADROOM = 0.85  # leave some memory for the server process, the OS and fragmentation


@dataclass
class Placement:
    threads: int  # sites that train at the same time
    gpus: list[int] | None  # GPU ids the simulated sites are spread over (None: CPU)
    reason: str  # one line for the console

    per_gpu: dict[int, int] | None = None  # sites at once on each GPU

    @property
    def gpu_arg(self) -> str | None:
        """FLARE's simulator ``gpu`` option: one group per site slot (each group runs one site at a time), so
        "0,0,1,1" trains two sites at once on each of GPUs 0 and 1."""
        if not self.gpus:
            return None
        return ",".join(str(g) for g in self.gpus for _ in range((self.per_gpu or {}).get(g, 1)))

    @property
    def simulator_threads(self) -> int:
        return 1 if self.gpus else self.threads


def site_gpu_gib(variant: str, mode: str, batch_size: int = 6, checkpointing: bool = False) -> float:
    plain, ckpt = GPU_GIB_BATCH6.get((variant, mode), (20.0, 6.0))
    per_batch6 = ckpt if checkpointing else plain
    return CUDA_CONTEXT_GIB + per_batch6 * max(batch_size, 1) / 6


def free_host_gib() -> float:
    try:
        import psutil

        return psutil.virtual_memory().available / 2**30
    except ImportError:  # pragma: no cover - psutil comes with nvflare
        pages = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return pages / 2**30


def free_gpu_gib(gpus: list[int]) -> dict[int, float]:
    import torch

    return {g: torch.cuda.mem_get_info(g)[0] / 2**30 for g in gpus}


def cuda_devices() -> list[int]:
    try:
        import torch

        return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    except Exception:
        return []


def choose_placement(num_sites: int, variant: str, mode: str, device: str = "auto", batch_size: int = 6,
                     checkpointing: bool = False, threads: int | None = None, gpus: list[int] | None = None,
                     free_host: float | None = None, free_gpu: dict[int, float] | None = None) -> Placement:
    """Sites at once and GPUs for a simulation of ``num_sites`` sites. ``threads``/``gpus`` given by the user
    win; otherwise the most sites that fit in free memory (at least one, at most all)."""
    if gpus is None and device != "cpu":
        gpus = cuda_devices() or None
    host = free_host_gib() if free_host is None else free_host
    per_host = HOST_GIB.get(variant, 3.0)
    fit_host = max(1, int((host * HEADROOM - SERVER_GIB.get(variant, 4.0)) // per_host))
    per_gpu_fit = None
    if gpus:
        free = free_gpu if free_gpu is not None else free_gpu_gib(gpus)
        per_gpu = site_gpu_gib(variant, mode, batch_size, checkpointing)
        per_gpu_fit = {g: max(0, int(free[g] * HEADROOM // per_gpu)) for g in gpus}
        fit = max(1, min(sum(per_gpu_fit.values()), fit_host))
        where = (f"{len(gpus)} GPU(s) with {', '.join(f'{free[g]:.0f}' for g in gpus)} GiB free; one {variant} {mode} "
                 f"site needs about {per_gpu:.1f} GiB at batch {batch_size}")
    else:
        fit = fit_host
        where = f"{host:.0f} GiB of host memory free; one {variant} site process needs about {per_host:.1f} GiB"
    if threads:
        chosen, why = min(threads, num_sites), "--threads"
    else:
        chosen, why = min(num_sites, fit), where
    if gpus:  # spread the chosen slots over the GPUs, as many per GPU as fit there (at least one in all)
        slots = {g: 0 for g in gpus}
        order = sorted(gpus, key=lambda g: -(per_gpu_fit or {}).get(g, 0))
        for i in range(chosen):
            g = order[i % len(order)]
            slots[g] += 1
        per_gpu_fit = {g: n for g, n in slots.items() if n > 0}
        gpus = sorted(per_gpu_fit)
    if chosen >= num_sites:
        line = f"simulating {num_sites} site(s), all at once ({why})"
    else:
        line = (f"simulating {num_sites} site(s), {chosen} at a time; the others wait their turn each round "
                f"({why}; --threads to change)")
    return Placement(threads=chosen, gpus=gpus, reason=line, per_gpu=per_gpu_fit if gpus else None)


def turns(num_sites: int, threads: int) -> int:
    return math.ceil(num_sites / max(threads, 1))
