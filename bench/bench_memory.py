"""Peak memory of one site process, measured: variant x mode (FedSAM/FedMSA) x device x batch size x activation
checkpointing. Writes the table ``fedfms simulate`` plans with (``custom/fedfms/assets/site_memory.json``, read by
``fedfms.capacity``).

    python bench/bench_memory.py                                   # CPU: tiny, vit_b, vit_l; batch 1 and 2
    python bench/bench_memory.py --device cuda --batches 1,2,6     # on a GPU (host and GPU peaks)
    python bench/bench_memory.py --smoke                           # tiny only, seconds (checks the bench itself)
    python bench/bench_memory.py --variants vit_b --modes fedmsa --batches 2 --no-write

Each configuration runs in a fresh process that does what a site's job process does in a round: imports FLARE and
the executor, builds the model (random init, 1024 px for SAM), receives the global travel set as numpy arrays,
scores the received model on one validation sample, trains ``--steps`` steps at the batch size, and turns the
result back into numpy arrays to send. Its peak resident memory is the kernel's ``ru_maxrss`` (and, on CUDA,
PyTorch's peak reserved GPU memory). Rows of the table are merged into the existing file: a GPU run adds its rows
and keeps the CPU ones. The memory the kernel reports does not depend on the load of the machine; the times do.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TABLE = Path(__file__).resolve().parents[1] / "custom" / "fedfms" / "assets" / "site_memory.json"
SAM_VARIANTS = ("vit_b", "vit_l", "vit_h")


def measure_one(config: dict) -> dict:
    """In this (fresh) process: one site's round, as its job process does it; the peaks afterwards."""
    import resource

    start = time.perf_counter()
    import nvflare.apis.executor  # noqa: F401  (a site's job process holds FLARE)
    import torch

    from fedfms.data.synthetic import make_disc_site
    from fedfms.flare.executor import dxo_to_tensors, tensors_to_numpy
    from fedfms.models import ModelConfig
    from fedfms.training.trainer import LocalTrainer, TrainConfig
    from nvflare.apis.dxo import DXO, DataKind

    variant, batch = config["variant"], int(config["batch"])
    sam = variant in SAM_VARIANTS
    image, mask = (1024, 256) if sam else (128, 32)
    data = Path(tempfile.mkdtemp(prefix="fedfms_mem_")) / "site"
    # 2 volumes: one trains (batch x steps samples), one validates
    per_volume = max(batch * int(config["steps"]), 1)
    make_disc_site(data, site="site", num_volumes=2, slices_per_volume=per_volume, size=128 if sam else 64,
                   image_size=image, mask_size=mask, seed=0)
    model_cfg = ModelConfig.from_dict({"variant": variant, "mode": config["mode"], "num_classes": 1, "pretrained": False,
                                       "activation_checkpointing": bool(config["checkpointing"])})
    train_cfg = TrainConfig.from_dict({"batch_size": batch, "epochs": 1, "device": config["device"], "val_fraction": 0.5,
                                       "cache_decoded": False, "num_workers": 0, "progress": False,
                                       "max_steps_per_epoch": int(config["steps"]), "threads": config.get("threads")})
    trainer = LocalTrainer(model_cfg, train_cfg, str(data))
    if trainer.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    received = DXO(DataKind.WEIGHTS, tensors_to_numpy(trainer.travel_weights()))  # the global model as it arrives
    result = trainer.train_round(dxo_to_tensors(received))
    sent = DXO(DataKind.WEIGHTS, tensors_to_numpy(result.weights)).to_shareable()  # the result as it leaves
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    import psutil

    shared = psutil.Process().memory_info().shared  # file-backed pages (libraries) other site processes share
    out = {**config, "peak_rss_gb": round(peak / 1e9, 2), "shared_gb": round(shared / 1e9, 2), "image_size": image,
           "seconds": round(time.perf_counter() - start, 1),
           "train_s_per_sample": round(result.metrics["train"]["seconds"] / max(result.metrics["train"]["steps"] * batch, 1), 2)}
    if trainer.device.type == "cuda":
        out["gpu_peak_gb"] = round(torch.cuda.max_memory_reserved() / 1e9, 2)
        out["gpu"] = torch.cuda.get_device_name()
    del sent
    return out


