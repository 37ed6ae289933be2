"""The paper code's scoring rule (``*_reference`` keys), pinned on cases worked out by hand.

Its rule (LIU-YUXI/FedFMS, ``eval_seg`` as ``train_fed_sam.py`` calls it): per 2D slice, Dice and IoU at each
of the thresholds 0.1, 0.3, 0.5, 0.7, 0.9 applied to the raw logits, averaged; Dice = (2I + 1e-4)/(P + G + 1e-4)
and IoU = (I + 1e-6)/(U + 1e-6), so an empty/empty slice scores 1.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedfms.models import ModelConfig
from fedfms.training.metrics import (REFERENCE_THRESHOLDS, SegmentationMetric, reference_rule, reference_slice_scores,
                                     reference_space)
from fedfms.training.trainer import LocalTrainer, TrainConfig

BIG = 20.0
EPS_D, EPS_I = 1e-4, 1e-6


def metric_of(logits, target, classes=("fg",), **kw) -> dict:
    m = SegmentationMetric(list(classes), **kw)
    m.update(logits, target)
    return m.aggregate()


def ramp_slice():
    """One 2x2 slice, all foreground; logits 0.25, 0.45, 0.65, 0.75 (no pixel sits on a threshold)."""
    logits = torch.tensor([0.25, 0.45, 0.65, 0.75]).view(1, 1, 2, 2)
    return logits, torch.ones(1, 1, 2, 2)


def dice_of(predicted: int, truth: int = 4) -> float:
    """The authors' smoothed Dice when ``predicted`` of ``truth`` foreground pixels are predicted (no false positive)."""
    return (2 * predicted + EPS_D) / (predicted + truth + EPS_D)


def iou_of(predicted: int, truth: int = 4) -> float:
    return (predicted + EPS_I) / (truth + EPS_I)


def test_the_authors_five_thresholds():
    assert REFERENCE_THRESHOLDS == (0.1, 0.3, 0.5, 0.7, 0.9)
    assert "0.1, 0.3, 0.5, 0.7, 0.9 applied to the raw logits and the 5 scores averaged" in reference_rule()
    assert "empty prediction scores 1" in reference_rule()


def test_scores_are_averaged_over_thresholds_applied_to_raw_logits():
    logits, target = ramp_slice()
    # pixels above 0.1/0.3/0.5/0.7/0.9: 4, 3, 2, 1, 0 of the 4 foreground pixels
    counts = [4, 3, 2, 1, 0]
    r = metric_of(logits, target)
    assert r["dice_reference"] == pytest.approx(np.mean([dice_of(n) for n in counts]), abs=1e-9)
    assert r["iou_reference"] == pytest.approx(np.mean([iou_of(n) for n in counts]), abs=1e-9)
    # i.e. (1 + 6/7 + 2/3 + 2/5 + 0) / 5 = 0.5848 up to the smoothing
    assert r["dice_reference"] == pytest.approx((1 + 6 / 7 + 2 / 3 + 2 / 5) / 5, abs=1e-4)
    # this project's rule: sigmoid > 0.5, i.e. logit > 0 -> all 4 pixels, Dice 1
    assert r["dice"] == pytest.approx(1.0)
    assert r["reference_thresholds"] == [0.1, 0.3, 0.5, 0.7, 0.9] and r["reference_on"] == "logits"


def test_thresholds_on_probabilities_for_the_unet():
    logits, target = ramp_slice()
    # sigmoid(0.25..0.75) = 0.56..0.68: all 4 above 0.1, 0.3, 0.5; none above 0.7 or 0.9
    r = metric_of(logits, target, reference_on="probabilities")
    assert r["dice_reference"] == pytest.approx((3 * dice_of(4) + 2 * dice_of(0)) / 5, abs=1e-9)
    assert reference_space("unet") == "probabilities" and reference_space("vit_b") == "logits"
    with pytest.raises(ValueError, match="reference_on"):
        SegmentationMetric(["fg"], reference_on="softmax")


def test_nine_thresholds_when_asked():
    logits, target = ramp_slice()
    nine = tuple(round(0.1 * k, 1) for k in range(1, 10))
    # pixels above 0.1 ... 0.9: 4, 4, 3, 3, 2, 2, 1, 0, 0
    r = metric_of(logits, target, reference_thresholds=nine)
    assert r["dice_reference"] == pytest.approx(np.mean([dice_of(n) for n in (4, 4, 3, 3, 2, 2, 1, 0, 0)]), abs=1e-9)
    assert r["dice_reference"] != pytest.approx(metric_of(logits, target)["dice_reference"], abs=1e-3)


