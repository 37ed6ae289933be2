"""Manual GPU check of the evaluation code (not collected by pytest; CI has no GPU).

    PYTHONPATH=custom python tests/evaluation/gpu_check_evaluation.py OUT_DIR

On CUDA: centralised training of a full-size ViT-B FedMSA (random init: no checkpoint needed) and of the
FedU-Net at 1024 px under the default bf16 autocast, held-out scoring with bf16 and with fp32, and the
tiny model scored on CUDA vs CPU. Needs no FLARE."""

import json
import sys
import time
from pathlib import Path

import torch

from fedfms.data.synthetic import make_disc_site
from fedfms.evaluation import evaluate_sites, train_centralized
from fedfms.training.weights_files import history_path
from fedfms.models import ModelConfig
from fedfms.training.trainer import TrainConfig


def main(out: Path) -> None:
    assert torch.cuda.is_available(), "no CUDA device"
    out.mkdir(parents=True, exist_ok=True)
    sites = [make_disc_site(out / s, site=s, num_volumes=5, slices_per_volume=8, brightness=b, seed=i)
             for i, (s, b) in enumerate((("a", 0.3), ("b", 0.4), ("c", 0.35)))]
    report = {"device": torch.cuda.get_device_name()}
    for name, cfg, lr in (("vit_b_fedmsa", ModelConfig("vit_b", "fedmsa", pretrained=False), 1e-4),
                          ("unet_1024", ModelConfig("unet", "fedsam", pretrained=False), 1e-3)):
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        weights = train_centralized(cfg, TrainConfig(lr=lr, batch_size=6, val_fraction=0.2, loss="bce_dice", progress=False),
                                    sites[:2], epochs=4, out_weights=out / f"{name}.pt", log=print)
        seconds = time.perf_counter() - start
        bf16 = evaluate_sites(cfg, weights, [sites[2]])[0]
        fp32 = evaluate_sites(cfg, weights, [sites[2]], amp="off")[0]
        history = json.loads(history_path(weights).read_text())
        report[name] = {"train_s": round(seconds, 1), "peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                        "selected_epoch": history["selected_epoch"], "val_dice": [h["val_dice"] for h in history["history"]],
                        "heldout_dice_bf16": bf16["dice"], "heldout_dice_fp32": fp32["dice"],
                        "heldout_volume_dice_bf16": bf16["volume_dice"], "n": bf16["num_samples"]}
        print(name, report[name], flush=True)
        assert bf16["num_samples"] == 40 and abs(bf16["dice"] - fp32["dice"]) < 0.03

    tiny = ModelConfig("tiny", "fedmsa", pretrained=False)
    weights = train_centralized(tiny, TrainConfig(lr=1e-3, loss="bce_dice", val_fraction=0.2, device="cpu", progress=False),
                                sites[:2], epochs=6, out_weights=out / "tiny.pt")
    cuda = evaluate_sites(tiny, weights, [sites[2]], device="cuda", amp="off")[0]
    cpu = evaluate_sites(tiny, weights, [sites[2]], device="cpu")[0]
    report["tiny_cuda_vs_cpu"] = {"cuda": cuda["dice"], "cpu": cpu["dice"]}
    print("tiny cuda vs cpu", report["tiny_cuda_vs_cpu"], flush=True)
    assert abs(cuda["dice"] - cpu["dice"]) < 1e-3 and cpu["dice"] > 0.5
    (out / "gpu_check_evaluation.json").write_text(json.dumps(report, indent=2))
    print("OK")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
