"""Baselines that any federated result has to beat, scored exactly like the federation scores itself.

- :func:`fit_threshold`: the best single intensity threshold of a site (either polarity), chosen on the site's
  own training split: what a site gets without any learning.
- :func:`train_alone`: the same model trained on one site's training split only (or on several pooled: the
  centralised baseline), for a given number of epochs; the last epoch is kept, as a federation keeps its final
  global model.
- :func:`score`: Dice/IoU of any predictor on a site's validation split: the split ``LocalTrainer`` makes with the
  same ``val_fraction`` and ``split_seed`` (by patient), and the same :class:`SegmentationMetric`, so every
  method in a comparison is scored on the same slices by the same rule.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from fedfms.data.site_dataset import SiteDataset, patient_split
from fedfms.errors import ConfigError
from fedfms.models import ModelConfig
from fedfms.training.metrics import SegmentationMetric
from fedfms.training.trainer import LocalTrainer, TrainConfig

Predictor = Callable[[torch.Tensor], torch.Tensor]  # images (B, 3, S, S) in [0, 1] -> logits (B, C, M, M)
THRESHOLD_STEEPNESS = 50.0  # logits = 50 (x - t): sigmoid > 0.5 exactly where x > t


def site_split(site_dir: str | os.PathLike, train_cfg: TrainConfig, image_size: int,
               mask_size: int) -> tuple[SiteDataset, list[int], list[int]]:
    """A site's samples at the model's sizes and LocalTrainer's train/val split of them (by patient)."""
    dataset = SiteDataset(site_dir, image_size=image_size, mask_size=mask_size)
    train, val = patient_split(dataset.volumes, train_cfg.val_fraction, train_cfg.split_seed)
    return dataset, train, val


@torch.no_grad()
def score(predict: Predictor, dataset: SiteDataset, indices: Sequence[int], batch_size: int = 16) -> dict:
    """Dice/IoU (this project's rule and the paper code's) of ``predict`` on ``dataset[indices]``."""
    metric = SegmentationMetric(dataset.manifest.classes)
    for batch in DataLoader(Subset(dataset, list(indices)), batch_size=batch_size, shuffle=False):
        metric.update(predict(batch["image"]).float(), batch["mask"], batch["volume"], batch.get("valid"))
    result = metric.aggregate()
    result["num_samples"] = len(indices)
    return result


def model_predictor(model: torch.nn.Module) -> Predictor:
    device = next(model.parameters()).device
    model.eval()

    def predict(images: torch.Tensor) -> torch.Tensor:
        return model(images.to(device)).float().cpu()

    return predict


def _intensity(images: torch.Tensor, mask_size: int) -> torch.Tensor:
    """Mean grey value of the image pixels under each mask pixel: (B, 1, M, M)."""
    grey = images.float().mean(dim=1, keepdim=True)
    return F.interpolate(grey, size=(mask_size, mask_size), mode="bilinear", antialias=True, align_corners=False)


def threshold_predictor(threshold: float, polarity: int, mask_size: int, num_classes: int = 1) -> Predictor:
    """Logits whose sigmoid is above 0.5 exactly where the image is above ``threshold`` (polarity +1) or below
    it (-1), at the mask size; the same map for every class."""

    def predict(images: torch.Tensor) -> torch.Tensor:
        logits = polarity * THRESHOLD_STEEPNESS * (_intensity(images, mask_size) - threshold)
        return logits.expand(-1, num_classes, -1, -1)

    return predict


@torch.no_grad()
def fit_threshold(dataset: SiteDataset, train: Sequence[int], candidates: int = 97) -> dict:
    """The threshold and polarity with the highest Dice (this project's rule) on the site's training samples,
    searched over ``candidates`` quantiles of their non-background intensities (one threshold for all classes)."""
    if not train:
        raise ConfigError(f"site {dataset.manifest.site}: no training samples to choose a threshold on")
    items = [dataset[i] for i in train]  # read once; every candidate is scored on the same tensors
    values = _intensity(torch.stack([item["image"] for item in items]), dataset.mask_size)
    masks = torch.stack([item["mask"] for item in items])
    valid = torch.stack([item["valid"] for item in items])  # padding is scored by no candidate
    foreground = values[values > 0.02]
    pool = foreground if foreground.numel() else values.flatten()
    grid = torch.quantile(pool, torch.linspace(0.01, 0.99, candidates))
    best = {"dice": -1.0, "threshold": None, "polarity": 1}
    for polarity in (1, -1):
        dice = _slice_dice(values, masks, grid, polarity, valid)
        k = int(torch.argmax(torch.nan_to_num(dice, nan=-1.0)))
        if math.isfinite(float(dice[k])) and float(dice[k]) > best["dice"]:
            best = {"dice": float(dice[k]), "threshold": float(grid[k]), "polarity": polarity}
    if best["threshold"] is None:
        raise ConfigError(f"site {dataset.manifest.site}: no threshold scores on the training samples (no foreground?)")
    return {"threshold": best["threshold"], "polarity": best["polarity"], "train_dice": best["dice"]}


def _slice_dice(values: torch.Tensor, masks: torch.Tensor, thresholds: torch.Tensor, polarity: int,
                valid: torch.Tensor | None = None) -> torch.Tensor:
    """For each threshold, the project's Dice of ``values > t`` (or ``<``) against ``masks`` (N, C, M, M): per slice
    and class, slices empty in both left out, averaged over slices, then over classes (what SegmentationMetric
    computes, here for every threshold at once); ``valid`` (N, 1, M, M): False on padding, which is left out."""
    pred = (values[None] > thresholds.view(-1, 1, 1, 1, 1)) if polarity > 0 else (values[None] < thresholds.view(-1, 1, 1, 1, 1))
    truth = masks[None] > 0.5
    if valid is not None:
        pred, truth = pred & valid[None], truth & valid[None]
    inter = (pred & truth).sum(dim=(-1, -2)).float()
    total = pred.sum(dim=(-1, -2)).float() + truth.sum(dim=(-1, -2)).float()
    scored = total > 0
    per_slice = torch.where(scored, 2 * inter / total.clamp(min=1), torch.zeros_like(total))
    per_class = per_slice.sum(dim=1) / scored.sum(dim=1).clamp(min=1)  # (T, C)
    per_class = torch.where(scored.any(dim=1), per_class, torch.full_like(per_class, float("nan")))
    return per_class.nanmean(dim=1)


def train_alone(model_cfg: ModelConfig, train_cfg: TrainConfig, site_dirs: str | os.PathLike | Sequence,
                epochs: int, log: Callable[[str], None] | None = None) -> LocalTrainer:
    """Train on the sites' training splits (several: pooled) for ``epochs`` epochs; the trainer holds the last
    epoch's model. Each site is split exactly as in the federation."""
    if epochs < 1:
        raise ConfigError(f"epochs is {epochs}; expected >= 1")
    trainer = LocalTrainer(model_cfg, train_cfg, site_dirs)
    for epoch in range(1, epochs + 1):
        fit = trainer.fit(epochs=1)
        if log:
            log(f"epoch {epoch}/{epochs}: loss {fit['loss']:.4f}")
    return trainer
