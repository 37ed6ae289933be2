"""Seeded construction: every site must build the same random model (FedMSA's frozen encoder without
pre-training), without touching anyone else's random stream."""

from __future__ import annotations

import pytest
import torch

from fedfms.errors import ConfigError
from fedfms.models import ModelConfig, build_model, build_model_on_meta


def encoder_state(seed: int, mode: str = "fedmsa") -> dict[str, torch.Tensor]:
    model = build_model(ModelConfig("tiny", mode, num_classes=2, pretrained=False, init_seed=seed))
    return model.state_dict()


@pytest.mark.parametrize("mode", ["fedsam", "fedmsa"])
def test_same_seed_gives_identical_models(mode):
    a, b = encoder_state(7, mode), encoder_state(7, mode)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_different_seeds_give_different_frozen_encoders():
    a, b = encoder_state(0), encoder_state(1)
    assert not torch.equal(a["image_encoder.blocks.0.attn.qkv.weight"], b["image_encoder.blocks.0.attn.qkv.weight"])
    assert not torch.equal(a["image_encoder.patch_embed.proj.weight"], b["image_encoder.patch_embed.proj.weight"])


def test_building_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(5)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    build_model(ModelConfig("tiny", "fedmsa", pretrained=False, init_seed=5))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(torch.rand(5), expected)


def test_global_rng_state_does_not_change_the_model():
    torch.manual_seed(1)
    a = encoder_state(3)
    torch.manual_seed(999)
    torch.rand(100)
    b = encoder_state(3)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_meta_build_ignores_checkpoint_and_allocates_nothing():
    model = build_model_on_meta(ModelConfig("tiny", "fedmsa", checkpoint="/nonexistent.pth", pretrained=True))
    assert all(t.is_meta for t in model.state_dict().values())


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"variant": "vit_x"}, "vit_x"),
        ({"num_classes": 0}, "num_classes"),
        ({"adapter_activation": "tanh"}, "adapter_activation"),
        ({"image_size": 100}, "multiple of the patch size"),
    ],
)
def test_bad_config_values(kw, match):
    with pytest.raises(ConfigError, match=match):
        build_model(ModelConfig(**{"variant": "tiny", "pretrained": False, **kw}))


def test_model_config_from_dict_rejects_unknown_fields():
    assert ModelConfig.from_dict({"variant": "tiny", "num_classes": 2}).num_classes == 2
    with pytest.raises(ConfigError, match="num_clases"):
        ModelConfig.from_dict({"num_clases": 2})
