"""The fused attention computes what segment-anything's attention computes, gradients included."""

import copy

import pytest
import torch
from segment_anything.modeling.image_encoder import Attention

from fedfms.models import ModelConfig, build_model
from fedfms.models.attention import FusedRelPosAttention


@pytest.mark.parametrize("size,heads,dim", [(14, 2, 64), (8, 4, 32), (5, 1, 16)])
def test_fused_matches_stock_attention_in_float64(size, heads, dim):
    torch.manual_seed(size)
    stock = Attention(dim, num_heads=heads, use_rel_pos=True, input_size=(size, size)).double()
    with torch.no_grad():  # SAM initialises rel-pos tables at zero; random ones actually test the fold
        stock.rel_pos_h.normal_()
        stock.rel_pos_w.normal_()
    fused = FusedRelPosAttention(copy.deepcopy(stock))
    x1 = torch.randn(2, size, size, dim, dtype=torch.float64, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    y1, y2 = stock(x1), fused(x2)
    torch.testing.assert_close(y2, y1, rtol=0, atol=1e-12)
    g = torch.randn_like(y1)
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=0, atol=1e-11)
    for name in ("rel_pos_h", "rel_pos_w"):
        torch.testing.assert_close(getattr(fused, name).grad, getattr(stock, name).grad, rtol=0, atol=1e-11)
    torch.testing.assert_close(fused.qkv.weight.grad, stock.qkv.weight.grad, rtol=0, atol=1e-10)


@pytest.mark.parametrize("mode", ["fedsam", "fedmsa"])
def test_whole_model_is_unchanged_by_fused_attention(mode):
    cfg = dict(variant="tiny", mode=mode, num_classes=2, pretrained=False, init_seed=3)
    # float32: segment-anything's prompt encoder does not run in float64
    stock = build_model(ModelConfig(**cfg, fused_attention=False))
    fused = build_model(ModelConfig(**cfg, fused_attention=True))
    assert stock.state_dict().keys() == fused.state_dict().keys()  # checkpoints and travel sets unchanged
    with torch.no_grad():
        for block in stock.image_encoder.blocks:
            block.attn.rel_pos_h.normal_()
            block.attn.rel_pos_w.normal_()
    fused.load_state_dict(stock.state_dict())
    x = torch.rand(2, 3, 128, 128)
    torch.testing.assert_close(fused(x), stock(x), rtol=1e-4, atol=1e-4)
    assert any(isinstance(b.attn, FusedRelPosAttention) for b in fused.image_encoder.blocks)
