"""Pre-flight check for a hospital before it joins a federation: will this job run here?

Reads every sample of the site's prepared data, builds the job's model with the site's checkpoint (strict
loading), reports the device, and prints the frozen-weights fingerprint the server will compare — two sites
can compare fingerprints before the first round instead of finding out from a rejected contribution.

:func:`fedfms.data.site_warnings.site_warnings` is the fast part (manifest and split only) that says what would
make a run uninformative (no validation samples, fewer training samples than one batch, no or only positive
samples); ``fedfms check-site`` prints it, and a simulation prints it for every site before it starts.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Mapping

from fedfms.data.site_dataset import patient_split
from fedfms.data.site_warnings import TRAIN_DEFAULTS, site_warnings
from fedfms.errors import ConfigError
from fedfms.data.site_dataset import SiteDataset
from fedfms.flare.jobs import job_model_config, job_train_config
from fedfms.flare.site_config import expand
from fedfms.models import ModelConfig, build_model, count_parameters, frozen_fingerprint, travel_bytes, travel_spec
from fedfms.training.trainer import LocalTrainer, TrainConfig
from fedfms.flare.liveness import format_seconds


def check_site(job_dir: str | Path, data_dir: str | Path, checkpoint: str | None = None, site_name: str = "site",
               measure_speed: bool = True) -> dict:
    """Raises DataError / CheckpointError / ConfigError (naming the file) on the first problem found; what
    would not stop the run but makes it uninformative is in ``report["warnings"]`` (:func:`site_warnings`).
    ``measure_speed``: also train one step on the site's device with the job's batch size and report this site's
    own seconds per sample and peak memory (``report["speed"]``)."""
    import torch

    report: dict = {"site": site_name, "data_dir": str(data_dir)}
    raw_model = job_model_config(job_dir)
    # the same rule as the site's executor at the job's start (fedfms.flare.site_config): a random-init model needs
    # no checkpoint, a pretrained one the given or the job's (with $VARS expanded). The folders are the site
    # admin's own (passed here), so they are not confined as a job's would be.
    wanted = checkpoint or raw_model.get("checkpoint")
    pretrained = raw_model.get("pretrained", True)
    raw_model = {**raw_model, "checkpoint": expand(wanted, site_name) if pretrained and wanted else None}
    cfg = ModelConfig.from_dict(raw_model, f"{job_dir} model_config")
    train = job_train_config(job_dir)

    start = time.perf_counter()
    model = build_model(cfg)
    report["model"] = {"variant": cfg.variant, "mode": cfg.mode, "pretrained": cfg.pretrained,
                       "checkpoint": cfg.checkpoint, "trainable": count_parameters(model, trainable_only=True),
                       "upload_mb_fp32": round(travel_bytes(travel_spec(model, cfg.mode, cfg.local_parts)) / 1e6, 1),
                       "frozen_fingerprint": frozen_fingerprint(model, cfg.mode),
                       "build_s": round(time.perf_counter() - start, 1)}

    dataset = SiteDataset(data_dir, image_size=model.image_size, mask_size=model.mask_size)
    if dataset.num_classes != cfg.num_classes:
        raise ConfigError(f"{data_dir}: the site has {dataset.num_classes} class(es) {dataset.manifest.classes}; "
                          f"the job's model has num_classes={cfg.num_classes}")
    positive = 0
    for i in range(len(dataset)):  # reads and validates every file, as training would
        positive += int(dataset[i]["mask"].sum() > 0)
    train_idx, val_idx = patient_split(dataset.volumes, train.get("val_fraction", TRAIN_DEFAULTS["val_fraction"]),
                                       train.get("split_seed", TRAIN_DEFAULTS["split_seed"]))
    report["data"] = {"classes": dataset.manifest.classes, "volumes": len(set(dataset.volumes)), "samples": len(dataset),
                      "train_samples": len(train_idx), "val_samples": len(val_idx),
                      "positive_fraction": round(positive / len(dataset), 3)}
    report["warnings"] = site_warnings(data_dir, train, raw_model)
    report["device"] = (f"cuda: {torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)"
                        if torch.cuda.is_available() else "cpu only (real SAM sizes need a GPU)")
    if measure_speed and train_idx:
        report["speed"] = site_speed(cfg, train, data_dir, model, len(train_idx), len(val_idx))
    return report


def site_speed(cfg, train: Mapping, data_dir: str | Path, model, train_samples: int, val_samples: int) -> dict:
    """This site's own seconds per training sample: one optimisation step of the job's batch size on the job's
    device (as its executor trains), timed, with the process's peak memory after it. It is what the site will
    report while it trains (``fedfms.flare.liveness``); nothing else here assumes a speed."""
    import resource

    train_cfg = TrainConfig.from_dict({**train, "cache_decoded": False, "num_workers": 0, "progress": False},
                                      f"{data_dir} train_config")
    trainer = LocalTrainer(cfg, train_cfg, str(data_dir), model=model)
    batch = next(iter(trainer._loader("train", shuffle=True)))
    trainer.model.train()
    start = time.perf_counter()
    trainer.step(batch["image"], batch["mask"])
    if trainer.device.type == "cuda":
        import torch

        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    n = len(batch["image"])
    per_sample = seconds / n
    epochs = int(train_cfg.epochs)
    return {"device": str(trainer.device), "batch": n, "step_s": round(seconds, 2), "s_per_sample": round(per_sample, 3),
            "round_estimate_s": round(per_sample * (epochs * train_samples + val_samples / 3), 1),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 2)}


def format_report(report: dict) -> str:
    m, d = report["model"], report["data"]
    warnings = report.get("warnings") or []
    return "\n".join([
        f"site {report['site']}: ready" + (f", with {len(warnings)} warning(s) (on stderr)" if warnings else ""),
        f"  data     {report['data_dir']}: {d['samples']} samples from {d['volumes']} volumes, classes {d['classes']}, "
        f"{d['train_samples']} train / {d['val_samples']} val, positive fraction {d['positive_fraction']}",
        f"  model    {m['variant']} {m['mode']} ({'checkpoint ' + str(m['checkpoint']) if m['pretrained'] else 'random init'}), "
        f"{m['trainable']:,} trainable, {m['upload_mb_fp32']} MB per upload",
        f"  frozen weights fingerprint {m['frozen_fingerprint'][:16]} (must match every other site's and the server's)",
        f"  FedAvg weight {d['train_samples']} (this site's training samples; the coordinator pins it with "
        f"`fedfms job new ... --site-samples {report['site']}={d['train_samples']}`)",
        f"  device   {report['device']}",
        *([_speed_line(report["speed"])] if report.get("speed") else []),
    ])


def _speed_line(speed: dict) -> str:
    return (f"  speed    {speed['s_per_sample']:.3g} s/sample on {speed['device']} (one training step of {speed['batch']} "
            f"sample(s): {speed['step_s']:.3g} s); a local round here takes about {format_seconds(speed['round_estimate_s'])}; "
            f"peak memory of this check {speed['peak_rss_gb']:.1f} GB")