def test_empty_truth_and_empty_prediction_scores_one():
    target = torch.zeros(2, 1, 4, 4)
    logits = torch.full((2, 1, 4, 4), -BIG)
    target[0, 0, 0, :2] = 1  # slice 0: GT 2 px, predicted 1 of them at every threshold
    logits[0, 0, 0, 0] = BIG
    r = metric_of(logits, target)  # slice 1 is empty in both
    slice0_dice = (2 + EPS_D) / (3 + EPS_D)
    slice0_iou = (1 + EPS_I) / (2 + EPS_I)
    assert r["dice_reference"] == pytest.approx((slice0_dice + 1) / 2, abs=1e-9)
    assert r["iou_reference"] == pytest.approx((slice0_iou + 1) / 2, abs=1e-9)
    assert r["dice"] == pytest.approx(2 / 3)  # the honest rule leaves the empty slice out


def test_a_model_that_predicts_nothing_scores_the_share_of_empty_slices():
    """The paper's FedU-Net on BIDMC: Dice = IoU = 0.498. Half the slices empty and nothing predicted gives
    0.5 under the paper code's rule; under this project's rule the same model scores 0."""
    target = torch.zeros(4, 1, 8, 8)
    target[:2, :, 2:6, 2:6] = 1
    r = metric_of(torch.full((4, 1, 8, 8), -BIG), target)
    assert r["dice_reference"] == pytest.approx(0.5, abs=1e-5)
    assert r["iou_reference"] == pytest.approx(0.5, abs=1e-5)
    assert r["dice"] == 0.0 and r["iou"] == 0.0


def test_empty_truth_with_a_false_positive_scores_about_zero():
    logits = torch.full((1, 1, 4, 4), -BIG)
    logits[0, 0, 1, 1] = BIG
    r = metric_of(logits, torch.zeros(1, 1, 4, 4))
    assert r["dice_reference"] == pytest.approx(EPS_D / (1 + EPS_D), rel=1e-6)
    assert r["iou_reference"] < 1e-5


def test_per_class_and_mean_over_classes():
    target = torch.zeros(1, 2, 4, 4)
    target[0, 0, :2] = 1  # class 0: 8 px predicted exactly
    logits = torch.full((1, 2, 4, 4), -BIG)
    logits[0, 0, :2] = BIG  # class 1: empty truth, empty prediction -> 1
    r = metric_of(logits, target, classes=("disc", "cup"))
    assert r["dice_reference_per_class"] == pytest.approx([1.0, 1.0])
    assert r["dice_reference"] == pytest.approx(1.0)
    assert math.isnan(r["dice_per_class"][1])  # the honest rule cannot score the empty cup


def test_batches_and_slices_average_like_a_plain_loop():
    """Random logits over three batches against a per-slice loop written out here."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(7, 2, 6, 6, generator=gen) * 2
    target = (torch.rand(7, 2, 6, 6, generator=gen) > 0.6).float()
    target[2] = 0
    logits[2, 0] = -5  # one slice empty in both for class 0
    metric = SegmentationMetric(["a", "b"])
    for part in (slice(0, 3), slice(3, 4), slice(4, 7)):
        metric.update(logits[part], target[part])
    r = metric.aggregate()
    per_class = []
    for c in range(2):
        scores = []
        for i in range(7):
            d = []
            for th in REFERENCE_THRESHOLDS:
                p, g = (logits[i, c] > th).numpy(), (target[i, c] > th).numpy()
                d.append((2 * (p & g).sum() + EPS_D) / (p.sum() + g.sum() + EPS_D))
            scores.append(np.mean(d))
        per_class.append(np.mean(scores))
    assert r["dice_reference_per_class"] == pytest.approx(per_class, abs=1e-9)
    dice, iou = reference_slice_scores(logits, target)
    assert dice.shape == iou.shape == (7, 2) and float(dice[2, 0]) == pytest.approx(1.0)


def test_nothing_seen_gives_nan_reference_keys():
    r = SegmentationMetric(["a"]).aggregate()
    assert math.isnan(r["dice_reference"]) and math.isnan(r["iou_reference"])
    assert len(r["dice_reference_per_class"]) == 1


def test_trainer_evaluate_returns_both_rules(disc_site):
    model = ModelConfig("tiny", "fedmsa", num_classes=1, pretrained=False)
    trainer = LocalTrainer(model, TrainConfig(val_fraction=0.2, progress=False), str(disc_site))
    result = trainer.evaluate("all")
    for key in ("dice", "iou", "volume_dice", "volume_iou", "dice_reference", "iou_reference"):
        assert 0.0 <= result[key] <= 1.0, key
    assert result["reference_on"] == "logits" and len(result["dice_reference_per_class"]) == 1
    # independent: the same model, sample by sample
    trainer.model.eval()
    scores = []
    with torch.no_grad():
        for i in range(len(trainer.datasets["all"])):
            item = trainer.datasets["all"][i]
            scores.append(float(reference_slice_scores(trainer.model(item["image"][None]), item["mask"][None])[0][0, 0]))
    assert result["dice_reference"] == pytest.approx(np.mean(scores), abs=1e-6)
    unet = LocalTrainer(ModelConfig("unet", "fedsam", num_classes=1, pretrained=False, image_size=128),
                        TrainConfig(val_fraction=0.2, progress=False), str(disc_site))
    assert unet.evaluate("val")["reference_on"] == "probabilities"
