"""Dice and IoU per class, per slice and per volume: this project's rule and, beside it, the paper code's.

This project's ("honest") rule, computed with MONAI: predictions are ``sigmoid(logits) > 0.5``, once, not an
average over thresholds; a slice (or volume) whose ground truth and prediction are both empty is left out of
the mean instead of scoring 1. An empty ground truth with a non-empty prediction scores 0. Also 3D Dice/IoU.

The paper code's ("reference") rule, so numbers can be set beside the paper's Table 1 (LIU-YUXI/FedFMS,
``eval_seg`` as called by ``train_fed_sam.py``): every 2D slice is scored on its own, once per threshold in
:data:`REFERENCE_THRESHOLDS`, applied to the model's *raw logits* (the SAM decoder's output; the authors'
U-Net returned sigmoid probabilities, so for the U-Net the thresholds apply to probabilities), and the
scores are averaged over the thresholds, then over slices. Dice is ``(2 |P & G| + 1e-4) / (|P| + |G| + 1e-4)``
and IoU ``(|P & G| + 1e-6) / (|P | G| + 1e-6)``, so a slice whose ground truth and prediction are both empty
scores 1. The authors' code uses five thresholds, 0.1, 0.3, 0.5, 0.7 and 0.9 (every version of
``train_fed_sam.py``, ``train_fed_sam_ft.py`` and ``train_fed_unet.py`` in their history), not nine.

Under both rules only a sample's content counts: where a sample was padded to the square (its aspect ratio kept,
:mod:`fedfms.data.geometry`), the ``valid`` map the reader gives is False, and there prediction and ground
truth are both taken as empty. A padded pixel thus adds no true or false positive and no false negative: it can
neither raise nor lower a Dice or IoU.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np
import torch
from fedfms import monai_import  # noqa: F401  (before MONAI: fedfms/monai_import.py)
from monai.metrics import compute_dice, compute_iou, get_confusion_matrix

REFERENCE_THRESHOLDS = (0.1, 0.3, 0.5, 0.7, 0.9)  # the authors' eval thresholds
REFERENCE_SPACES = ("logits", "probabilities")  # what the thresholds are applied to
_REFERENCE_DICE_EPS = 1e-4  # the authors' DiceCoeff smoothing
_REFERENCE_IOU_EPS = 1e-6  # the authors' numpy IoU smoothing

HONEST_RULE = ("this project's rule: sigmoid > 0.5; Dice/IoU per 2D slice and class, averaged over slices; a slice with "
               "empty ground truth and empty prediction is left out")


def reference_rule(on: str = "logits", thresholds: Sequence[float] = REFERENCE_THRESHOLDS) -> str:
    """One line describing the paper code's rule, for table captions and result files."""
    values = ", ".join(f"{t:g}" for t in thresholds)
    target = "the raw logits" if on == "logits" else "the sigmoid probabilities"
    return (f"the paper code's rule: per 2D slice and class, thresholds {values} applied to {target} and the "
            f"{len(thresholds)} scores averaged; a slice with empty ground truth and empty prediction scores 1")


def reference_space(variant: str) -> str:
    """Where the authors applied their thresholds: SAM's raw logits; their U-Net returned probabilities. The
    nnU-Net baseline is scored on its probabilities too (nnU-Net's predictor outputs them; docs/nnunet.md)."""
    return "probabilities" if variant in ("unet", "nnunet") else "logits"


def reference_slice_scores(
    outputs: torch.Tensor,
    target: torch.Tensor,
    thresholds: Sequence[float] = REFERENCE_THRESHOLDS,
    on: str = "logits",
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C) Dice and IoU of every slice and class under the paper code's rule (module docstring).

    ``outputs``: the model's logits (B, C, H, W); ``on="probabilities"`` thresholds ``sigmoid(outputs)``
    instead. The ground truth is thresholded at each threshold too, as the authors did (the same for 0/1 masks).
    ``valid``: (B, 1 or C, H, W) bool, False on padding (left out of the score); None: every pixel counts."""
    if on not in REFERENCE_SPACES:
        raise ValueError(f"reference scoring applies thresholds to {REFERENCE_SPACES}, not {on!r}")
    if not thresholds:
        raise ValueError("reference scoring needs at least one threshold")
    x = outputs.detach().float().cpu()
    if on == "probabilities":
        x = torch.sigmoid(x)
    truth = target.detach().float().cpu()
    keep = torch.ones(1, dtype=torch.bool) if valid is None else valid.detach().cpu().bool()
    dice = torch.zeros(x.shape[:2], dtype=torch.float64)
    iou = torch.zeros_like(dice)
    for th in thresholds:
        pred = ((x > th) & keep).flatten(2)
        gt = ((truth > th) & keep).flatten(2)
        inter = (pred & gt).sum(-1).double()
        p_sum, g_sum = pred.sum(-1).double(), gt.sum(-1).double()
        dice += (2 * inter + _REFERENCE_DICE_EPS) / (p_sum + g_sum + _REFERENCE_DICE_EPS)
        iou += (inter + _REFERENCE_IOU_EPS) / (p_sum + g_sum - inter + _REFERENCE_IOU_EPS)
    return dice / len(thresholds), iou / len(thresholds)


def _empty_both(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, C) True where prediction and ground truth are both empty."""
    return (pred.flatten(2).sum(-1) == 0) & (target.flatten(2).sum(-1) == 0)


