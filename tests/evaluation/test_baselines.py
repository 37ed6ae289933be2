"""The demo's baselines: a per-site threshold and training alone, scored on LocalTrainer's own validation split."""

from __future__ import annotations

import numpy as np
import torch

from fedfms.data.site_dataset import SiteWriter
from fedfms.data.synthetic import make_disc_site
from fedfms.evaluation.baselines import (_slice_dice, fit_threshold, model_predictor, score, site_split, threshold_predictor,
                                         train_alone)
from fedfms.models import ModelConfig
from fedfms.training.trainer import LocalTrainer, TrainConfig

TRAIN = TrainConfig(lr=1e-3, loss="bce_dice", val_fraction=0.2, progress=False, threads=1)


def dark_disc_site(path, seed=0):
    """Discs darker than their surround: only the 'below' polarity finds them."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:64, :64]
    with SiteWriter(path, "dark", "synthetic", ["disc"], 128, 32, {"generator": "dark discs"}) as writer:
        for v in range(4):
            for s in range(4):
                disc = (yy - rng.uniform(20, 44)) ** 2 + (xx - rng.uniform(20, 44)) ** 2 <= rng.uniform(8, 14) ** 2
                writer.add((0.8 - 0.5 * disc + rng.uniform(-0.05, 0.05, (64, 64))).astype(np.float32), disc.astype(np.uint8), f"c{v}", s)
    return path


def test_threshold_is_chosen_on_training_slices_and_finds_either_polarity(tmp_path):
    bright = make_disc_site(tmp_path / "bright", num_volumes=5, slices_per_volume=4, brightness=0.45)
    dataset, train, val = site_split(bright, TRAIN, 128, 32)
    assert not set(train) & set(val)
    fit = fit_threshold(dataset, train)
    assert fit["polarity"] == 1 and fit["train_dice"] > 0.8
    assert score(threshold_predictor(fit["threshold"], fit["polarity"], 32), dataset, val)["dice"] > 0.8
    dark = dark_disc_site(tmp_path / "dark")
    dataset, train, val = site_split(dark, TRAIN, 128, 32)
    fit = fit_threshold(dataset, train)
    assert fit["polarity"] == -1 and fit["train_dice"] > 0.8


def test_the_threshold_search_scores_exactly_like_segmentation_metric(tmp_path):
    site = make_disc_site(tmp_path / "s", num_volumes=3, slices_per_volume=4, brightness=0.2, seed=3)
    dataset, train, _ = site_split(site, TRAIN, 128, 32)
    images = torch.stack([dataset[i]["image"] for i in train])
    masks = torch.stack([dataset[i]["mask"] for i in train])
    values = torch.nn.functional.interpolate(images.mean(1, keepdim=True), size=32, mode="bilinear", antialias=True, align_corners=False)
    thresholds = torch.tensor([0.1, 0.3, 0.45, 0.6, 0.99])
    for polarity in (1, -1):
        fast = _slice_dice(values, masks, thresholds, polarity)
        for t, d in zip(thresholds.tolist(), fast.tolist()):
            slow = score(threshold_predictor(t, polarity, 32), dataset, train)["dice"]
            assert (np.isnan(slow) and np.isnan(d)) or abs(slow - d) < 1e-6


def test_train_alone_uses_the_federations_split_and_scores_like_the_trainer(tmp_path):
    site = make_disc_site(tmp_path / "s", num_volumes=5, slices_per_volume=4)
    model = ModelConfig("tiny", "fedmsa", pretrained=False)
    trainer = train_alone(model, TRAIN, site, epochs=2)
    dataset, train, val = site_split(site, TRAIN, 128, 32)
    reference = LocalTrainer(model, TRAIN, site)
    assert [reference.datasets["val"].indices, reference.datasets["train"].indices] == [val, train]
    ours = score(model_predictor(trainer.model), dataset, val)
    theirs = trainer.evaluate("val")
    assert abs(ours["dice"] - theirs["dice"]) < 1e-6 and ours["num_samples"] == theirs["num_samples"] == len(val)
