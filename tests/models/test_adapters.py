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


# ----------------------------------------------------------------------------------------------------
# block order: segment-anything's (project flavour) and the paper code's (reference flavour)


def _random_layer_norms(module: torch.nn.Module, seed: int = 3) -> None:
    """Non-zero LayerNorm biases and non-unit gains, as in every official SAM checkpoint (a random init has
    zero biases, and then padding tokens are zero under either order)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.5 * torch.randn(m.bias.shape, generator=g))


def _flavoured_tiny_encoder(flavour: str):
    from fedfms.flavours import flavour_overrides
    from fedfms.models import ModelConfig, build_model

    cfg = ModelConfig("tiny", "fedmsa", pretrained=False, **flavour_overrides(flavour)["model"])
    encoder = build_model(cfg).image_encoder.eval()
    _random_layer_norms(encoder)
    for block in encoder.blocks:
        for adapter in (block.space_adapter, block.mlp_adapter):
            perturb(adapter)  # trained adapters: their place relative to the windows shows too
    return encoder


def _paper_code_block(block, x: torch.Tensor) -> torch.Tensor:
    """The paper code's MSA block, re-stated from its description: pad the token grid with zeros up to whole
    windows and cut it into windows FIRST; then norm1, attention and the space adapter per window; stitch the
    windows back, drop the padding, add the shortcut; then x + mlp(norm2(x)) + 0.5 * mlp_adapter(norm2(x))."""
    batch, height, width, dim = x.shape
    w = block.window_size
    if w > 0:
        rows, cols = -(-height // w), -(-width // w)
        grid = x.new_zeros(batch, rows * w, cols * w, dim)
        grid[:, :height, :width] = x
        tokens = grid.reshape(batch, rows, w, cols, w, dim).permute(0, 1, 3, 2, 4, 5).reshape(-1, w, w, dim)
    else:
        tokens = x
    n1 = block.norm1
    y = block.attn(torch.nn.functional.layer_norm(tokens, (dim,), n1.weight, n1.bias, n1.eps))
    sa = block.space_adapter
    y = y + sa.up(sa.act(sa.down(y)))
    if w > 0:
        y = y.reshape(batch, rows, cols, w, w, dim).permute(0, 1, 3, 2, 4, 5).reshape(batch, rows * w, cols * w, dim)
        y = y[:, :height, :width]
    x = x + y
    n2 = block.norm2
    xn = torch.nn.functional.layer_norm(x, (dim,), n2.weight, n2.bias, n2.eps)
    ma = block.mlp_adapter
    return x + block.mlp(xn) + 0.5 * ma.up(ma.act(ma.down(xn)))


def _segment_anything_block(block) -> Block:
    """segment-anything's own Block holding the adapted block's SAM weights (adapters left out)."""
    dim = block.norm1.normalized_shape[0]
    side = (block.attn.rel_pos_h.shape[0] + 1) // 2  # the window, or the whole grid for global attention
    stock = Block(dim, block.attn.num_heads, use_rel_pos=True, window_size=block.window_size, input_size=(side, side),
                  norm_layer=lambda d: torch.nn.LayerNorm(d, eps=block.norm1.eps))
    stock.load_state_dict({k: v for k, v in block.state_dict().items() if "adapter" not in k})
    return stock.eval()


def test_reference_flavour_partitions_windows_before_norm1():
    encoder = _flavoured_tiny_encoder("reference")
    windowed = encoder.blocks[0]
    assert windowed.window_size == 5  # tiny at 128 px: an 8x8 token grid, padded to 10x10 for windows of 5
    x = torch.randn(2, 8, 8, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = _paper_code_block(windowed, x)
        got = windowed(x)
        # the project's order on the same weights: zero padding tokens after norm1
        norm_first = AdaptedBlock.forward(_with_order(windowed, "norm_then_window"), x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (norm_first - expected).abs().max() > 1e-2  # the order matters here, so the equality above is not vacuous

    # the whole encoder: patch embedding, every block in the paper code's order, neck
    image = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        tokens = encoder.patch_embed(image) + encoder.pos_embed
        for block in encoder.blocks:
            tokens = _paper_code_block(block, tokens)
        expected = encoder.neck(tokens.permute(0, 3, 1, 2))
        torch.testing.assert_close(encoder(image), expected, rtol=1e-4, atol=1e-4)


def test_project_flavour_keeps_segment_anything_block_order():
    encoder = _flavoured_tiny_encoder("project")
    x = torch.randn(2, 8, 8, 64, generator=torch.Generator().manual_seed(1))
    for block in encoder.blocks:  # windowed (padded 8 -> 10) and global
        with torch.no_grad():
            sa, ma = block.space_adapter, block.mlp_adapter
            for p in (*sa.up.parameters(), *ma.up.parameters()):
                p.zero_()  # adapters back at the project's start: the block must compute SAM's Block exactly
            got = block(x)
            torch.testing.assert_close(got, _segment_anything_block(block)(x), rtol=1e-5, atol=1e-5)
            if block.window_size:  # and not the paper code's order, which pads before norm1
                assert (got - _paper_code_block(block, x)).abs().max() > 1e-2


def _with_order(block: AdaptedBlock, order: str) -> AdaptedBlock:
    other = copy.copy(block)
    other.order = order
    return other


def test_block_order_is_checked():
    from fedfms.errors import ConfigError
    from fedfms.models import ModelConfig, build_model

    with pytest.raises(ConfigError, match="adapted_block_order is 'sam'; expected one of norm_then_window, window_then_norm"):
        build_model(ModelConfig("tiny", "fedmsa", pretrained=False, adapted_block_order="sam"))
    with pytest.raises(ValueError, match="adapted block order is 'x'"):
        AdaptedBlock(stock_block(5), order="x")
