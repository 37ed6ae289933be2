"""Prompt-free forward: image batch -> C mask logits at a quarter of the input size."""

from __future__ import annotations

import time

import pytest
import torch

from fedfms.models import ModelConfig, build_model


@pytest.mark.parametrize("mode", ["fedsam", "fedmsa"])
@pytest.mark.parametrize("num_classes", [1, 3])
@pytest.mark.parametrize("batch", [1, 3])
def test_tiny_output_shape(mode, num_classes, batch):
    model = build_model(ModelConfig("tiny", mode, num_classes=num_classes, pretrained=False)).eval()
    with torch.no_grad():
        out = model(torch.rand(batch, 3, 128, 128))
    assert out.shape == (batch, num_classes, 32, 32)
    assert torch.isfinite(out).all()


def test_batch_items_are_independent():
    """The batch-1 prompt broadcasts over the batch: image i's logits do not depend on the other images."""
    model = build_model(ModelConfig("tiny", "fedmsa", num_classes=2, pretrained=False)).eval()
    images = torch.rand(3, 3, 128, 128)
    with torch.no_grad():
        together = model(images)
        alone = model(images[1:2])
    torch.testing.assert_close(together[1:2], alone, rtol=1e-4, atol=1e-5)


def test_smaller_input_size():
    model = build_model(ModelConfig("tiny", "fedsam", num_classes=2, image_size=64, pretrained=False)).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, 64, 64)).shape == (2, 2, 16, 16)


def test_gradients_reach_the_head_and_decoder():
    model = build_model(ModelConfig("tiny", "fedmsa", num_classes=1, pretrained=False))
    model(torch.rand(2, 3, 128, 128)).sum().backward()
    assert model.head.weight.grad is not None and model.head.weight.grad.abs().sum() > 0
    assert model.mask_decoder.output_upscaling[0].weight.grad.abs().sum() > 0
    assert model.image_encoder.blocks[0].attn.qkv.weight.grad is None  # frozen


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    images = torch.rand(2, 3, 128, 128)
    grads = []
    for ckpt in (False, True):
        model = build_model(ModelConfig("tiny", "fedsam", num_classes=1, pretrained=False, activation_checkpointing=ckpt))
        model(images).sum().backward()
        grads.append(model.image_encoder.blocks[0].attn.qkv.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.fullsize
@pytest.mark.parametrize("num_classes", [2])
def test_vit_b_at_1024_forward_shape(num_classes):
    """Full-size vit_b, random init, one image at the paper's 1024 px: ~20 s on 2 CPU cores (the full-size tier,
    `make test-fullsize`)."""
    model = build_model(ModelConfig("vit_b", "fedmsa", num_classes=num_classes, pretrained=False)).eval()
    start = time.perf_counter()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 1024, 1024))
    print(f"vit_b 1024 forward: {time.perf_counter() - start:.1f} s")
    assert out.shape == (1, num_classes, 256, 256)
    assert torch.isfinite(out).all()
