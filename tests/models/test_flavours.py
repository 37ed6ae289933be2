"""Model flavours: the project's defaults and the paper code's head, input scaling, dense prompt, adapter
init, FedMSA block order and loss weight behind one switch; both load the same official checkpoint strictly.
(The block order's numbers are pinned in test_adapters.py.)"""

from __future__ import annotations

import pytest
import torch

from fedfms.errors import ConfigError
from fedfms.flavours import FLAVOURS, apply_flavour, flavour_of, flavour_overrides
from fedfms.models import ModelConfig, build_model, get_variant, travel_keys
from fedfms.models.adapters import Adapter, is_adapter_key
from fedfms.models.checkpoint import load_sam_weights
from fedfms.models.registry import build_image_encoder, build_mask_decoder, build_prompt_encoder
from fedfms.training.trainer import LocalTrainer, TrainConfig
from segment_anything.modeling import Sam

IMAGES = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))


def tiny(flavour: str, mode="fedmsa", num_classes=1, **kw) -> ModelConfig:
    return ModelConfig("tiny", mode, num_classes=num_classes, pretrained=kw.pop("pretrained", False),
                       **{**flavour_overrides(flavour)["model"], **kw})


@pytest.fixture
def ckpt(tmp_path):
    """A random tiny SAM saved the way the official checkpoints were: ``Sam(...).state_dict()``."""
    torch.manual_seed(1)
    variant = get_variant("tiny")
    sam = Sam(build_image_encoder(variant), build_prompt_encoder(variant), build_mask_decoder(variant))
    with torch.no_grad():
        for name, p in sam.named_parameters():
            if "pos" in name:
                p.normal_()  # non-zero position tables, so a skipped key would show
    path = tmp_path / "sam_tiny.pth"
    torch.save(sam.state_dict(), path)
    return path, sam.state_dict()


def test_the_registry_and_its_defaults():
    assert set(FLAVOURS) == {"project", "reference"}
    # the project flavour is exactly what the configs default to
    defaults, train = ModelConfig(), TrainConfig()
    for key, value in FLAVOURS["project"]["model"].items():
        assert getattr(defaults, key) == value, key
    assert train.pos_weight == FLAVOURS["project"]["train"]["pos_weight"] == 1.0
    assert FLAVOURS["reference"] == {
        "model": {"head": "reference", "normalize": False, "dense_prompt": "none", "adapter_init": "default",
                  "adapted_block_order": "window_then_norm"},
        "train": {"pos_weight": 2.0},
    }
    o = flavour_overrides("reference")
    o["model"]["head"] = "changed"  # a copy: the registry cannot be changed through it
    assert FLAVOURS["reference"]["model"]["head"] == "reference"
    assert flavour_overrides("reference", "unet") == {"model": {}, "train": {"pos_weight": 2.0}}
    with pytest.raises(ConfigError, match="flavour is 'paper'; expected one of project, reference"):
        flavour_overrides("paper")


def test_flavour_of_and_apply_flavour():
    assert flavour_of({"variant": "tiny"}, {}) == "project"
    assert flavour_of({"variant": "tiny", **FLAVOURS["reference"]["model"]}, {"pos_weight": 2}) == "reference"
    assert flavour_of({"variant": "tiny", **FLAVOURS["reference"]["model"]}, {}) == "custom"  # pos_weight 1
    assert flavour_of({"variant": "unet"}, {"pos_weight": 2.0}) == "reference"
    model, train = apply_flavour("reference", {"num_classes": 2}, {"lr": 1e-3})
    assert model == {"num_classes": 2, **FLAVOURS["reference"]["model"]} and train == {"lr": 1e-3, "pos_weight": 2.0}
    with pytest.raises(ConfigError, match="sets train field 'pos_weight' to 2.0, but it is also given as 3"):
        apply_flavour("reference", {}, {"pos_weight": 3})


def _decoder(model, images, dense_zero: bool, normalize: bool, multimask: bool):
    """Straight through segment-anything's own modules, as the paper code calls them."""
    x = (images - model.pixel_mean) / model.pixel_std if normalize else images
    sparse, dense = model.prompt_encoder(points=None, boxes=None, masks=None)
    masks, _ = model.mask_decoder(image_embeddings=model.image_encoder(x), image_pe=model.prompt_encoder.get_dense_pe(),
                                  sparse_prompt_embeddings=sparse,
                                  dense_prompt_embeddings=torch.zeros_like(dense) if dense_zero else dense,
                                  multimask_output=multimask)
    return masks


def test_project_head_is_a_conv_over_the_three_multimask_outputs():
    model = build_model(tiny("project", num_classes=2)).eval()
    with torch.no_grad():
        expected = model.head(_decoder(model, IMAGES, dense_zero=False, normalize=True, multimask=True))
        got = model(IMAGES)
    assert model.head.in_channels == 3
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_reference_head_one_class_is_mask_token_zero_without_a_conv():
    model = build_model(tiny("reference", num_classes=1)).eval()
    assert model.head is None and model.num_classes == 1
    assert not any(k.startswith("head.") for k in model.state_dict())
    with torch.no_grad():
        expected = _decoder(model, IMAGES, dense_zero=True, normalize=False, multimask=False)  # token 0
        got = model(IMAGES)
        normalised = _decoder(model, IMAGES, dense_zero=True, normalize=True, multimask=False)
        with_prompt = _decoder(model, IMAGES, dense_zero=False, normalize=False, multimask=False)
    assert got.shape == (2, 1, 32, 32)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # the two switches make a difference (so the equality above is not vacuous)
    assert (got - normalised).abs().max() > 1e-3 and (got - with_prompt).abs().max() > 1e-3


