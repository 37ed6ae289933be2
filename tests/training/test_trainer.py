"""The local trainer on a learnable synthetic site: it learns, it is deterministic, and it trains only
what travels."""

from __future__ import annotations

import math

import pytest
import torch

from fedfms.errors import ConfigError
from fedfms.models import ModelConfig, is_travel_key
from fedfms.training.trainer import LocalTrainer, TrainConfig, WeightsMismatch


def make_trainer(site, mode="fedmsa", **train_kw) -> LocalTrainer:
    train = TrainConfig(**{"lr": 1e-3, "loss": "bce_dice", "batch_size": 6, "progress": False, **train_kw})
    return LocalTrainer(ModelConfig("tiny", mode, num_classes=1, pretrained=False), train, str(site))


@pytest.mark.parametrize("mode", ["fedsam", "fedmsa"])
def test_training_lowers_the_loss_and_raises_dice(disc_site, mode):
    trainer = make_trainer(disc_site, mode)
    before = trainer.evaluate("all")
    trainer.fit(epochs=10)
    after = trainer.evaluate("all")
    assert before["dice"] < 0.3
    assert after["dice"] > 0.6, (mode, before["dice"], after["dice"])
    assert after["loss"] < 0.7 * before["loss"]
    assert after["volume_dice"] > 0.6


def test_site_split_and_sample_count(disc_site):
    trainer = make_trainer(disc_site)
    # 5 volumes, 10% held out -> at least one whole volume (8 slices) in val
    assert trainer.num_train_samples == 32
    assert len(trainer.datasets["val"]) == 8
    train_vols = {trainer.datasets["all"].volumes[i] for i in trainer.datasets["train"].indices}
    val_vols = {trainer.datasets["all"].volumes[i] for i in trainer.datasets["val"].indices}
    assert not train_vols & val_vols


def test_same_seed_gives_identical_weights(disc_site):
    runs = []
    for _ in range(2):
        trainer = make_trainer(disc_site, "fedsam", seed=3)
        trainer.fit(epochs=2)
        runs.append(trainer.travel_weights())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    other = make_trainer(disc_site, "fedsam", seed=4)
    other.fit(epochs=2)
    assert not all(torch.equal(runs[0][k], v) for k, v in other.travel_weights().items())


def test_fedmsa_step_keeps_the_frozen_encoder_and_moves_the_travel_set(disc_site):
    trainer = make_trainer(disc_site, "fedmsa", max_steps_per_epoch=1)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.fit(epochs=1)
    after = trainer.model.state_dict()
    frozen = [k for k in before if not is_travel_key(k, "fedmsa")]
    assert any(k.startswith("image_encoder.blocks.") for k in frozen)
    for k in frozen:
        assert torch.equal(before[k], after[k]), f"frozen tensor {k} changed"
    for k in ("image_encoder.blocks.0.space_adapter.up.weight", "mask_decoder.output_upscaling.0.weight", "head.weight"):
        assert not torch.equal(before[k], after[k]), f"trained tensor {k} did not change"


def test_train_round_reports_weights_count_and_metrics(disc_site):
    trainer = make_trainer(disc_site, "fedmsa", max_steps_per_epoch=1)
    result = trainer.train_round(trainer.travel_weights())
    assert set(result.weights) == set(trainer._spec)
    assert result.num_samples == 32
    assert result.metrics["train"]["steps"] == 1
    assert "dice" in result.metrics["val_before"]


def test_load_travel_weights_round_trip_and_refusals(disc_site):
    source = make_trainer(disc_site, "fedmsa")
    source.fit(epochs=1)
    weights = source.travel_weights()
    target = make_trainer(disc_site, "fedmsa")
    target.load_travel_weights(weights)
    assert all(torch.equal(target.model.state_dict()[k], v) for k, v in weights.items())

    key = "head.weight"
    with pytest.raises(WeightsMismatch, match=r"1 missing \(e\.g\. \['head\.weight'\]\)"):
        target.load_travel_weights({k: v for k, v in weights.items() if k != key})
    with pytest.raises(WeightsMismatch, match=r"1 unexpected \(e\.g\. \['image_encoder\.blocks\.0\.attn\.qkv\.weight'\]\)"):
        target.load_travel_weights({**weights, "image_encoder.blocks.0.attn.qkv.weight": torch.zeros(192, 64)})
    with pytest.raises(WeightsMismatch, match=r"'head\.weight' has shape \(2, 3, 1, 1\); expected \(1, 3, 1, 1\)"):
        target.load_travel_weights({**weights, key: torch.zeros(2, 3, 1, 1)})
    # a FedSAM (full) state dict is not a FedMSA travel set
    full = make_trainer(disc_site, "fedsam").travel_weights()
    with pytest.raises(WeightsMismatch):
        target.load_travel_weights(full)


def test_class_count_must_match_the_site(disc_site):
    with pytest.raises(ConfigError, match="num_classes=2"):
        LocalTrainer(ModelConfig("tiny", "fedmsa", num_classes=2, pretrained=False), TrainConfig(progress=False), str(disc_site))


def test_train_config_from_dict_validates():
    assert TrainConfig.from_dict({"betas": [0.8, 0.9]}).betas == (0.8, 0.9)
    with pytest.raises(ConfigError, match="loss"):
        TrainConfig.from_dict({"loss": "focal"})
    with pytest.raises(ConfigError, match="unknown field"):
        TrainConfig.from_dict({"epoch": 1})


def test_evaluating_an_empty_split_gives_nan_metrics(tmp_path):
    """A one-volume site has no validation part; evaluating it must not crash or invent a score."""
    from fedfms.data.synthetic import make_disc_site

    site = make_disc_site(tmp_path / "one", num_volumes=1, slices_per_volume=3)
    trainer = make_trainer(site)
    assert len(trainer.datasets["val"]) == 0
    result = trainer.evaluate("val")
    assert result["num_samples"] == 0
    assert math.isnan(result["dice"]) and math.isnan(result["volume_dice"]) and math.isnan(result["loss"])
    assert "val_before" not in trainer.train_round(should_abort=lambda: True).metrics
