"""The site trainer: LocalTrainer's interface, nnU-Net's pieces, learning on a synthetic site."""

import json
import math

import pytest
import torch

from fedfms.data.synthetic import make_disc_site
from fedfms.errors import CheckpointError, FedFMSError
from fedfms.models import ModelConfig
from fedfms.nnunet.config import MODEL_CONFIG, TINY_TRAIN, NnUNetConfig, PlanError
from fedfms.nnunet.evaluate import PLAN_FILE, evaluate_sites, find_plan, train_centralized, write_plan
from fedfms.nnunet.fingerprint import merge_fingerprints, site_fingerprint
from fedfms.nnunet.plan import make_plan, travel_state
from fedfms.nnunet.sitedata import NnUNetSiteData
from fedfms.nnunet.trainer import NnUNetSiteTrainer
from fedfms.training.trainer import LocalTrainer, TrainConfig, WeightsMismatch
from nnunet_sites import make_two_class_site

TINY = {**TINY_TRAIN, "total_epochs": 10}


def _plan_for(*dirs, **settings):
    data = {d.name: NnUNetSiteData(d) for d in dirs}
    return make_plan(merge_fingerprints({n: site_fingerprint(x) for n, x in data.items()}), {**TINY, **settings})


@pytest.fixture
def site(tmp_path):
    return make_disc_site(tmp_path / "site", site="site", num_volumes=5, slices_per_volume=6, seed=0)


def test_evaluate_returns_what_the_local_trainer_returns_and_rounds_learn(site):
    plan = _plan_for(site)
    trainer = NnUNetSiteTrainer(plan, TINY, site)
    local = LocalTrainer(ModelConfig("unet", "fedsam", num_classes=1, pretrained=False, image_size=128),
                         TrainConfig(val_fraction=0.2, device="cpu"), site)
    before = trainer.evaluate("val")
    assert set(before) == set(local.evaluate("val"))
    assert before["reference_on"] == "probabilities" and before["num_samples"] == len(trainer.datasets["val"]) == 6
    assert trainer.num_train_samples == 24

    dice = []
    for r in range(4):
        result = trainer.train_round(trainer.travel_weights(), round_index=r)
        assert result.num_samples == 24 and result.metrics["train"]["steps"] == TINY["iterations_per_epoch"]
        assert set(result.weights) == set(travel_state(trainer.network)) and "encoder.stages.0.0.convs.0.conv.weight" in result.weights
        assert all(v.dtype == torch.float32 for v in result.weights.values())
        dice.append(result.metrics["val_before"]["dice"])
    after = trainer.evaluate("val")
    assert after["dice"] > before["dice"] + 0.3 and after["dice"] > 0.6, (before["dice"], dice, after["dice"])
    assert 0 <= after["dice_reference"] <= 1 and 0 <= after["volume_dice"] <= 1


def test_nnunets_own_loss_optimiser_schedule_and_augmentation(site):
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

    trainer = NnUNetSiteTrainer(_plan_for(site), TINY, site)
    assert isinstance(trainer.loss, DeepSupervisionWrapper) and isinstance(trainer.loss.loss, DC_and_CE_loss)
    assert trainer.loss.weight_factors[-1] == 0 and math.isclose(sum(trainer.loss.weight_factors), 1)
    assert isinstance(trainer.optimizer, torch.optim.SGD) and isinstance(trainer.lr_scheduler, PolyLRScheduler)
    group = trainer.optimizer.param_groups[0]
    assert (group["momentum"], group["nesterov"], group["weight_decay"]) == (0.99, True, 3e-5)
    # round 3 of 10 epochs: lr = 0.01 * (1 - 3/10) ** 0.9, whatever happened before
    trainer.current_round = 3
    fit = trainer.fit()
    assert fit["lr"] == [pytest.approx(0.01 * 0.7 ** 0.9)]
    names = [type(t).__name__ for t in trainer._train_loader().transforms.transforms]
    assert {"SpatialTransform", "GaussianNoiseTransform", "MirrorTransform", "DownsampleSegForDSTransform"} <= set(
        names + [type(getattr(t, "transform", None)).__name__ for t in trainer._train_loader().transforms.transforms])
    # a batch: the plan's batch size and patch, one target per deep-supervision output
    batch = next(trainer._train_loader())
    assert tuple(batch["data"].shape) == (2, 1, 32, 32) and len(batch["target"]) == 3  # 4 stages: 3 decoder outputs