class SegmentationMetric:
    """Accumulates batches; :meth:`aggregate` returns slice-level and volume-level Dice/IoU under this
    project's rule and slice-level Dice/IoU under the paper code's rule (``*_reference`` keys).

    ``update(logits, target, volumes, valid)``: logits and target (B, C, H, W); volumes, the case id of each slice
    (3D Dice/IoU are computed from the voxel counts summed over each volume's slices); valid, (B, 1, H, W) bool,
    False on padding (``SiteDataset`` items' ``valid``; None: every pixel counts).
    ``reference_on``: what the paper code's thresholds apply to (see :func:`reference_space`)."""

    def __init__(self, class_names: Sequence[str], threshold: float = 0.5,
                 reference_thresholds: Sequence[float] = REFERENCE_THRESHOLDS, reference_on: str = "logits"):
        if reference_on not in REFERENCE_SPACES:
            raise ValueError(f"reference_on is {reference_on!r}; expected one of {REFERENCE_SPACES}")
        self.class_names = list(class_names)
        self.threshold = threshold
        self.reference_thresholds = tuple(float(t) for t in reference_thresholds)
        self.reference_on = reference_on
        self.reset()

    def reset(self) -> None:
        self._dice: list[torch.Tensor] = []
        self._iou: list[torch.Tensor] = []
        self._ref_dice: list[torch.Tensor] = []
        self._ref_iou: list[torch.Tensor] = []
        self._volume_counts: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros(len(self.class_names), 3))

    @torch.no_grad()
    def update(self, logits: torch.Tensor, target: torch.Tensor, volumes: Sequence[str] | None = None,
               valid: torch.Tensor | None = None) -> None:
        if logits.shape != target.shape or logits.shape[1] != len(self.class_names):
            raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} must both be "
                             f"(B, {len(self.class_names)}, H, W)")
        if valid is not None and (valid.dim() != 4 or valid.shape[0] != logits.shape[0] or valid.shape[2:] != logits.shape[2:]
                                  or valid.shape[1] not in (1, logits.shape[1])):
            raise ValueError(f"valid {tuple(valid.shape)} must be (B, 1 or C, H, W) like logits {tuple(logits.shape)}")
        ref_dice, ref_iou = reference_slice_scores(logits, target, self.reference_thresholds, self.reference_on, valid)
        self._ref_dice.append(ref_dice)
        self._ref_iou.append(ref_iou)
        keep = 1.0 if valid is None else valid.detach().cpu().float()
        pred = (torch.sigmoid(logits.float()) > self.threshold).float().cpu() * keep
        target = (target > 0.5).float().cpu() * keep
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
                        "volume_iou": nan, "volume_dice_per_class": list(per_class), "volume_iou_per_class": list(per_class),
                        "dice_reference": nan, "iou_reference": nan, "dice_reference_per_class": list(per_class),
                        "iou_reference_per_class": list(per_class), "reference_thresholds": list(self.reference_thresholds),
                        "reference_on": self.reference_on}
        if self._dice:
            dice = torch.cat(self._dice)
            iou = torch.cat(self._iou)
            result["num_slices"] = len(dice)
            result["dice_per_class"] = _nanmean(dice, 0)
            result["iou_per_class"] = _nanmean(iou, 0)
            result["dice"] = float(np.nanmean(result["dice_per_class"])) if _any_finite(result["dice_per_class"]) else float("nan")
            result["iou"] = float(np.nanmean(result["iou_per_class"])) if _any_finite(result["iou_per_class"]) else float("nan")
            # the paper code's rule scores every slice (empty/empty = 1): plain means, no slice left out
            ref_dice, ref_iou = torch.cat(self._ref_dice), torch.cat(self._ref_iou)
            result["dice_reference_per_class"] = [float(v) for v in ref_dice.mean(0)]
            result["iou_reference_per_class"] = [float(v) for v in ref_iou.mean(0)]
            result["dice_reference"] = float(np.mean(result["dice_reference_per_class"]))
            result["iou_reference"] = float(np.mean(result["iou_reference_per_class"]))
        if self._volume_counts:
            counts = torch.stack(list(self._volume_counts.values()))  # (V, C, 3)
            tp, fp, fn = counts[..., 0], counts[..., 1], counts[..., 2]
            scored = (tp + fp + fn) > 0
            vdice = torch.where(scored, 2 * tp / (2 * tp + fp + fn).clamp(min=1), torch.tensor(float("nan")))
            viou = torch.where(scored, tp / (tp + fp + fn).clamp(min=1), torch.tensor(float("nan")))
            result["volume_dice_per_class"] = _nanmean(vdice, 0)
            result["volume_iou_per_class"] = _nanmean(viou, 0)
            for name in ("volume_dice", "volume_iou"):
                per_class = result[f"{name}_per_class"]
                result[name] = float(np.nanmean(per_class)) if _any_finite(per_class) else float("nan")
        result["classes"] = self.class_names
        return result


def _nanmean(x: torch.Tensor, dim: int) -> list[float]:
    return [float(v) for v in torch.nanmean(x, dim=dim)]


def _any_finite(values: list[float]) -> bool:
    return any(np.isfinite(v) for v in values)
