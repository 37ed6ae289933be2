"""Score a saved model on whole held-out sites: every sample of a site is test data.

The numbers are the ones the sites compute during federation (``LocalTrainer.evaluate``): the same
reader, the same :class:`SegmentationMetric` (one threshold, empty-empty slices left out, 3D Dice from
voxel counts summed per volume) and the same autocast rule, so a held-out score and an in-federation
validation score differ only in the data they see. Every row also carries the paper code's rule
(``dice_reference``, ``iou_reference`` and per class); ``scoring`` picks what a table shows:
``"honest"`` (this project's rule), ``"reference"`` (the paper code's) or ``"both"``.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch.utils.data import DataLoader

from fedfms.data.site_dataset import SiteDataset
from fedfms.errors import ConfigError
from fedfms.models import ModelConfig
from fedfms.models.unet import UNetSegmenter
from fedfms.numbers import finite_mean, fmt_score, render_table
from fedfms.training.metrics import HONEST_RULE, SegmentationMetric, reference_rule
from fedfms.training.predict import load_model
from fedfms.training.trainer import autocast_for, pick_device
from fedfms.nnunet.config import NNUNET_VARIANT
from fedfms.nnunet.evaluate import evaluate_sites as evaluate_nnunet

SUMMARY_KEYS = ("dice", "iou", "volume_dice", "volume_iou")  # this project's rule
REFERENCE_KEYS = ("dice_reference", "iou_reference")  # the paper code's rule
ALL_SUMMARY_KEYS = SUMMARY_KEYS + REFERENCE_KEYS
PER_CLASS_KEYS = ("dice_per_class", "iou_per_class", "volume_dice_per_class", "volume_iou_per_class",
                  "dice_reference_per_class", "iou_reference_per_class")
SCORINGS = ("honest", "reference", "both")
# what each rule's columns are called in tables: the paper code's are marked so they cannot be mistaken
COLUMN_LABELS = {"dice": "Dice", "iou": "IoU", "volume_dice": "3D Dice", "volume_iou": "3D IoU",
                 "dice_reference": "ref Dice", "iou_reference": "ref IoU"}


def check_scoring(scoring: str) -> str:
    if scoring not in SCORINGS:
        raise ConfigError(f"scoring is {scoring!r}; expected one of {', '.join(SCORINGS)}")
    return scoring


def scoring_keys(scoring: str) -> tuple[str, ...]:
    """The summary keys a table shows under ``scoring``."""
    check_scoring(scoring)
    return {"honest": SUMMARY_KEYS, "reference": REFERENCE_KEYS, "both": ALL_SUMMARY_KEYS}[scoring]


def scoring_notes(scoring: str, reference_on: str | None = "logits") -> list[str]:
    """Caption lines saying which rule each column follows."""
    check_scoring(scoring)
    notes = []
    if scoring in ("honest", "both"):
        notes.append(f"Dice, IoU: {HONEST_RULE}; 3D Dice/IoU from voxel counts summed per volume")
    if scoring in ("reference", "both"):
        notes.append(f"ref Dice, ref IoU: {reference_rule(reference_on or 'logits')}")
    return notes


def is_nnunet_model(model_cfg: ModelConfig | Mapping) -> bool:
    """The FednnU-Net baseline's model config (variant ``nnunet``: the network comes from its nnU-Net plan)."""
    variant = model_cfg.variant if isinstance(model_cfg, ModelConfig) else dict(model_cfg).get("variant")
    return variant == NNUNET_VARIANT


def nnunet_model_dict(model_cfg: ModelConfig | Mapping) -> dict:
    """The nnU-Net model config as the nnU-Net code takes it (a dict of the fields that apply to it)."""
    if isinstance(model_cfg, ModelConfig):
        return {k: getattr(model_cfg, k) for k in ("variant", "mode", "num_classes", "pretrained")}
    return dict(model_cfg)


def resolve_model_config(model_cfg: ModelConfig | Mapping, checkpoint: str | None = None) -> ModelConfig:
    """A usable config outside a FLARE site: ``checkpoint`` replaces the config's, otherwise its
    ``$VARS`` (the jobs say ``$FEDFMS_SAM_CHECKPOINT``) are expanded from this process's environment."""
    raw = model_cfg.to_dict() if isinstance(model_cfg, ModelConfig) else dict(model_cfg)
    if checkpoint:
        raw["checkpoint"] = str(checkpoint)
    elif raw.get("pretrained", True) and raw.get("checkpoint"):
        value = os.path.expanduser(os.path.expandvars(str(raw["checkpoint"])))
        unset = re.search(r"\$\{?(\w+)", value)
        if unset:
            raise ConfigError(
                f"model config: checkpoint {raw['checkpoint']!r} needs environment variable {unset.group(1)}, which is not set; "
                "set it or pass --checkpoint"
            )
        raw["checkpoint"] = value
    return ModelConfig.from_dict(raw, "model config")


