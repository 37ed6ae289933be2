"""Exact parameter counts of the real SAM variants (on the meta device: no memory) and the travel set."""

from __future__ import annotations

import pytest
import torch

from fedfms.models import ModelConfig, build_model, build_model_on_meta
from fedfms.models.adapters import Adapter, is_adapter_key
from fedfms.models.travel import (
    count_parameters,
    is_travel_key,
    travel_bytes,
    travel_keys,
    travel_spec,
    travel_state_dict,
)
from fedfms.errors import ConfigError

SAM_VIT_B_PARAMS = 93_735_472  # image encoder 89,670,912 + prompt encoder 6,220 + mask decoder 4,058,340


def head_params(num_classes: int) -> int:
    return 3 * num_classes + num_classes  # Conv2d(3, C, 1): weights + bias


@pytest.mark.parametrize("num_classes", [1, 3])
def test_vit_b_fedsam_counts_every_parameter_as_trainable(num_classes):
    model = build_model_on_meta(ModelConfig("vit_b", "fedsam", num_classes=num_classes))
    assert all(p.is_meta for p in model.parameters())
    expected = SAM_VIT_B_PARAMS + head_params(num_classes)
    assert count_parameters(model) == expected
    assert count_parameters(model, trainable_only=True) == expected


def test_vit_b_fedmsa_trainable_count():
    model = build_model_on_meta(ModelConfig("vit_b", "fedmsa", num_classes=2))
    assert count_parameters(model, trainable_only=True) == 11_159_276
    # frozen part = the stock SAM encoder + prompt encoder, nothing else
    frozen = count_parameters(model) - count_parameters(model, trainable_only=True)
    assert frozen == 89_670_912 + 6_220


def test_vit_l_fedmsa_trainable_count():
    model = build_model_on_meta(ModelConfig("vit_l", "fedmsa", num_classes=2))
    assert count_parameters(model, trainable_only=True) == 29_285_612


def test_one_adapter_at_768_has_295872_parameters():
    assert sum(p.numel() for p in Adapter(768).parameters()) == 295_872


def test_travel_bytes_of_vit_b():
    msa = build_model_on_meta(ModelConfig("vit_b", "fedmsa", num_classes=2))
    spec = travel_spec(msa, "fedmsa")
    assert travel_bytes(spec) == 4 * 11_159_276
    assert travel_bytes(spec, bytes_per_value=2) == 2 * 11_159_276
    full = build_model_on_meta(ModelConfig("vit_b", "fedsam", num_classes=2))
    # FedSAM also ships the prompt encoder's (persistent, untrained) random-Fourier buffer of 2 x 128 floats.
    assert travel_bytes(travel_spec(full, "fedsam")) == 4 * (SAM_VIT_B_PARAMS + head_params(2) + 256)


# ---------------------------------------------------------------------------------------------- travel set


@pytest.fixture(scope="module")
def tiny_models():
    return {mode: build_model(ModelConfig("tiny", mode, num_classes=2, pretrained=False)) for mode in ("fedsam", "fedmsa")}


def test_fedmsa_travel_keys_are_adapters_decoder_and_head(tiny_models):
    model = tiny_models["fedmsa"]
    keys = set(travel_keys(model, "fedmsa"))
    state = model.state_dict()
    adapters = {k for k in state if k.startswith("image_encoder.") and (".space_adapter." in k or ".mlp_adapter." in k)}
    decoder = {k for k in state if k.startswith("mask_decoder.")}
    head = {k for k in state if k.startswith("head.")}
    assert adapters and decoder and head
    # each block contributes two adapters with down/up weight + bias
    assert len(adapters) == 2 * 4 * len(model.image_encoder.blocks)
    assert keys == adapters | decoder | head
    assert not any(k.startswith("prompt_encoder.") for k in keys)
    assert not any(k.startswith("image_encoder.") and not is_adapter_key(k) for k in keys)
    assert set(travel_state_dict(model, "fedmsa")) == keys


def test_fedsam_travels_the_whole_state_dict(tiny_models):
    model = tiny_models["fedsam"]
    assert travel_keys(model, "fedsam") == list(model.state_dict())
    sent = travel_state_dict(model, "fedsam")
    for k, v in model.state_dict().items():
        assert torch.equal(sent[k], v)
        assert sent[k].data_ptr() != v.data_ptr()  # a copy: later training must not change what was sent


@pytest.mark.parametrize("mode", ["fedsam", "fedmsa"])
def test_requires_grad_matches_travel_set(tiny_models, mode):
    model = tiny_models[mode]
    for name, param in model.named_parameters():
        assert param.requires_grad == is_travel_key(name, mode), name
    # nothing trainable may stay home: every trainable parameter is in the travel set
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable <= set(travel_keys(model, mode))


def test_unknown_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="fedavg"):
        is_travel_key("head.weight", "fedavg")
    with pytest.raises(ConfigError, match="mode"):
        build_model(ModelConfig("tiny", "fedavg", pretrained=False))