def test_region_plans_train_per_class_and_score_each_class(tmp_path):
    from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss

    site = make_two_class_site(tmp_path / "f", site="f", num_volumes=3, slices_per_volume=3)
    plan = _plan_for(site)
    assert plan["label_mode"] == "regions" and plan["num_input_channels"] == 3
    trainer = NnUNetSiteTrainer(plan, {**TINY, "val_fraction": 0.34}, site)
    assert isinstance(trainer.loss.loss, DC_and_BCE_loss)
    result = trainer.train_round(None, round_index=0)
    val = result.metrics["val_before"]
    assert val["classes"] == ["disc", "cup"] and len(val["dice_per_class"]) == 2 and len(val["dice_reference_per_class"]) == 2


def test_weights_of_another_plan_are_refused(site):
    trainer = NnUNetSiteTrainer(_plan_for(site), TINY, site)
    other = NnUNetSiteTrainer(_plan_for(site, base_num_features=4, max_num_features=32), TINY, site)
    with pytest.raises(WeightsMismatch, match="shape"):
        trainer.load_travel_weights(other.travel_weights())
    # loading the travel set sets the decoder's aliases of the encoder too
    weights = other = NnUNetSiteTrainer(_plan_for(site), {**TINY, "seed": 1}, site).travel_weights()
    key = "encoder.stages.0.0.convs.0.conv.weight"
    other[key] = other[key] + 1.0
    trainer.load_travel_weights(other)
    assert torch.equal(trainer.network.state_dict()["decoder.encoder." + key[len("encoder."):]], other[key])
    weights = trainer.travel_weights()
    weights.pop(sorted(weights)[0])
    with pytest.raises(WeightsMismatch, match="1 missing"):
        trainer.load_travel_weights(weights)


def test_a_plan_that_does_not_fit_the_site_is_a_one_line_error(site, tmp_path):
    grey_plan = _plan_for(site)
    colour = make_two_class_site(tmp_path / "c", site="c")
    with pytest.raises(PlanError, match=r"classes \['disc', 'cup'\] differ from the plan's \['disc'\]"):
        NnUNetSiteTrainer(grey_plan, TINY, colour)
    with pytest.raises(FedFMSError, match="iterations_per_epoch"):
        NnUNetConfig.from_dict({"iterations_per_epoch": 0})
    with pytest.raises(FedFMSError, match="unknown field"):
        NnUNetConfig.from_dict({"learning_rate": 0.1})


def test_held_out_scoring_and_the_centralised_baseline(tmp_path):
    sites = [make_disc_site(tmp_path / f"s{i}", site=f"s{i}", num_volumes=3, slices_per_volume=4, seed=i) for i in range(3)]
    out = tmp_path / "central" / "model.pt"
    train_centralized(MODEL_CONFIG, TINY, sites[:2], epochs=3, out_weights=out)
    history = json.loads(out.with_suffix(".json").read_text())
    assert history["epochs"] == 3 and [h["epoch"] for h in history["history"]] == [1, 2, 3]
    assert history["train_samples"] + history["val_samples"] == 24
    assert (out.parent / PLAN_FILE).is_file() and (out.parent / "model_last.pt").is_file()
    rows = evaluate_sites(MODEL_CONFIG, out, [sites[2]], device="cpu", mirror_tta=False)
    assert rows[0]["site"] == "s2" and rows[0]["num_samples"] == 12 and 0 <= rows[0]["dice"] <= 1
    assert rows[0]["dice"] > 0.3
    with pytest.raises(FedFMSError, match="already exists"):
        train_centralized(MODEL_CONFIG, TINY, sites[:2], epochs=1, out_weights=out)
    # a model without its plan, or with another plan, is refused in one line
    lonely = tmp_path / "lonely" / "FL_global_model.pt"
    lonely.parent.mkdir()
    lonely.write_bytes(out.read_bytes())
    with pytest.raises(PlanError, match=PLAN_FILE):
        find_plan(lonely)
    write_plan(_plan_for(sites[0], base_num_features=4, max_num_features=32), lonely.parent)
    with pytest.raises(CheckpointError, match="shape"):
        evaluate_sites(MODEL_CONFIG, lonely, [sites[2]], device="cpu")
