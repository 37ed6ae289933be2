"""MSA adapters: an adapted block starts as the stock block, and the adapters enter where the paper says."""

from __future__ import annotations

import copy

import pytest
import torch
from segment_anything.modeling.image_encoder import Block

from fedfms.models.adapters import Adapter, AdaptedBlock, add_adapters
from fedfms.models.registry import build_image_encoder, get_variant


def stock_block(window_size: int) -> Block:
    """A segment-anything block on an 8x8 token grid (tiny at 128 px), with non-zero rel-pos tables."""
    torch.manual_seed(0)
    block = Block(64, 2, use_rel_pos=True, window_size=window_size, input_size=(8, 8) if window_size == 0 else (window_size, window_size))
    with torch.no_grad():
        block.attn.rel_pos_h.normal_()
        block.attn.rel_pos_w.normal_()
    return block.eval()


def perturb(adapter: Adapter) -> None:
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_(std=0.2)


@pytest.mark.parametrize("window_size", [0, 5])  # global attention, and windows that need padding (8 -> 10)
def test_zero_initialised_adapters_leave_the_block_unchanged(window_size):
    block = stock_block(window_size)
    x = torch.randn(2, 8, 8, 64)
    with torch.no_grad():
        expected = block(x)
        adapted = AdaptedBlock(block).eval()
        got = adapted(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # the adapted block owns the original modules under their original names (checkpoint keys load as-is)
    assert adapted.attn is block.attn and adapted.mlp is block.mlp
    assert {k for k in adapted.state_dict() if "adapter" not in k} == set(block.state_dict())


@pytest.mark.parametrize("which", ["space_adapter", "mlp_adapter"])
def test_trained_adapters_change_the_output(which):
    block = stock_block(5)
    adapted = AdaptedBlock(block).eval()
    x = torch.randn(2, 8, 8, 64)
    with torch.no_grad():
        before = adapted(x)
        perturb(getattr(adapted, which))
        after = adapted(x)
    assert (after - before).abs().max() > 1e-2


def test_mlp_adapter_is_parallel_to_the_mlp_without_skip_and_scaled_by_half():
    block = stock_block(0)
    adapted = AdaptedBlock(block).eval()
    assert adapted.mlp_adapter_scale == 0.5
    perturb(adapted.mlp_adapter)
    seen = {}
    # norm2's input is x after the attention branch; with a zero space adapter it equals the stock block's.
    handle = block.norm2.register_forward_hook(lambda mod, inp, out: seen.setdefault("xn", out))
    x = torch.randn(2, 8, 8, 64)
    with torch.no_grad():
        stock = block(x)
        seen.clear()
        got = adapted(x)
        expected = stock + 0.5 * adapted.mlp_adapter.up(adapted.mlp_adapter.act(adapted.mlp_adapter.down(seen["xn"])))
    handle.remove()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_space_adapter_has_a_skip_connection():
    adapter = Adapter(64, skip=True)
    x = torch.randn(4, 64)
    torch.testing.assert_close(adapter(x), x)  # zero up-projection: identity
    assert Adapter(64, skip=False)(x).abs().max() == 0


def test_adapter_shape_and_activation():
    adapter = Adapter(768, ratio=0.25, activation="relu")
    assert adapter.down.out_features == 192 and adapter.up.in_features == 192
    assert isinstance(adapter.act, torch.nn.ReLU)
    assert isinstance(Adapter(768).act, torch.nn.GELU)


def test_add_adapters_wraps_every_block_once():
    encoder = build_image_encoder(get_variant("tiny"))
    before = copy.deepcopy(encoder.state_dict())
    add_adapters(encoder)
    add_adapters(encoder)  # idempotent: no adapters on adapters
    assert all(isinstance(b, AdaptedBlock) and isinstance(b.attn, torch.nn.Module) for b in encoder.blocks)
    state = encoder.state_dict()
    assert len([k for k in state if ".space_adapter." in k]) == 4 * len(encoder.blocks)
    for k, v in before.items():
        assert torch.equal(state[k], v)
