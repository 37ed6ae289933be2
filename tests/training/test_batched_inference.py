"""Batched inference: several slices per forward pass give the same logits and masks as one slice at a time
(on a CPU, where autocast is off), and the autocast switch only turns bf16 on for CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedfms.errors import ConfigError
from fedfms.models import ModelConfig, build_model
from fedfms.training.predict import PREDICT_BATCH, batched_logits, inference_autocast, predict_slices


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model(ModelConfig("tiny", "fedmsa", num_classes=2, pretrained=False, init_seed=0)).eval()
    # the random init predicts almost nothing; move the decoder's output so masks have both values
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return m


@pytest.fixture(scope="module")
def slices():
    return np.random.default_rng(0).uniform(0, 1, size=(11, 48, 40, 3)).astype(np.float32)


def test_batched_logits_equal_one_slice_at_a_time(model, slices):
    torch.set_num_threads(1)
    one = torch.cat(list(batched_logits(model, slices, batch_size=1)))
    for batch_size in (4, PREDICT_BATCH, 32):
        many = torch.cat(list(batched_logits(model, slices, batch_size=batch_size)))
        assert many.shape == one.shape == (11, 2, model.mask_size, model.mask_size)
        assert many.dtype == torch.float32
        torch.testing.assert_close(many, one, atol=1e-5, rtol=0)


def test_batched_masks_equal_one_slice_at_a_time(model, slices):
    one = predict_slices(model, slices, batch_size=1)
    many = predict_slices(model, slices)  # PREDICT_BATCH
    assert one.shape == (11, 2, 48, 40) and one.dtype == np.uint8
    assert 0 < one.mean() < 1  # both values occur, so the comparison means something
    np.testing.assert_array_equal(many, one)


def test_no_graph_is_kept(model, slices):
    logits = next(batched_logits(model, slices[:2]))
    assert not logits.requires_grad


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_autocast_is_bf16_on_cuda_only():
    with inference_autocast(torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")
    with inference_autocast(torch.device("cpu"), "off"):
        assert not torch.is_autocast_enabled("cpu")
    ctx = inference_autocast(torch.device("cuda"))
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16
    assert not isinstance(inference_autocast(torch.device("cuda"), "off"), torch.autocast)
    with pytest.raises(ConfigError, match="amp is 'fp8'"):
        inference_autocast(torch.device("cpu"), "fp8")


def test_batch_size_must_be_positive(model, slices):
    with pytest.raises(ConfigError, match="batch_size is 0"):
        predict_slices(model, slices, batch_size=0)
