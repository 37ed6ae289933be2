"""Pre-flight check for a hospital before it joins a federation: will this job run here?

Reads every sample of the site's prepared data, builds the job's model with the site's checkpoint (strict
loading), reports the device, and prints the frozen-weights fingerprint the server will compare — two sites
can compare fingerprints before the first round instead of finding out from a rejected contribution.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from fedfms.data.site_dataset import SiteDataset, patient_split
from fedfms.errors import ConfigError
from fedfms.flare.jobs import job_model_config, job_train_config
from fedfms.flare.site_config import expand
from fedfms.models import ModelConfig, build_model, count_parameters, frozen_fingerprint, travel_bytes, travel_spec


def check_site(job_dir: str | Path, data_dir: str | Path, checkpoint: str | None = None, site_name: str = "site") -> dict:
    """Raises DataError / CheckpointError / ConfigError (naming the file) on the first problem found."""
    report: dict = {"site": site_name, "data_dir": str(data_dir)}
    raw_model = job_model_config(job_dir)
    if checkpoint:
        raw_model = {**raw_model, "checkpoint": checkpoint}
    elif raw_model.get("pretrained", True) and raw_model.get("checkpoint"):
        raw_model = {**raw_model, "checkpoint": expand(raw_model["checkpoint"], site_name)}
    cfg = ModelConfig.from_dict(raw_model, f"{job_dir} model_config")
    train = job_train_config(job_dir)

    start = time.perf_counter()
    model = build_model(cfg)
    report["model"] = {"variant": cfg.variant, "mode": cfg.mode, "pretrained": cfg.pretrained,
                       "checkpoint": cfg.checkpoint, "trainable": count_parameters(model, trainable_only=True),
                       "upload_mb_fp32": round(travel_bytes(travel_spec(model, cfg.mode)) / 1e6, 1),
                       "frozen_fingerprint": frozen_fingerprint(model, cfg.mode),
                       "build_s": round(time.perf_counter() - start, 1)}

    dataset = SiteDataset(data_dir, image_size=model.image_size, mask_size=model.mask_size)
    if dataset.num_classes != cfg.num_classes:
        raise ConfigError(f"{data_dir}: the site has {dataset.num_classes} class(es) {dataset.manifest.classes}; "
                          f"the job's model has num_classes={cfg.num_classes}")
    positive = 0
    for i in range(len(dataset)):  # reads and validates every file, as training would
        positive += int(dataset[i]["mask"].sum() > 0)
    train_idx, val_idx = patient_split(dataset.volumes, train.get("val_fraction", 0.1), train.get("split_seed", 0))
    report["data"] = {"classes": dataset.manifest.classes, "volumes": len(set(dataset.volumes)), "samples": len(dataset),
                      "train_samples": len(train_idx), "val_samples": len(val_idx),
                      "positive_fraction": round(positive / len(dataset), 3)}
    report["device"] = (f"cuda: {torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)"
                        if torch.cuda.is_available() else "cpu only (real SAM sizes need a GPU)")
    return report


def format_report(report: dict) -> str:
    m, d = report["model"], report["data"]
    return "\n".join([
        f"site {report['site']}: ready",
        f"  data     {report['data_dir']}: {d['samples']} samples from {d['volumes']} volumes, classes {d['classes']}, "
        f"{d['train_samples']} train / {d['val_samples']} val, positive fraction {d['positive_fraction']}",
        f"  model    {m['variant']} {m['mode']} ({'checkpoint ' + str(m['checkpoint']) if m['pretrained'] else 'random init'}), "
        f"{m['trainable']:,} trainable, {m['upload_mb_fp32']} MB per upload",
        f"  frozen weights fingerprint {m['frozen_fingerprint'][:16]} (must match every other site's and the server's)",
        f"  FedAvg weight {d['train_samples']} (this site's training samples; the coordinator pins it with "
        f"`fedfms job new ... --site-samples {report['site']}={d['train_samples']}`)",
        f"  device   {report['device']}",
    ])
