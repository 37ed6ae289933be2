"""What would make a site's part of a run uninformative (no validation samples, fewer training samples than one
batch, no or only positive samples), read from its manifest and split alone. ``fedfms check-site`` prints it
(``fedfms.site_check``), and a simulation prints it for every site before it starts (``fedfms.flare.simulate``)."""

from __future__ import annotations

import os
from typing import Mapping

from fedfms.data.site_dataset import patient_split, read_manifest
from fedfms.errors import DataError

# TrainConfig's defaults for the settings the warnings use (fedfms.training.trainer imports MONAI, which takes
# seconds; tests/test_site_check.py keeps these equal to TrainConfig's).
TRAIN_DEFAULTS = {"batch_size": 6, "val_fraction": 0.1, "split_seed": 0}


def site_warnings(data_dir: str | os.PathLike, train_config: Mapping | None = None,
                  model_config: Mapping | None = None) -> list[str]:
    """One line per condition that makes this site's part of a run uninformative; ``[]`` when there is none.

    ``train_config`` / ``model_config``: the job's (``fedfms.flare.jobs.job_train_config(job)`` /
    ``job_model_config(job)``); missing train settings take the trainer's defaults. Fast: reads the manifest
    and computes the train/val split only (no image is decoded, no model built). Never raises for the site's
    data: a site that cannot be read gives one line saying why (the site itself will refuse to start).
    Lines start with the data folder; print them as ``warning: <line>``."""
    where = str(data_dir)
    train = {**TRAIN_DEFAULTS, **{k: v for k, v in dict(train_config or {}).items() if k in TRAIN_DEFAULTS}}
    try:
        m = read_manifest(data_dir)
        train_idx, val_idx = patient_split(m.volumes, train["val_fraction"], train["split_seed"])
    except DataError as exc:
        text = str(exc)
        return [text if text.startswith(where) else f"{where}: {text}"]
    lines = []
    volumes = len(set(m.volumes))
    if not val_idx:
        lines.append(f"{where}: no validation samples ({volumes} volume(s), val_fraction {train['val_fraction']}; a split needs "
                     f"2+ volumes): its validation Dice will be empty ('-') every round")
    elif len(val_idx) == 1:
        lines.append(f"{where}: 1 validation sample: its validation Dice comes from a single image")
    if not train_idx:
        lines.append(f"{where}: no training samples: it cannot train")
    elif len(train_idx) < train["batch_size"]:
        lines.append(f"{where}: {len(train_idx)} training sample(s), fewer than one batch (batch_size {train['batch_size']}): "
                     f"one small step per local epoch")
    fraction = m.counts.get("positive_fraction")
    if fraction == 0:
        lines.append(f"{where}: no sample contains any class {m.classes} (positive fraction 0): it can only teach background "
                     f"and its Dice is undefined")
    elif fraction == 1:
        lines.append(f"{where}: every sample contains a class {m.classes} (positive fraction 1): it never shows an image "
                     f"without one, so false positives there go unmeasured")
    if model_config is not None and model_config.get("num_classes") not in (None, m.num_classes):
        lines.append(f"{where}: the job's model has num_classes={model_config.get('num_classes')}, the site has "
                     f"{m.num_classes} class(es) {m.classes}: it will refuse to start")
    return lines
