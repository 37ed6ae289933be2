"""Dice/IoU edge cases, each checked against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from fedfms.training.metrics import SegmentationMetric

BIG = 20.0  # a logit whose sigmoid is unambiguously 0 or 1


def logits_of(pred: torch.Tensor) -> torch.Tensor:
    return torch.where(pred > 0, BIG, -BIG)


def mask(h: int, w: int, *pixels: tuple[int, int]) -> torch.Tensor:
    m = torch.zeros(h, w)
    for y, x in pixels:
        m[y, x] = 1
    return m


def run(pred: torch.Tensor, target: torch.Tensor, volumes=None, classes=("fg",)) -> dict:
    metric = SegmentationMetric(list(classes))
    metric.update(logits_of(pred), target, volumes)
    return metric.aggregate()


def test_perfect_prediction():
    target = torch.zeros(2, 1, 8, 8)
    target[:, :, 2:5, 2:6] = 1
    r = run(target.clone(), target)
    assert r["dice"] == pytest.approx(1.0) and r["iou"] == pytest.approx(1.0)
    assert r["volume_dice"] == pytest.approx(1.0)


def test_all_wrong_prediction():
    target = torch.zeros(1, 1, 8, 8)
    target[..., :4, :] = 1
    r = run(1 - target, target)
    assert r["dice"] == 0.0 and r["iou"] == 0.0


def test_threshold_is_on_probabilities_not_logits():
    target = torch.ones(1, 1, 4, 4)
    metric = SegmentationMetric(["fg"])
    metric.update(torch.full((1, 1, 4, 4), 0.1), target)  # sigmoid(0.1) > 0.5: predicted positive
    assert metric.aggregate()["dice"] == pytest.approx(1.0)
    metric.reset()
    metric.update(torch.full((1, 1, 4, 4), -0.1), target)
    assert metric.aggregate()["dice"] == 0.0


def test_empty_truth_and_empty_prediction_is_left_out_not_scored_one():
    target = torch.zeros(2, 1, 4, 4)
    pred = torch.zeros(2, 1, 4, 4)
    target[0, 0, 0, :2] = 1  # slice 0: GT 2 px, prediction 1 of them -> Dice 2*1/(1+2) = 2/3
    pred[0, 0, 0, 0] = 1
    r = run(pred, target)  # slice 1 is empty in both
    assert r["num_slices"] == 2
    assert r["dice"] == pytest.approx(2 / 3)  # scoring the empty slice as 1 would give 5/6
    assert r["iou"] == pytest.approx(1 / 2)


def test_all_empty_gives_nan():
    r = run(torch.zeros(3, 1, 4, 4), torch.zeros(3, 1, 4, 4), volumes=["a", "a", "b"])
    assert math.isnan(r["dice"]) and math.isnan(r["iou"])
    assert math.isnan(r["volume_dice"]) and math.isnan(r["volume_iou"])


def test_empty_truth_with_a_false_positive_scores_zero():
    pred = torch.zeros(1, 1, 4, 4)
    pred[0, 0, 1, 1] = 1
    r = run(pred, torch.zeros(1, 1, 4, 4))
    assert r["dice"] == 0.0 and r["iou"] == 0.0


def test_per_class_values():
    target = torch.zeros(1, 2, 4, 4)
    target[0, 0, :2] = 1  # class "disc": 8 px, predicted exactly
    target[0, 1, 0, :4] = 1  # class "cup": 4 px, predicted 2 of them plus 2 false positives
    pred = target.clone()
    pred[0, 1, 0, 2:] = 0
    pred[0, 1, 3, :2] = 1
    r = run(pred, target, classes=("disc", "cup"))
    assert r["dice_per_class"] == pytest.approx([1.0, 2 * 2 / (4 + 4)])
    assert r["iou_per_class"] == pytest.approx([1.0, 2 / 6])
    assert r["dice"] == pytest.approx((1.0 + 0.5) / 2)
    assert r["classes"] == ["disc", "cup"]


def test_volume_dice_sums_voxels_instead_of_averaging_slices():
    """Volume "a": slice 0 exact (8 px), slice 1 misses its 2 px; volume "b": 1 hit + 1 false positive.

    slice Dice: a0 = 1, a1 = 0, b0 = 2/3                         -> mean (1 + 0 + 2/3) / 3 = 5/9
    volume Dice: a = 2*8 / (2*8 + 0 + 2) = 16/18, b = 2/3         -> mean (8/9 + 2/3) / 2 = 7/9
    volume IoU:  a = 8 / 10,                b = 1/2               -> mean 0.65
    """
    target = torch.zeros(3, 1, 4, 4)
    pred = torch.zeros(3, 1, 4, 4)
    target[0, 0, :2] = 1
    pred[0, 0, :2] = 1
    target[1, 0, 3, :2] = 1
    target[2, 0, 0, 0] = 1
    pred[2, 0, 0, :2] = 1
    metric = SegmentationMetric(["fg"])
    # volumes arrive over two batches, as from a DataLoader
    metric.update(logits_of(pred[:2]), target[:2], ["a", "a"])
    metric.update(logits_of(pred[2:]), target[2:], ["b"])
    r = metric.aggregate()
    assert r["dice"] == pytest.approx(5 / 9)
    assert r["volume_dice"] == pytest.approx(7 / 9)
    assert r["volume_dice_per_class"] == pytest.approx([7 / 9])
    assert r["volume_iou"] == pytest.approx((0.8 + 0.5) / 2)
    assert r["num_volumes"] == 2 and r["num_slices"] == 3


def test_empty_volume_is_left_out_of_the_volume_mean():
    target = torch.zeros(2, 1, 4, 4)
    target[0, 0, 0, 0] = 1
    r = run(target.clone(), target, volumes=["a", "empty"])
    assert r["volume_dice"] == pytest.approx(1.0)


def test_shape_mismatch_is_refused():
    metric = SegmentationMetric(["a", "b"])
    with pytest.raises(ValueError, match="must both be"):
        metric.update(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4))


def test_nothing_seen_gives_nan_for_every_key():
    r = SegmentationMetric(["a", "b"]).aggregate()
    for key in ("dice", "iou", "volume_dice", "volume_iou"):
        assert math.isnan(r[key]), key
    for key in ("dice_per_class", "iou_per_class", "volume_dice_per_class", "volume_iou_per_class"):
        assert len(r[key]) == 2 and all(math.isnan(v) for v in r[key]), key
    assert r["num_slices"] == 0 and r["num_volumes"] == 0