@torch.no_grad()
def score_site(model: torch.nn.Module, site_dir: str | os.PathLike, batch_size: int = 6, amp: str = "auto") -> dict:
    """Dice/IoU of ``model`` over every sample of one prepared site."""
    device = next(model.parameters()).device
    dataset = SiteDataset(site_dir, image_size=model.image_size, mask_size=model.mask_size)
    if dataset.num_classes != model.num_classes:
        raise ConfigError(
            f"{site_dir}: the site has {dataset.num_classes} class(es) {dataset.manifest.classes}; "
            f"the model predicts {model.num_classes}"
        )
    # the authors thresholded their U-Net's sigmoid output, and SAM's raw logits (fedfms.training.metrics)
    metric = SegmentationMetric(dataset.manifest.classes,
                                reference_on="probabilities" if isinstance(model, UNetSegmenter) else "logits")
    model.eval()
    n = 0
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        with autocast_for(device, amp):
            logits = model(batch["image"].to(device))
        metric.update(logits.float(), batch["mask"].to(device), batch["volume"], batch.get("valid"))
        n += len(batch["image"])
    return {"site": dataset.manifest.site, "site_dir": str(Path(site_dir)), **metric.aggregate(), "num_samples": n}


def evaluate_sites(
    model_cfg: ModelConfig | Mapping,
    weights_path: str | os.PathLike,
    site_dirs: Sequence[str | os.PathLike],
    batch_size: int = 6,
    device: str = "auto",
    amp: str = "auto",
    checkpoint: str | None = None,
    initial_local: bool = False,
) -> list[dict]:
    """One row per site, each scored on all of its samples: slice Dice/IoU, 3D (per-volume) Dice/IoU,
    the paper code's slice Dice/IoU (``dice_reference``, ``iou_reference``), the per-class lists,
    ``num_samples``, ``num_slices`` and ``num_volumes``. An nnU-Net model (variant ``nnunet``) is scored by
    ``fedfms.nnunet.evaluate.evaluate_sites`` (nnU-Net's predictor, its plan read beside the weights), same rows.
    ``initial_local``: a personalised model's global file is completed with the initial local part
    (``fedfms.training.predict.load_model``); otherwise a personalised model needs a site's model file."""
    if not site_dirs:
        raise ConfigError("no site folders to evaluate")
    if is_nnunet_model(model_cfg):
        return evaluate_nnunet(nnunet_model_dict(model_cfg), weights_path, site_dirs, batch_size=batch_size, device=device, amp=amp,
                               checkpoint=checkpoint)
    cfg = resolve_model_config(model_cfg, checkpoint)
    model = load_model(cfg, weights_path, initial_local=initial_local).to(pick_device(device))
    return [score_site(model, d, batch_size, amp) for d in site_dirs]


def mean_row(rows: Sequence[Mapping], label: str = "average") -> dict:
    """Unweighted mean over sites of each summary metric (the paper's 'Avg'); NaN entries are skipped."""
    out: dict = {"site": label}
    for key in ALL_SUMMARY_KEYS:
        out[key] = _mean_or_nan([r.get(key) for r in rows])
    classes = rows[0].get("classes") if rows else None
    if classes and all(r.get("classes") == classes for r in rows):
        for key in PER_CLASS_KEYS:
            lists = [r.get(key) or [None] * len(classes) for r in rows]
            out[key] = [_mean_or_nan(values) for values in zip(*lists)]
        out["classes"] = list(classes)
    out["num_samples"] = sum(int(r.get("num_samples") or 0) for r in rows)
    return out


def _mean_or_nan(values) -> float:
    # the rows' convention: NaN (not None) for a metric no site could score
    mean = finite_mean(values)
    return math.nan if mean is None else mean


def format_site_rows(rows: Sequence[Mapping], scoring: str = "honest") -> str:
    """A plain table: site, the summary columns of ``scoring`` (honest: Dice, IoU, 3D Dice, 3D IoU; reference:
    ref Dice, ref IoU; both: all six), per-class Dice (several classes), n; plus the average. With the paper
    code's rule in it, the lines under the table say what "ref" means."""
    keys = scoring_keys(scoring)
    classes = list(rows[0].get("classes") or []) if rows else []
    per_class = len(classes) > 1 and all(r.get("classes") == classes for r in rows)
    class_keys = [k for k, on in (("dice_per_class", "honest"), ("dice_reference_per_class", "reference")) if scoring in (on, "both")]
    header = ["site"] + [COLUMN_LABELS[k] for k in keys]
    if per_class:
        header += [f"{'ref ' if k.startswith('dice_reference') else ''}Dice {c}" for k in class_keys for c in classes]
    header.append("n")
    body = []
    for r in list(rows) + ([mean_row(rows)] if len(rows) > 1 else []):
        cells = [str(r["site"])] + [fmt_score(r.get(k)) for k in keys]
        if per_class:
            for k in class_keys:
                cells += [fmt_score(v) for v in r.get(k) or [None] * len(classes)]
        body.append(cells + [str(r.get("num_samples", "-"))])
    table = render_table(header, body)
    if scoring != "honest":
        on = next((r.get("reference_on") for r in rows if r.get("reference_on")), "logits")
        table += "\n" + "\n".join(scoring_notes(scoring, on))
    return table


