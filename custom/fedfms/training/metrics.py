"""Dice and IoU per class, per slice and per volume, computed with MONAI.

Honest rules (the reference code broke both): predictions are ``sigmoid(logits) > 0.5``, once, not an
average over thresholds; a slice (or volume) whose ground truth and prediction are both empty is left out
of the mean instead of scoring 1. An empty ground truth with a non-empty prediction scores 0.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np
import torch
from monai.metrics import compute_dice, compute_iou, get_confusion_matrix


def _empty_both(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, C) True where prediction and ground truth are both empty."""
    return (pred.flatten(2).sum(-1) == 0) & (target.flatten(2).sum(-1) == 0)


class SegmentationMetric:
    """Accumulates batches; :meth:`aggregate` returns slice-level and volume-level Dice/IoU.

    ``update(logits, target, volumes)``: logits and target (B, C, H, W); volumes, the case id of each slice
    (3D Dice/IoU are computed from the voxel counts summed over each volume's slices)."""

    def __init__(self, class_names: Sequence[str], threshold: float = 0.5):
        self.class_names = list(class_names)
        self.threshold = threshold
        self.reset()

    def reset(self) -> None:
        self._dice: list[torch.Tensor] = []
        self._iou: list[torch.Tensor] = []
        self._volume_counts: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros(len(self.class_names), 3))

    @torch.no_grad()
    def update(self, logits: torch.Tensor, target: torch.Tensor, volumes: Sequence[str] | None = None) -> None:
        if logits.shape != target.shape or logits.shape[1] != len(self.class_names):
            raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} must both be (B, {len(self.class_names)}, H, W)")
        pred = (torch.sigmoid(logits.float()) > self.threshold).float().cpu()
        target = (target > 0.5).float().cpu()
        skip = _empty_both(pred, target)
        dice = compute_dice(pred, target, include_background=True, ignore_empty=False)
        iou = compute_iou(pred, target, include_background=True, ignore_empty=False)
        self._dice.append(dice.masked_fill(skip, float("nan")))
        self._iou.append(iou.masked_fill(skip, float("nan")))
        confusion = get_confusion_matrix(pred, target, include_background=True)  # (B, C, [tp, fp, tn, fn])
        for i, volume in enumerate(volumes or [f"slice{len(self._volume_counts)}_{i}" for i in range(len(pred))]):
            self._volume_counts[volume] += confusion[i][:, [0, 1, 3]]

    def aggregate(self) -> dict:
        """Means over scored slices/volumes; per-class lists; ``nan`` where nothing was scored."""
        nan, per_class = float("nan"), [float("nan")] * len(self.class_names)
        # Every key is present even when nothing was seen (an empty split), so callers can index it.
        result: dict = {"num_slices": 0, "num_volumes": len(self._volume_counts), "dice": nan, "iou": nan,
                        "dice_per_class": per_class, "iou_per_class": list(per_class), "volume_dice": nan,
                        "volume_iou": nan, "volume_dice_per_class": list(per_class), "volume_iou_per_class": list(per_class)}
        if self._dice:
            dice = torch.cat(self._dice)
            iou = torch.cat(self._iou)
            result["num_slices"] = len(dice)
            result["dice_per_class"] = _nanmean(dice, 0)
            result["iou_per_class"] = _nanmean(iou, 0)
            result["dice"] = float(np.nanmean(result["dice_per_class"])) if _any_finite(result["dice_per_class"]) else float("nan")
            result["iou"] = float(np.nanmean(result["iou_per_class"])) if _any_finite(result["iou_per_class"]) else float("nan")
        if self._volume_counts:
            counts = torch.stack(list(self._volume_counts.values()))  # (V, C, 3)
            tp, fp, fn = counts[..., 0], counts[..., 1], counts[..., 2]
            scored = (tp + fp + fn) > 0
            vdice = torch.where(scored, 2 * tp / (2 * tp + fp + fn).clamp(min=1), torch.tensor(float("nan")))
            viou = torch.where(scored, tp / (tp + fp + fn).clamp(min=1), torch.tensor(float("nan")))
            result["volume_dice_per_class"] = _nanmean(vdice, 0)
            result["volume_iou_per_class"] = _nanmean(viou, 0)
            result["volume_dice"] = float(np.nanmean(result["volume_dice_per_class"])) if _any_finite(result["volume_dice_per_class"]) else float("nan")
            result["volume_iou"] = float(np.nanmean(result["volume_iou_per_class"])) if _any_finite(result["volume_iou_per_class"]) else float("nan")
        result["classes"] = self.class_names
        return result


def _nanmean(x: torch.Tensor, dim: int) -> list[float]:
    return [float(v) for v in torch.nanmean(x, dim=dim)]


def _any_finite(values: list[float]) -> bool:
    return any(np.isfinite(v) for v in values)
