"""How many simulated sites fit at once, from measured memory: each simulated site is its own process holding its
own model, optimiser and activations, so running every site together runs out of GPU (or host) memory long before a
consortium's size. FLARE's simulator runs N sites on fewer threads (the rest wait their turn); this module chooses
that number from what is free and what one site of the job needs, and refuses, before anything starts, a plan that
cannot fit (one line saying what would).

Per-site figures come from ``assets/site_memory.json``, written by ``bench/bench_memory.py``: the peak resident
memory of one site process in a round (and its peak GPU memory on CUDA) per variant x mode x device x batch size x
activation checkpointing. A batch size that was not measured is extrapolated linearly from the measured ones (the
activations grow with the batch). Where the table has no row (a GPU site's host memory before the GPU bench ran),
the figures below are used and the plan says "estimated". FLARE-free and torch-light: torch is asked for free
device memory only when CUDA is there.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

MEMORY_TABLE = Path(__file__).with_name("assets") / "site_memory.json"

# GiB of GPU memory one site needs at batch 6 (bf16, fused attention), without / with activation checkpointing:
# measured on an H200 (bench/results/gpu_bench_h200_fused.txt); used until the table has CUDA rows
GPU_GIB_BATCH6 = {
    ("vit_b", "fedsam"): (13.5, 3.4), ("vit_b", "fedmsa"): (9.4, 2.6),
    ("vit_l", "fedsam"): (34.9, 8.7), ("vit_l", "fedmsa"): (23.9, 5.4),
    ("vit_h", "fedsam"): (60.0, 15.0), ("vit_h", "fedmsa"): (40.0, 9.0),  # not measured: vit_l scaled by size
    ("tiny", "fedsam"): (0.3, 0.3), ("tiny", "fedmsa"): (0.3, 0.3), ("unet", "fedsam"): (4.0, 4.0),
    ("nnunet", "fedsam"): (8.0, 8.0),  # nnU-Net's planner sizes patch x batch to its gpu_memory_target_gb (8)
}
# Variants whose batch and patch come from a plan made at run time, not from the job's batch_size: their memory
# does not scale with the job's batch
PLAN_SIZED = ("nnunet",)
CUDA_CONTEXT_GIB = 1.0  # every site process creates its own CUDA context
# GiB of host memory one site process needs where the table has no row (estimates: interpreter, torch, MONAI,
# FLARE, the model on the host and its data loader)
# FLARE, the model on the host and its data loader). nnunet: a site of the fednnunet_tiny job peaked at 1.20 GB
# (3 simulated sites, tests/flare/test_nnunet_simulator.py sampled with psutil); a full plan on the CPU needs more
HOST_GIB = {"tiny": 1.1, "unet": 1.5, "nnunet": 1.2, "vit_b": 3.0, "vit_l": 5.0, "vit_h": 8.0}
# GiB the simulator's own processes (the server with the global model and the float64 sum, FLARE's manager and
# the `fedfms simulate` process) need besides the sites: tiny measured (bench/results/bench_many_sites_cpu.txt);
# the others add the global model, its float64 sum and one site result per variant size
SERVER_GIB = {"tiny": 2.7, "unet": 3.0, "nnunet": 2.7, "vit_b": 4.5, "vit_l": 8.0, "vit_h": 12.0}
HEADROOM = 0.85  # leave some memory for the OS, other programs and fragmentation
GB_PER_GIB = 2**30 / 1e9


@dataclass
class Placement:
    threads: int  # sites that train at the same time
    gpus: list[int] | None  # GPU ids the simulated sites are spread over (None: CPU)
    reason: str  # one line for the console
    per_gpu: dict[int, int] | None = None  # sites at once on each GPU
    fits: bool = True  # False: not even the chosen plan fits; ``reason`` says what would

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


@dataclass
class SiteMemory:
    gib: float  # peak memory of one site process
    shared_gib: float  # of which pages every site process shares (libraries): counted once
    how: str  # "measured", "extrapolated from batch 1-2" or "estimated"


@lru_cache(maxsize=4)
def _memory_table(path: str) -> dict:
    try:
        table = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return table if isinstance(table, dict) else {}


def memory_rows(path: str = str(MEMORY_TABLE)) -> tuple[dict, ...]:
    return tuple(_memory_table(path).get("rows", []))


def fork_server_gib(path: str = str(MEMORY_TABLE)) -> float:
    """Resident memory of the site fork server once it has imported what a site imports (fedfms.flare.site_forkserver,
    measured by bench/bench_sim_sites.py): the pages every site forked from it starts with, shared copy-on-write until
    a site writes them. 0 when not measured (no sharing is then counted beyond the libraries')."""
    entry = _memory_table(path).get("fork_server") or {}
    try:
        return max(float(entry.get("rss_gb") or 0.0), 0.0) / GB_PER_GIB
    except (TypeError, ValueError):
        return 0.0


def _from_table(variant: str, mode: str, device: str, batch: int, checkpointing: bool, key: str) -> tuple[float, float, str] | None:
    rows = [r for r in memory_rows() if r.get("variant") == variant and r.get("mode") == mode and r.get("device") == device
            and bool(r.get("checkpointing")) == bool(checkpointing) and r.get(key) is not None]
    if not rows:
        return None
    by_batch = {int(r["batch"]): r for r in rows}
    shared = min(float(r.get("shared_gb") or 0.0) for r in rows) / GB_PER_GIB
    if batch in by_batch:
        return float(by_batch[batch][key]) / GB_PER_GIB, shared, "measured"
    if len(by_batch) == 1:
        (b, r), = by_batch.items()
        return float(r[key]) / GB_PER_GIB * max(batch, 1) / b, shared, f"scaled from batch {b}"
    lo, hi = min(by_batch), max(by_batch)
    per_sample = (float(by_batch[hi][key]) - float(by_batch[lo][key])) / (hi - lo)
    value = float(by_batch[lo][key]) + per_sample * (batch - lo)
    return max(value, float(by_batch[lo][key])) / GB_PER_GIB, shared, f"extrapolated from batch {lo}-{hi}"


def site_host_memory(variant: str, mode: str, device: str = "cpu", batch_size: int = 6,
                     checkpointing: bool = False) -> SiteMemory:
    """Host memory of one site process (``device``: where it trains, "cpu" or "cuda")."""
    found = _from_table(variant, mode, device, batch_size, checkpointing and variant.startswith("vit"), "peak_rss_gb")
    if found:
        return SiteMemory(*found)
    return SiteMemory(HOST_GIB.get(variant, 3.0), 0.0, "estimated")


def site_gpu_gib(variant: str, mode: str, batch_size: int = 6, checkpointing: bool = False) -> float:
    found = _from_table(variant, mode, "cuda", batch_size, checkpointing, "gpu_peak_gb")
    if found:
        return CUDA_CONTEXT_GIB + found[0]
    plain, ckpt = GPU_GIB_BATCH6.get((variant, mode), (20.0, 6.0))
    per_batch6 = ckpt if checkpointing else plain
    if variant in PLAN_SIZED:
        return CUDA_CONTEXT_GIB + per_batch6
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


def _host_need(n: int, site: SiteMemory, server: float) -> float:
    """GiB for ``n`` site processes and the simulator's own: the pages they share counted once."""
    return server + site.gib + max(n - 1, 0) * max(site.gib - site.shared_gib, 0.1)


def _sites_fitting(free: float, site: SiteMemory, server: float, cap: int) -> int:
    n = 0
    while n < cap and _host_need(n + 1, site, server) <= free:
        n += 1
    return n


def _at_batch(variant: str, batch: int) -> str:
    return "at its plan's batch" if variant in PLAN_SIZED else f"at batch {batch}"


def _who(n: int, variant: str, mode: str, batch: int, where: str) -> str:
    mode_name = {"fedsam": "FedSAM", "fedmsa": "FedMSA"}.get(mode, mode)
    return f"{'one' if n == 1 else n} {variant} {mode_name} site{'s' if n != 1 else ''} {_at_batch(variant, batch)} on {where}"


def _remedies(variant: str, batch: int, checkpointing: bool, threads: int | None) -> str:
    options = []
    if threads and threads > 1:
        options.append("run them one at a time with --threads 1")
    if batch > 1 and variant not in PLAN_SIZED:
        options.append('lower the batch (fedfms job new ... --train \'{"batch_size": 1}\')')
    if not checkpointing and variant.startswith("vit"):
        options.append('turn on activation checkpointing (--model \'{"activation_checkpointing": true}\')')
    options.append("free memory")
    return ", or ".join(options)


def choose_placement(num_sites: int, variant: str, mode: str, device: str = "auto", batch_size: int = 6,
                     checkpointing: bool = False, threads: int | None = None, gpus: list[int] | None = None,
                     free_host: float | None = None, free_gpu: dict[int, float] | None = None,
                     forked_from_gib: float = 0.0) -> Placement:
    """Sites at once and GPUs for a simulation of ``num_sites`` sites. ``threads``/``gpus`` given by the user
    win when they fit; otherwise the most sites that fit in free memory (at most all). ``fits`` is False, with
    one actionable line, when not even the requested (or a single) site fits. ``batch_size``: the samples in one
    step (the job's batch, or fewer when a site has fewer training samples). ``forked_from_gib``: the sites are
    forked from one process holding that much (:func:`fork_server_gib`), which they share until they write it."""
    if gpus is None and device != "cpu":
        gpus = cuda_devices() or None
    host = free_host_gib() if free_host is None else free_host
    usable = host * HEADROOM
    site = site_host_memory(variant, mode, "cuda" if gpus else "cpu", batch_size, checkpointing)
    if forked_from_gib > site.shared_gib:
        site = SiteMemory(site.gib, min(forked_from_gib, site.gib),
                          f"{site.how}; {min(forked_from_gib, site.gib) * GB_PER_GIB:.1f} GB of it shared by the sites "
                          f"forked from one pre-imported process")
    server = SERVER_GIB.get(variant, 4.5)
    fit_host = _sites_fitting(usable, site, server, num_sites)
    site_text = f"{site.gib * GB_PER_GIB:.1f} GB each, {site.how}"
    if gpus:
        free = free_gpu if free_gpu is not None else free_gpu_gib(gpus)
        per_gpu = site_gpu_gib(variant, mode, batch_size, checkpointing)
        per_gpu_fit = {g: max(0, int(free[g] * HEADROOM // per_gpu)) for g in gpus}
        fit = min(sum(per_gpu_fit.values()), fit_host)
        where = (f"{len(gpus)} GPU(s) with {', '.join(f'{free[g]:.0f}' for g in gpus)} GiB free; one {variant} {mode} "
                 f"site needs about {per_gpu:.1f} GiB {_at_batch(variant, batch_size)}")
        if fit < 1:
            short = "GPU" if sum(per_gpu_fit.values()) < 1 else "host"
            need = per_gpu if short == "GPU" else _host_need(1, site, server)
            have = max(free.values()) * HEADROOM if short == "GPU" else usable
            return Placement(threads=0, gpus=gpus, fits=False, reason=(
                f"{_who(1, variant, mode, batch_size, 'a GPU')} needs ~{need * GB_PER_GIB:.0f} GB of {short} memory; "
                f"{have * GB_PER_GIB:.0f} GB usable: {_remedies(variant, batch_size, checkpointing, None)}"))
    else:
        fit = fit_host
        where = (f"{host * GB_PER_GIB:.0f} GB of host memory free; one {variant} {mode} site process "
                 f"{_at_batch(variant, batch_size)} needs about {site.gib * GB_PER_GIB:.1f} GB ({site.how})")
        wanted = min(threads, num_sites) if threads else 1
        if fit < wanted:
            need = _host_need(wanted, site, server)
            return Placement(threads=0, gpus=None, fits=False, reason=(
                f"{_who(wanted, variant, mode, batch_size, 'CPU')} need{'s' if wanted == 1 else ''} ~{need * GB_PER_GIB:.0f} GB "
                f"({site_text}, "
                f"+{server * GB_PER_GIB:.1f} GB for the simulator's server); {usable * GB_PER_GIB:.0f} GB usable of "
                f"{host * GB_PER_GIB:.0f} GB free: {_remedies(variant, batch_size, checkpointing, threads)}"))
    if threads:
        chosen, why = min(threads, num_sites), "--threads"
    else:
        chosen, why = min(num_sites, fit), where
    per_gpu_slots = None
    if gpus:  # spread the chosen slots over the GPUs, as many per GPU as fit there (at least one in all)
        slots = {g: 0 for g in gpus}
        order = sorted(gpus, key=lambda g: -per_gpu_fit.get(g, 0))
        for i in range(chosen):
            slots[order[i % len(order)]] += 1
        per_gpu_slots = {g: n for g, n in slots.items() if n > 0}
        gpus = sorted(per_gpu_slots)
    if chosen >= num_sites:
        line = f"simulating {num_sites} site(s), all at once ({why})"
    else:
        line = (f"simulating {num_sites} site(s), {chosen} at a time; the others wait their turn each round "
                f"({why}; --threads to change)")
    return Placement(threads=chosen, gpus=gpus, reason=line, per_gpu=per_gpu_slots)


def turns(num_sites: int, threads: int) -> int:
    return math.ceil(num_sites / max(threads, 1))