def run_one(config: dict, timeout: float) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(config.get("threads") or os.cpu_count() or 1)}
    proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(config)], capture_output=True, text=True,
                          timeout=timeout, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        from fedfms.flare.liveness import describe_exit

        why = describe_exit(proc.returncode) if proc.returncode else "printed nothing"
        return {**config, "error": f"the measuring process {why}: {proc.stderr.strip().splitlines()[-1:]}"}
    return json.loads(lines[-1])


def merge(rows: list[dict], path: Path) -> dict:
    """The table with ``rows`` replacing the rows of the same configuration."""
    key = ("variant", "mode", "device", "batch", "checkpointing")
    table = json.loads(path.read_text()) if path.is_file() else {}
    old = [r for r in table.get("rows", []) if not any(all(r.get(k) == n.get(k) for k in key) for n in rows)]
    table.update({
        "about": "peak resident memory (GB) of one site process in a round, measured by bench/bench_memory.py; "
                 "shared_gb: its file-backed pages (libraries), mapped once for all site processes; "
                 "gpu_peak_gb: PyTorch's peak reserved GPU memory",
        "rows": sorted(old + [r for r in rows if "error" not in r],
                       key=lambda r: (r["variant"], r["mode"], r["device"], r["checkpointing"], r["batch"])),
    })
    table.setdefault("hosts", {})[rows[0]["device"] if rows else "cpu"] = (
        f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"measured {time.strftime('%Y-%m-%d')}")
    return table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="tiny,vit_b,vit_l")
    ap.add_argument("--modes", default="fedsam,fedmsa")
    ap.add_argument("--batches", default="1,2")
    ap.add_argument("--checkpointing", default="0,1", help="activation checkpointing off/on (0,1)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=1, help="training steps per measurement")
    ap.add_argument("--threads", type=int, help="torch CPU threads of the measuring process")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds one measurement may take")
    ap.add_argument("--out", default=str(TABLE), help="the table to merge into")
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--smoke", action="store_true", help="tiny only, batch 1: checks the bench in seconds")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(measure_one(json.loads(args.one))))
        return 0
    if args.smoke:
        args.variants, args.batches, args.checkpointing, args.no_write = "tiny", "1", "0", True
    rows = []
    print(f"{'variant':7} {'mode':7} {'device':6} {'batch':>5} {'ckpt':>4} {'peak RSS GB':>11} {'GPU GB':>7} {'s/sample':>8}")
    for variant in args.variants.split(","):
        for mode in args.modes.split(","):
            for ckpt in (bool(int(c)) for c in args.checkpointing.split(",")):
                if ckpt and variant not in SAM_VARIANTS:
                    continue  # only SAM's image encoder has activation checkpointing
                for batch in (int(b) for b in args.batches.split(",")):
                    config = {"variant": variant, "mode": mode, "device": args.device, "batch": batch,
                              "checkpointing": ckpt, "steps": args.steps, "threads": args.threads}
                    row = run_one(config, args.timeout)
                    rows.append(row)
                    if "error" in row:
                        print(f"{variant:7} {mode:7} {args.device:6} {batch:5} {int(ckpt):4}  {row['error']}", flush=True)
                        continue
                    print(f"{variant:7} {mode:7} {args.device:6} {batch:5} {int(ckpt):4} {row['peak_rss_gb']:11.2f} "
                          f"{row.get('gpu_peak_gb', float('nan')):7.2f} {row['train_s_per_sample']:8.2f}", flush=True)
    if not args.no_write:
        out = Path(args.out)
        out.write_text(json.dumps(merge(rows, out), indent=1) + "\n")
        print(f"wrote {out}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