def test_reference_head_several_classes_is_a_conv_over_all_four_tokens():
    model = build_model(tiny("reference", num_classes=2)).eval()
    assert model.head.in_channels == 4 and model.head.out_channels == 2
    with torch.no_grad():
        sparse, dense = model.prompt_encoder(points=None, boxes=None, masks=None)
        masks, _ = model.mask_decoder.predict_masks(model.image_encoder(IMAGES), model.prompt_encoder.get_dense_pe(),
                                                    sparse, torch.zeros_like(dense))
        torch.testing.assert_close(model(IMAGES), model.head(masks), rtol=1e-5, atol=1e-5)


def test_adapter_init():
    torch.manual_seed(0)
    zero = Adapter(64, init="zero_up")
    torch.manual_seed(0)
    default = Adapter(64, init="default")
    assert torch.equal(zero.down.weight, default.down.weight)  # same random numbers drawn
    assert zero.up.weight.abs().max() == 0 and default.up.weight.abs().max() > 0
    x = torch.randn(3, 64)
    torch.testing.assert_close(zero(x), x)  # zero up-projection: the skip connection alone
    assert (default(x) - x).abs().max() > 1e-3
    with pytest.raises(ConfigError, match="adapter_init is 'ones'; expected one of zero_up, default"):
        build_model(ModelConfig("tiny", "fedmsa", pretrained=False, adapter_init="ones"))
    with pytest.raises(ConfigError, match="head is 'mlp'; expected one of multimask_conv, reference"):
        build_model(ModelConfig("tiny", "fedmsa", pretrained=False, head="mlp"))


@pytest.mark.parametrize("mode", ["fedsam", "fedmsa"])
@pytest.mark.parametrize("num_classes", [1, 2])
def test_both_flavours_load_the_same_official_checkpoint_strictly(ckpt, mode, num_classes):
    path, saved = ckpt
    models = {}
    for flavour in FLAVOURS:
        model = build_model(tiny(flavour, mode, num_classes, pretrained=True, checkpoint=str(path)))
        state = model.state_dict()
        sam_keys = {k for k in state if not k.startswith("head.") and not is_adapter_key(k)}
        assert sam_keys == set(saved)
        for k in sam_keys:
            assert torch.equal(state[k], saved[k]), (flavour, k)
        assert load_sam_weights(model, path, "tiny") == []  # and once more, strictly, into the built model
        models[flavour] = model
    project, reference = models["project"], models["reference"]
    if mode == "fedmsa":
        ups = [k for k in reference.state_dict() if k.endswith("adapter.up.weight")]
        assert ups and all(project.state_dict()[k].abs().max() == 0 for k in ups)
        assert all(reference.state_dict()[k].abs().max() > 0 for k in ups)
    travel = set(travel_keys(reference, mode))
    assert any(k.startswith("head.") for k in travel) == (num_classes > 1)


def test_pos_weight_reaches_the_loss(disc_site):
    logits = torch.tensor([[[[2.0, -1.0]]]])
    target = torch.tensor([[[[1.0, 0.0]]]])
    losses = {}
    for flavour in FLAVOURS:
        o = flavour_overrides(flavour)
        trainer = LocalTrainer(tiny(flavour), TrainConfig(val_fraction=0.2, progress=False, **o["train"]), str(disc_site))
        losses[flavour] = float(trainer._loss(logits, target))
    softplus = torch.nn.functional.softplus
    positive, negative = float(softplus(torch.tensor(-2.0))), float(softplus(torch.tensor(-1.0)))
    assert losses["project"] == pytest.approx((positive + negative) / 2)
    assert losses["reference"] == pytest.approx((2 * positive + negative) / 2)
    with pytest.raises(ConfigError, match="pos_weight"):
        TrainConfig.from_dict({"pos_weight": 0})


def test_reference_flavour_trains(disc_site):
    o = flavour_overrides("reference")
    trainer = LocalTrainer(tiny("reference"), TrainConfig(val_fraction=0.2, progress=False, lr=1e-3, **o["train"]),
                           str(disc_site))
    before = {k: v.clone() for k, v in trainer.travel_weights().items()}
    stats = trainer.fit()
    after = trainer.travel_weights()
    assert stats["steps"] > 0 and set(after) == set(before) and not any(k.startswith("head.") for k in after)
    moved = [k for k in after if not torch.equal(after[k], before[k])]
    assert any("mask_decoder.output_hypernetworks_mlps.0." in k for k in moved)  # token 0's hypernetwork trains
    assert any(".space_adapter." in k for k in moved)
